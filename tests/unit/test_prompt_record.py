"""The manifest's `prompt` record: the chats' system turns as training rendered them, the same
from the data cache and in memory, summarised as one recipe-wide system prompt, none, or varied."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from peftkit.data.pipeline import prepare_data
from peftkit.models.manifest import VARIED, default_system_prompt, training_prompt
from peftkit.recipe.schema import DataSpec
from tests.conftest import write_jsonl


def chat(i: int, system: str | None = None) -> dict:
    turns = [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": str(i)}]
    return {"messages": ([{"role": "system", "content": system}] if system else []) + turns}


@pytest.mark.parametrize(
    "rows, recipe_prompt, turns, summary",
    [
        (
            [chat(i) for i in range(8)],
            "Answer with the number.",
            ["Answer with the number."],
            "one",
        ),
        ([chat(i) for i in range(8)], None, [""], "none"),
        (
            [chat(i, "Be brief." if i % 2 else None) for i in range(8)],
            None,
            ["", "Be brief."],
            VARIED,
        ),
        ([chat(i, f"Task {i}.") for i in range(8)], "Recipe.", ["Task 0.", "Task 1."], VARIED),
    ],
    ids=["recipe-wide", "none", "some-rows", "every-row-its-own"],
)
def test_system_turns_are_recorded_alike_cached_and_in_memory(
    rows, recipe_prompt, turns, summary, tokenizers_by_template, tmp_path, monkeypatch
):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    tokenizer = AutoTokenizer.from_pretrained(tokenizers_by_template["chatml"])
    spec = DataSpec(train=str(write_jsonl(tmp_path / "t.jsonl", rows)), system_prompt=recipe_prompt)
    cached = prepare_data(spec, tokenizer, seed=0)
    memory = prepare_data(spec.model_copy(update={"cache": False}), tokenizer, seed=0)
    assert cached.cache_dir is not None and cached.system_turns == memory.system_turns == turns
    record = training_prompt("TEMPLATE", "tokenizer", recipe_prompt, cached.system_turns)
    assert record["system_turns"] == summary
    # the default is the recipe's own only: a recipe without one is served as before
    assert default_system_prompt({"prompt": record}) == recipe_prompt


def test_a_manifest_without_a_prompt_record_has_no_default():
    assert default_system_prompt({"format": 1, "stop_tokens": []}) is None
    assert default_system_prompt(None) is None
