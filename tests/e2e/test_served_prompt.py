"""The served prompt of a tool chat is the prompt training conditioned the same turn on, token
for token: the adapter's template, the tools where training put them, and the template variables
training set (`data.chat_template_kwargs`, recorded in the adapter's manifest).

Training's side is peftkit's encoder on the run's tokenizer (the renderer training used); the
served side is a chat request in OpenAI's shape (arguments as JSON text, as clients send them)
through the server's own conversion and `AdapterSet.encode`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from peftkit import api
from peftkit.data.encode import Encoder
from peftkit.data.formats import to_example
from peftkit.data.sources import RawRow
from peftkit.serving import protocol as p
from peftkit.training.generated import held_out_answers
from tests.conftest import write_jsonl, write_recipe

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "tests" / "fixtures" / "chat_templates"
TOOLS = [{"type": "function", "function": {"name": "send_order", "description": "Order."}}]


def _rows(n: int) -> list[dict]:
    lines = (ROOT / "recipes" / "data" / "tools-eval.jsonl").read_text().splitlines()[:n]
    rows = [json.loads(line) for line in lines]
    for row in rows:  # the schema alone outgrows the tiny model
        row["tools"] = TOOLS
    return rows


CASES = {  # template, its variables
    "fallback": ("fallback", {}),
    "qwen3-thinking-off": (str(TEMPLATES / "qwen3.jinja"), {"enable_thinking": False}),
    "qwen2_5": (str(TEMPLATES / "qwen2_5.jinja"), {}),
}


@pytest.fixture(scope="module", params=list(CASES))
def trained(request, tmp_path_factory, tiny_model):
    from peftkit.adapters.adapter_set import AdapterSet

    template, variables = CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    rows = _rows(4)
    data = write_jsonl(tmp / "rows.jsonl", rows)
    recipe = write_recipe(
        tmp / "r.yaml",
        tiny_model,
        data,
        data={
            "train": str(data),
            "max_length": 512,
            "chat_template": template,
            "chat_template_kwargs": variables,
            "cache": False,
        },
        train={"max_steps": 1, "micro_batch_size": 4, "precision": "fp32"},
        output={"dir": str(tmp / "run"), "plot": False, "sample_prompts": []},
    )
    api.train(recipe)
    aset = AdapterSet.from_adapters({"a": tmp / "run"}, None, "float32", None)
    return rows, variables, tmp / "run", aset


def _trained_prompt(tokenizer, row: dict, variables: dict) -> list[int]:
    """What training conditioned the row's last assistant turn on: its tokens up to it."""
    example = to_example(RawRow(copy.deepcopy(row), "rows.jsonl line 1"), "messages", None)
    encoded = Encoder(tokenizer, "completion", "template", variables).encode(example)
    (item,) = held_out_answers([encoded], tokenizer)
    return item.prompt_ids


def test_the_served_prompt_of_a_tool_chat_is_the_trained_one(trained):
    rows, variables, run, aset = trained
    assert aset.adapters["a"].template_kwargs == variables  # recorded with the adapter
    tokenizer = AutoTokenizer.from_pretrained(str(run / "adapter"))
    assert tokenizer.chat_template == aset.chat_template("a")
    checked = 0
    for row in rows:
        messages = row["messages"]
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            # a chat that ends with turn i: what the server gets is the history before it
            trained_ids = _trained_prompt(
                tokenizer, {**row, "messages": messages[: i + 1]}, variables
            )
            request = p.ChatRequest(model="a", messages=messages[:i], tools=row["tools"])
            served = aset.encode(request.chat(), "a", tools=request.active_tools)
            assert served == trained_ids, (
                i,
                tokenizer.decode(served),
                tokenizer.decode(trained_ids),
            )
            checked += 1
    assert checked == sum(m["role"] == "assistant" for r in rows for m in r["messages"])
    if variables:  # not vacuous: without the recorded variables the served prompt differs
        with_them = aset.render(rows[0]["messages"][:1], "a", TOOLS)
        aset.adapters["a"].template_kwargs = {}
        try:
            assert aset.render(rows[0]["messages"][:1], "a", TOOLS) != with_them
        finally:
            aset.adapters["a"].template_kwargs = variables
