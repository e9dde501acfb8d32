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


ROOT = Path(__file__).resolve().parents[2]


def _agent_rows(name: str, n: int) -> list[dict]:
    """The shipped agent chats (structured `tool_calls`, a tool result, the confirmation), with
    the tools list cut to the function's name (its schema alone outgrows the tiny model)."""
    lines = (ROOT / "recipes" / "data" / f"tools-{name}.jsonl").read_text().splitlines()[:n]
    rows = [json.loads(line) for line in lines]
    for row in rows:
        row["tools"] = [{"type": "function", "function": {"name": "send_order"}}]
    return rows


def _hermes_call(row: dict, **changed) -> str:
    """The row's reference call as the fallback template writes one (`<tool_call>` JSON)."""
    (call,) = next(m["tool_calls"] for m in row["messages"] if m.get("tool_calls"))
    arguments = {**json.loads(call["function"]["arguments"]), **changed}
    body = json.dumps({"name": call["function"]["name"], "arguments": arguments})
    return f"<tool_call>{body}</tool_call>"


def test_tool_call_metric_scores_structured_rows_on_the_call_turn(tmp_path, tiny_model):
    from peftkit.data.chat import FALLBACK_TEMPLATE
    from peftkit.objectives.answer_metrics import ToolCallMetric
    from tests.conftest import write_jsonl, write_recipe

    train = write_jsonl(tmp_path / "train.jsonl", _agent_rows("train", 8))
    eval_rows = _agent_rows("eval", 6)
    evals = write_jsonl(tmp_path / "eval.jsonl", eval_rows)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_model,
        train,
        data={"train": str(train), "eval": str(evals), "max_length": 512},
        train={"max_steps": 1, "micro_batch_size": 4, "precision": "fp32", "eval_every": None},
    )
    out = tmp_path / "run"
    api.train(
        recipe,
        [
            "data.chat_template=fallback",
            "eval.metric=tool_call",
            "eval.max_new_tokens=4",  # the wiring: the random model writes no call anyway
            "output.sample_prompts=[]",
        ],
    )
    summary = json.loads((out / "summary.json").read_text())["answers"]
    assert summary["metric"] == "tool_call" and summary["rows"] == len(eval_rows)
    assert {"call_parsed_after", "name_accuracy_after", "field_accuracy_after"} <= set(summary)
    answers = json.loads((out / "answers.json").read_text())
    metric = ToolCallMetric(FALLBACK_TEMPLATE)
    for row, answer in zip(eval_rows, answers):
        # the prompt is the chat up to the call: the tools list, the request, no tool result
        request = [m for m in row["messages"] if m["role"] == "user"][-1]["content"]
        assert answer["prompt"].startswith("### Tools:\n{") and "send_order" in answer["prompt"]
        assert answer["prompt"].rstrip().endswith(request + "\n\n### Assistant:")
        assert "### Tool result" not in answer["prompt"]
        # the reference is the row's structured call, parsed back from the template's text
        (call,) = next(m["tool_calls"] for m in row["messages"] if m.get("tool_calls"))
        assert metric.calls(answer["reference"]) == [
            ("send_order", json.loads(call["function"]["arguments"]))
        ]
        assert metric(_hermes_call(row), answer["reference"]) == {
            "score": 1.0,
            "name_accuracy": 1.0,
            "field_accuracy": 1.0,
            "call_parsed": 1.0,
        }
        wrong = metric(_hermes_call(row, quantity=99), answer["reference"])
        assert wrong["score"] == 0.0 and wrong["field_accuracy"] == 0.8  # 4 of 5 arguments
