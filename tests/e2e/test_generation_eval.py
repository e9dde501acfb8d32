"""Generation-based evaluation in the loop: held-out rows answered at step 0, every evaluation
and the end; logged, summarised, plotted, and written per row."""

from __future__ import annotations

import json
from pathlib import Path

from peftkit import api

TOY = Path(__file__).resolve().parents[2] / "recipes" / "tiny-llama" / "chat-skills.yaml"
# The untrained toy rambles on in its pretraining "Q: ... A: ..." style until max_new_tokens;
# trained, it answers and stops. "Stops in time" is a behaviour only training gives it.
SCORER = "def stops(answer, reference):\n    return len(answer) <= 2 * len(reference) + 4\n"


def test_answers_are_scored_before_during_and_after_training(tmp_path):
    (tmp_path / "score.py").write_text(SCORER)
    out = tmp_path / "run"
    api.train(
        TOY,
        [
            f"output.dir={out}",
            "train.max_steps=30",
            "train.eval_every=15",
            "data.max_eval_rows=12",
            "eval.metric=python",
            f"eval.function={tmp_path / 'score.py'}:stops",
            "eval.max_new_tokens=24",
            "eval.batch_size=5",  # several batches of left-padded prompts
            "output.sample_prompts=[]",
        ],
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scored = [(r["step"], r["answer_score"]) for r in records if "answer_score" in r]
    assert [step for step, _ in scored] == [0, 15, 30]
    summary = json.loads((out / "summary.json").read_text())["answers"]
    assert summary["metric"] == "python" and summary["rows"] == 12
    assert summary["score_before"] == scored[0][1] and summary["score_after"] == scored[-1][1]
    assert summary["score_before"] <= 0.25 < 0.75 <= summary["score_after"]
    rows = json.loads((out / "answers.json").read_text())
    assert len(rows) == 12 and {"prompt", "reference", "before", "after"} <= rows[0].keys()
    assert sum(r["score_after"] for r in rows) / 12 == summary["score_after"]
    # the reference is the eval row's last assistant turn, without its end-of-turn token
    eval_file = TOY.parent.parent / "data" / "quickstart-eval.jsonl"
    first_eval = json.loads(eval_file.read_text().splitlines()[0])
    assert rows[0]["reference"] == first_eval["messages"][-1]["content"]
