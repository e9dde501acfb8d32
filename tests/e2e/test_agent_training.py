"""A few training steps on tool-calling chats (the shipped tools data) with the tiny model: the
rows encode with peftkit's tool-capable template, the loss falls, the run's audit and report page
show the supervised tool calls and the unsupervised tool results apart."""

from __future__ import annotations

import json
from pathlib import Path

from peftkit.cli import main
from tests.conftest import write_jsonl, write_recipe

ROOT = Path(__file__).resolve().parents[2]


def test_training_on_tool_rows(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    lines = (ROOT / "recipes" / "data" / "tools-train.jsonl").read_text().splitlines()[:32]
    rows = [json.loads(line) for line in lines]
    for row in rows:  # the schema alone is longer than the tiny model's 512 positions
        row["tools"] = [{"type": "function", "function": {"name": "send_order"}}]
    data = write_jsonl(tmp_path / "tools.jsonl", rows)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_model,
        data,
        data={"train": str(data), "max_length": 512, "chat_template": "fallback"},
        train={"max_steps": 6, "micro_batch_size": 8, "lr": 1e-2, "precision": "fp32", "seed": 0},
    )
    assert main(["train", str(recipe)]) == 0
    run = tmp_path / "run"
    losses = [
        json.loads(line)["loss"]
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert losses[-1] < losses[0]
    audit = json.loads((run / "data_audit.json").read_text())
    segments = audit["rows"][0]["segments"]
    supervised = "".join(text for text, on in segments if on)
    unsupervised = "".join(text for text, on in segments if not on)
    assert '<tool_call>{"name": "send_order"' in supervised
    assert "### Tool result:" in unsupervised and "order_id" not in supervised
    parts = audit["rows"][0]["parts"]  # the run page shows calls and results apart
    assert {"tool_call", "tool_result"} <= set(parts)
    assert "class='part tool_call'" in (run / "report.html").read_text()
