"""Tiny models and tokenizers built locally (no network), and helpers to write recipes and data."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n N`: N workers share the cores; one thread each, or torch oversubscribes them
    # (set before any test module imports torch).
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, how are you today?",
    "What is 2 + 3? It is 5.",
    "Paris is the capital of France.",
    "Sort these numbers: 3, 1, 2",
    "You are a helpful assistant.",
    "I am fine, thank you!",
    "Tell me a joke about cats.",
] * 20

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Llama-3 style: BOS in the template, headers, turns ended by <|eot_id|> (not the EOS token).
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# A template whose assistant turns end with no special token at all.
PLAIN = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|pad|>",
]


def build_tokenizer(out: Path, chat_template: str | None, pad_is_eos: bool = False):
    """A byte-level BPE tokenizer trained on a tiny corpus, saved to `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|begin_of_text|>",
        pad_token="<|endoftext|>" if pad_is_eos else "<|pad|>",
    )
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(str(out))
    return fast


def build_model(out: Path, vocab_size: int, seed: int = 0, **overrides: Any) -> None:
    """A 2-layer Llama with hidden size 64 and random weights, saved as safetensors.

    initializer_range 0.1 (not 0.02): with a frozen random output head at std 0.02 the logits of a
    64-wide model cannot exceed ~1.3, so no adapter could fit anything; pretrained heads have no
    such limit.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "bos_token_id": 3,
        "eos_token_id": 0,
        "pad_token_id": 7,
        "initializer_range": 0.1,
    }
    config = LlamaConfig(**{**settings, **overrides})
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(str(out))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Folder with a tiny Llama + ChatML tokenizer, loadable with from_pretrained."""
    out = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tokenizer(out, CHATML)
    build_model(out, len(tok))
    return out


@pytest.fixture(scope="session")
def tokenizers_by_template(tmp_path_factory) -> dict[str, Path]:
    """Tokenizer folders for several chat templates (and none)."""
    out = {}
    for name, template in {
        "chatml": CHATML,
        "llama3": LLAMA3,
        "plain": PLAIN,
        "none": None,
    }.items():
        folder = tmp_path_factory.mktemp(f"tok-{name}")
        build_tokenizer(folder, template)
        out[name] = folder
    return out


def chat_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Short multi-turn chats of varying length with deterministic answers."""
    import random

    rng = random.Random(seed)
    words = "red blue green cat dog fox sun moon tree river stone bird".split()
    rows = []
    for i in range(n):
        messages = [{"role": "system", "content": "You are a helpful assistant."}]
        for _ in range(1 + i % 2):
            phrase = " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
            messages += [
                {"role": "user", "content": f"Repeat: {phrase}"},
                {"role": "assistant", "content": phrase},
            ]
        rows.append({"messages": messages})
    return rows


def free_port() -> int:
    """A free loopback port for a rendezvous, from a range of this pytest worker's own: two
    workers launching 2-process runs at once never pick the same port (an OS-chosen free port can
    be handed to both before either binds it)."""
    import socket

    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    base = 20000 + 2000 * (int(worker) if worker.isdigit() else 0)
    for port in random.Random().sample(range(base, base + 2000), 2000):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {base}-{base + 1999}")


def train_in_two_processes(
    recipe: Path,
    *args: str,
    launcher: list[str] | None = None,
    program: list[str] | None = None,
    expect_success: bool = True,
):
    """`peftkit train RECIPE ARGS` as 2 local processes (gloo on CPU, one thread each) on a free
    loopback port: torch.distributed.run, or `launcher` (e.g. `accelerate launch --config_file
    ...`) with `{port}` in it replaced; `program` instead of `-m peftkit` (a script taking the
    same arguments). Returns the finished process (asserted successful unless told not to)."""
    import subprocess
    import sys

    port = str(free_port())
    head = launcher or [
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port={port}",
    ]
    cmd = [sys.executable, *(part.replace("{port}", port) for part in head)]
    cmd += [*(program or ["-m", "peftkit"]), "train", str(recipe), *args]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if expect_success:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


RESUME_TRAIN = {
    "max_steps": 8,
    "micro_batch_size": 2,
    "grad_accum": 2,
    "lr": 1e-2,
    "save_every": 2,
    "keep_last": 10,
}
"""Train settings of the resume-equality tests: checkpoints every 2 of 8 steps, all kept."""


def write_recipe(
    path: Path, model_dir: Path, data_file: Path | str, **sections: dict[str, Any]
) -> Path:
    """A recipe file for the tiny model; keyword sections are merged over small, fast defaults."""
    recipe: dict[str, Any] = {
        "name": "test",
        "model": {"name": str(model_dir)},
        "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(data_file), "max_length": 128},
        "train": {
            "max_steps": 4,
            "micro_batch_size": 4,
            "lr": 1e-3,
            "precision": "fp32",
            "seed": 0,
        },
        "output": {"dir": str(path.parent / "run"), "plot": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict) and "method" not in value:
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def chat_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "chats.jsonl", chat_rows(24))


def fingerprint(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder`: compare to show nothing changed."""
    import hashlib

    return {
        str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


ANIMALS = "cat dog fox bird".split()
OTHER = "red blue green sun moon tree river stone".split()


def labeled_rows(n: int, seed: int, regression: bool = False, word: int = -1) -> list[dict]:
    """The label is decided by one word (the last, for decoders: the one the head reads; the
    first for encoders): animal or not (regression: 2 or -1)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(ANIMALS + OTHER) for _ in range(rng.randint(2, 6))]
        animal = words[word] in ANIMALS
        label = (3.0 * animal - 1.0) if regression else ("animal" if animal else "other")
        rows.append({"text": " ".join(words), "label": label})
    return rows


def pytest_collection_modifyitems(config, items):
    """Files with slow tests first (stable otherwise): with `pytest -n 2 --dist loadfile` the
    longest files start at once instead of leaving one worker busy at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


@pytest.fixture
def lora_swiglu_calls(monkeypatch) -> list[int]:
    """How many times the fused LoRA SwiGLU MLP (kernels/lora_mlp.py) ran: [count]."""
    from peftkit.kernels import lora_mlp

    count = [0]
    apply = lora_mlp.LoraSwiGLU.apply

    def counting(*args):
        count[0] += 1
        return apply(*args)

    monkeypatch.setattr(lora_mlp.LoraSwiGLU, "apply", counting)
    return count
