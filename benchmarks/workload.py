"""The benchmark workload, built locally and deterministically: model, tokenizer, chat data.

Real weights (`--model builtin:smollm2-135m`, or any model name a recipe takes): that model and
its own tokenizer, over chats of real English text: Python's reference documentation as shipped
with the interpreter (`pydoc_data.topics`), cut into question/answer chats whose answer lengths
are log-normal (median ~80 words, long tail; some two-turn), so micro-batches mix short and long
rows as real chat data does.

Random weights (`--size`): a Llama-architecture config (`SIZES`), ~52M parameters for the CPU
run. Tokenizer: word-level, 32k words + ChatML specials + a dedicated <pad>. Data: chats whose
prompt and reply lengths are log-normal (median ~60 and ~80 words, long tail, some two-turn),
over Zipf-distributed words; each reply starts by echoing part of its prompt, so there is
something to learn beyond unigram statistics.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

VOCAB_WORDS = 32000
SPECIALS = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
ROLE_WORDS = ["system", "user", "assistant"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SIZES = {
    # 2 layers, 64 wide: benchmarks/gpu/check.py --cpu-smoke (the script runs, nothing measured)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    # ~52M parameters: the CPU benchmark.
    "50m": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False),
    # Real architectures (random weights) for a GPU run.
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                         head_dim=64),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
}  # fmt: skip


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + ROLE_WORDS)}
    for i in range(VOCAB_WORDS):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<|endoftext|>", unk_token="<unk>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = CHATML
    fast.save_pretrained(str(out))
    return fast


def build_model(out: Path, size: str, tokenizer) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        **SIZES[size],
    )
    torch.manual_seed(0)
    # real-architecture sizes (GPU runs) are initialised on the GPU (8B on a CPU takes minutes)
    # and stored in bf16
    on_gpu = size not in ("50m", "tiny") and torch.cuda.is_available()
    with torch.device("cuda" if on_gpu else "cpu"):
        model = LlamaForCausalLM(config)
    if size not in ("50m", "tiny"):
        model = model.to(torch.bfloat16)
    model.save_pretrained(str(out))
    n = sum(p.numel() for p in model.parameters())
    del model
    if on_gpu:
        torch.cuda.empty_cache()  # the training processes that follow need the memory
    return n


def _words(rng: np.random.Generator, n: int) -> list[str]:
    ranks = np.minimum(rng.zipf(1.2, size=n), VOCAB_WORDS) - 1
    return [f"w{r}" for r in ranks]


def _chat(rng: np.random.Generator) -> dict:
    messages = [{"role": "system", "content": " ".join(_words(rng, 8))}]
    for _ in range(2 if rng.random() < 0.3 else 1):
        prompt = _words(rng, max(2, int(rng.lognormal(np.log(60), 0.8))))
        reply_len = max(2, int(rng.lognormal(np.log(80), 0.8)))
        echo = prompt[: min(len(prompt), reply_len // 2)]
        reply = echo + _words(rng, reply_len - len(echo))
        messages += [
            {"role": "user", "content": " ".join(prompt)},
            {"role": "assistant", "content": " ".join(reply)},
        ]
    return {"messages": messages}


def build_data(out: Path, n_train: int, n_eval: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name, n in (("train", n_train), ("eval", n_eval)):
        with open(out / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(_chat(rng)) + "\n" for _ in range(n))


def build(workdir: Path, size: str, n_train: int, n_eval: int) -> dict:
    """Build everything under `workdir` (model/, train.jsonl, eval.jsonl); reuse if present."""
    model_dir = workdir / "model"
    stamp = workdir / "workload.json"
    wanted = {"size": size, "n_train": n_train, "n_eval": n_eval}
    if stamp.exists() and json.loads(stamp.read_text()).get("spec") == wanted:
        return json.loads(stamp.read_text())
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(model_dir)
    params = build_model(model_dir, size, tokenizer)
    build_data(workdir, n_train, n_eval)
    info = {"spec": wanted, "parameters": params, "vocab": len(tokenizer)}
    stamp.write_text(json.dumps(info))
    return info


def _paragraphs() -> list[tuple[str, list[str]]]:
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        paras = [" ".join(p.split()) for p in topics[name].split("\n\n") if len(p.split()) > 3]
        if len(paras) >= 3:
            out.append((name.replace("-", " "), paras))
    return out


def _take(paras: list[str], start: int, words: int) -> tuple[str, int]:
    """Whole paragraphs from `start` until about `words` words (at least one paragraph)."""
    taken, i = [], start
    while i < len(paras) and (not taken or sum(len(t.split()) for t in taken) < words):
        taken.append(paras[i])
        i += 1
    text = " ".join(" ".join(taken).split()[: max(words, 8)])
    return text, i


def _real_chat(rng: np.random.Generator, docs) -> dict:
    title, paras = docs[rng.integers(len(docs))]
    messages = [{"role": "system", "content": "You are a helpful assistant who knows Python well."}]
    start = int(rng.integers(0, max(1, len(paras) - 2)))
    question = f"Explain {title} in Python."
    for turn in range(2 if rng.random() < 0.3 else 1):
        if turn:
            question = "Tell me more."
        answer, start = _take(paras, start, max(8, int(rng.lognormal(np.log(80), 0.8))))
        messages += [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
        if start >= len(paras):
            break
    return {"messages": messages}


def build_real(workdir: Path, model: str, n_train: int, n_eval: int, seed: int = 0) -> dict:
    """A real model (materialised by peftkit, linked as workdir/model) and real-text chats."""
    from transformers import AutoConfig

    from peftkit.models.load import resolve_source

    workdir.mkdir(parents=True, exist_ok=True)
    folder = Path(resolve_source(model))
    link = workdir / "model"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(folder)
    rng, docs = np.random.default_rng(seed), _paragraphs()
    for name, n in (("train", n_train), ("eval", n_eval)):
        with open(workdir / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(_real_chat(rng, docs)) + "\n" for _ in range(n))
    from safetensors import safe_open

    params = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            names = st.keys()  # a safetensors handle is not iterable itself
            params += sum(int(np.prod(st.get_slice(k).get_shape())) for k in names)
    config = AutoConfig.from_pretrained(str(folder))
    return {"model": model, "parameters": params, "vocab": config.vocab_size}
