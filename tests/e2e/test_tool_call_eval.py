"""`eval.metric: tool_call` in a training run: held-out rows whose answer is a tool call are
answered greedily and scored by the calls parsed in the format of the recipe's chat template.
The rows' calls are written as assistant text in the template's format, so the test does not
depend on how `tool_calls` rows are rendered."""

from __future__ import annotations

import json
from pathlib import Path

from peftkit import api
from tests.e2e.test_serve_tools import HERMES

TOY = Path(__file__).resolve().parents[2] / "recipes" / "tiny-llama" / "chat-skills.yaml"
CITIES = ["Paris", "Oslo", "Rome", "Lima", "Kyiv", "Cairo", "Quito", "Bern"]


def _call(city: str) -> str:
    return (
        f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{city}"}}}}\n</tool_call>'
    )


def _rows(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(n):
        city = CITIES[(i + offset) % len(CITIES)]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Weather in {city}?"},
                    {"role": "assistant", "content": _call(city)},
                ]
            }
        )
    # a held-out row that answers in words is not scored by tool_call
    words = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    return [*rows, {"messages": words}]


def test_tool_call_metric_scores_the_calls_of_held_out_rows(tmp_path):
    for name, rows in {"train": _rows(16), "eval": _rows(8, offset=3)}.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "hermes.jinja").write_text(HERMES)
    out = tmp_path / "run"
    api.train(
        TOY,
        [
            f"output.dir={out}",
            f"data.train={tmp_path / 'train.jsonl'}",
            f"data.eval={tmp_path / 'eval.jsonl'}",
            f"data.chat_template={tmp_path / 'hermes.jinja'}",
            "train.max_steps=2",  # the wiring, not the learning (unit tests check the scores)
            "train.eval_every=null",
            "eval.metric=tool_call",
            "eval.max_new_tokens=8",
            "output.sample_prompts=[]",
            "output.plot=false",
        ],
    )
    summary = json.loads((out / "summary.json").read_text())["answers"]
    assert summary["metric"] == "tool_call" and summary["rows"] == 8  # the calls only
    rows = json.loads((out / "answers.json").read_text())
    assert len(rows) == 8  # the eval row answered in words is left out
    assert all(r["reference"].startswith("<tool_call>") for r in rows)
    # the toy writes no call (and 8 tokens hold none): every figure is there, and zero
    figures = ("score", "call_parsed", "name_accuracy", "field_accuracy")
    assert {summary[f"{f}_{when}"] for f in figures for when in ("before", "after")} == {0.0}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum("answer_call_parsed" in r for r in records) == 2  # step 0 and the end
