"""report.html's building blocks, on hand-written run files: which curves a run's records give,
and that nothing a run holds (recipe text, data rows, answers) can break out of the page."""

from __future__ import annotations

import json
import re

from peftkit.metrics import smooth
from peftkit.report.run_page import run_charts, write_run_report

RECORDS = [
    {"step": 0, "eval_loss": 3.0, "eval_loss/a": 2.0, "eval_loss/b": 4.0, "reference_loss": 1.0},
    *({"step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-3, "tokens_per_s": 100.0} for s in range(1, 13)),
    {"step": 12, "eval_loss": 2.0, "eval_loss/a": 1.5, "eval_loss/b": 2.5, "reference_loss": 1.2},
    {"step": 12, "answer_score": 0.5, "answer_field_accuracy": 0.75, "eval_accuracy": 0.9},
]


def _series(charts, chart_id):
    (chart,) = [c for c in charts if c["id"] == chart_id]
    return {s["name"]: s for s in chart["series"]}


def test_run_charts_hold_every_logged_curve_with_its_points():
    charts = run_charts(RECORDS)
    loss = _series(charts, "loss")
    assert len(loss["train loss"]["points"]) == 12
    k, values = smooth([r["loss"] for r in RECORDS if "loss" in r])  # loss.png's smoothing
    assert [v for _, v in loss[f"train loss (mean of {k})"]["points"]] == values
    assert loss["eval loss"]["points"] == [[0, 3.0], [12, 2.0]]
    assert loss["eval loss: a"]["points"] == [[0, 2.0], [12, 1.5]]
    assert loss["reference loss"]["axis"] == "y2"  # its own axis
    answers = _series(charts, "answers")
    assert answers["score"]["points"] == [[12, 50.0]]  # percent
    assert answers["field accuracy"]["points"] == [[12, 75.0]]
    assert _series(charts, "eval-metrics")["accuracy"]["points"] == [[12, 0.9]]
    assert len(_series(charts, "lr")["lr"]["points"]) == 12


def test_nothing_in_a_run_breaks_out_of_the_page(tmp_path):
    hostile = "</script><script>alert(1)</script><b>bold</b>"
    (tmp_path / "recipe.yaml").write_text(f"name: {json.dumps(hostile)}\n")
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "loss": 1.0, "note": hostile}) + "\nnot json, cut by a kill\n"
    )
    audit = {
        "splits": [{"split": "train", "rows_kept": 1}],
        "task_type": "causal_lm",
        "class_names": None,
        "chat_template_source": "tokenizer",
        "stop_tokens": ["<|im_end|>"],
        "rows": [{"origin": "x.jsonl line 1", "segments": [[hostile, False], [hostile, True]]}],
    }
    (tmp_path / "data_audit.json").write_text(json.dumps(audit))
    page = write_run_report(tmp_path).read_text()
    assert "<b>bold</b>" not in page and "alert(1)</script>" not in page
    assert page.count("<script") == 2  # the data block and the chart script, nothing injected
    assert "&lt;b&gt;bold&lt;/b&gt;" in page
    data = re.search(r"id='report-data'>(.*?)</script>", page, re.S).group(1)
    assert json.loads(data)["charts"][0]["series"][0]["points"] == [[1, 1.0]]
    assert "training: last logged step 1" in page  # no summary.json yet: a running job
