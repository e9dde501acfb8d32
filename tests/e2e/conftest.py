"""Adapters per task, trained once per session: the shipped recipes, shortened, on builtin:tiny-llama."""

from __future__ import annotations

from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "tiny-llama" / "adapters"
SKILLS = ("arithmetic", "repeat", "sort")
PROMPTS = {
    "arithmetic": "What is 41 + 27?",
    "repeat": "Repeat after me: green river song",
    "sort": "Sort: 8, 3, 5, 1",
}


@pytest.fixture(scope="session")
def skill_runs(tmp_path_factory) -> dict[str, Path]:
    """{skill: run directory} of three LoRA adapters on one base, one per task (~10 s each)."""
    from peftkit import api

    root = tmp_path_factory.mktemp("adapters")
    runs = {}
    for skill in SKILLS:
        api.train(
            RECIPES / f"{skill}.yaml",
            [
                f"output.dir={root / skill}",
                "train.max_steps=30",
                "train.eval_every=null",
                "output.plot=false",
                "output.sample_prompts=[]",
            ],
        )
        runs[skill] = root / skill
    return runs


def alone_greedy(adapter_dir: Path | None, prompt: str, max_new_tokens: int = 24) -> str:
    """The answer of the base + one adapter loaded the plain way (transformers + peft, no peftkit
    serving code), greedy, chat template and stop tokens from the adapter's own folder."""
    import json

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.models.builtin import materialize

    base = materialize("builtin:tiny-llama")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir or base)
    stops = [tokenizer.eos_token_id]
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
        manifest = json.loads((adapter_dir / "peftkit_adapter.json").read_text())
        stops += [tokenizer.convert_tokens_to_ids(t) for t in manifest["stop_tokens"]]
    model.eval()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(
        [t for t in out[0, ids.shape[1] :].tolist() if t not in stops], skip_special_tokens=True
    )


@pytest.fixture(scope="module")
def finished_run(tiny_model, tmp_path_factory) -> Path:
    """A finished 2-step LoRA run with a checkpoint per step, beside its data (train.jsonl) and
    recipe (r.yaml); read-only for the tests that use it."""
    from peftkit.cli import main
    from tests.conftest import chat_rows, write_jsonl, write_recipe

    root = tmp_path_factory.mktemp("finished")
    data = write_jsonl(root / "train.jsonl", chat_rows(24))
    recipe = write_recipe(
        root / "r.yaml",
        tiny_model,
        data,
        train={"max_steps": 2, "save_every": 1},
        export={"samples": 2, "generate_tokens": 4},
    )
    assert main(["train", str(recipe)]) == 0
    return root / "run"
