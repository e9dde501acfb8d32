"""The toy chat-skills recipe on builtin:tiny-llama (shortened in CI, whole when slow); the real
quickstart (SmolLM2) is tested in test_real_model.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from peftkit.cli import main

QUICKSTART = Path(__file__).resolve().parents[2] / "recipes" / "tiny-llama" / "chat-skills.yaml"
# The assistant's arithmetic answer format, "a + b = c", at the start of the answer. A 3M toy's
# greedy continuation after it (e.g. "2 + 3 = 99 = 9.") flips with float rounding (thread count,
# summation order), so only the learned start is asserted; the untrained toy answers "Q: ...".
ANSWER = re.compile(r"^\d+ \+ \d+ = \d+")


def _train(tmp_path: Path, *overrides: str) -> dict:
    out = tmp_path / "quickstart"
    assert main(["train", str(QUICKSTART), f"output.dir={out}", *overrides]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "loss.png").exists()
    return json.loads((out / "summary.json").read_text()) | {
        "samples": json.loads((out / "samples.json").read_text())
    }


def test_quickstart_learns_the_chat_format_fast(tmp_path):
    summary = _train(tmp_path, "train.max_steps=30", "train.eval_every=30")
    assert summary["final_eval_loss"] < 0.5 * summary["first_eval_loss"]  # first = before training
    assert all(s["before"] != s["after"] for s in summary["samples"])


@pytest.mark.slow  # the whole quickstart: ~1-2 minutes on 2 CPU cores
def test_whole_quickstart_answers_in_the_trained_format(tmp_path):
    summary = _train(tmp_path)
    assert summary["final_eval_loss"] < 0.25 * summary["first_eval_loss"]
    arithmetic = next(s for s in summary["samples"] if s["prompt"].startswith("What is"))
    assert ANSWER.match(arithmetic["after"]) and not ANSWER.match(arithmetic["before"])
