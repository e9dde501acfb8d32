"""Agent rows: bad tool calls and results are named errors with file and line (in memory and
through the data cache), templates that ignore tools are refused, peftkit's fallback renders
them, and `data.tools` / sharegpt function calls reach the template."""

from __future__ import annotations

import copy
import json

import pytest
from transformers import AutoTokenizer

from peftkit.data.chat import resolve_chat_template
from peftkit.data.encode import IGNORE, Encoder
from peftkit.data.formats import to_example
from peftkit.data.pipeline import prepare_data
from peftkit.data.sources import RawRow
from peftkit.errors import DataError
from peftkit.recipe.schema import DataSpec
from tests.conftest import write_jsonl

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "send_order",
            "description": "Place an order.",
            "parameters": {"type": "object", "properties": {"item": {"type": "string"}}},
        },
    }
]


def agent_row() -> dict:
    return {
        "tools": TOOLS,
        "messages": [
            {"role": "user", "content": "hello world"},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "send_order", "arguments": '{"item": "tea"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": {"status": "ok"}},
            {"role": "assistant", "content": "I am fine, thank you!"},
        ],
    }


def broken(kind: str) -> dict:
    row = agent_row()
    call = row["messages"][1]["tool_calls"][0]
    if kind == "no_call":
        row["messages"][2]["tool_call_id"] = "c9"
    elif kind == "not_json":
        call["function"]["arguments"] = '{"item": tea'
    elif kind == "unknown_tool":
        call["function"]["name"] = "send_ordr"
    elif kind == "result_first":
        row["messages"].insert(1, {"role": "tool", "content": "early"})
    return row


BAD = {
    "no_call": r"turn 2 is a tool result for 'c9' that answers no earlier tool call",
    "not_json": r"turn 1 tool call 0 arguments is not JSON",
    "unknown_tool": r"turn 1 tool call 0 calls 'send_ordr', which is not in the tools list .*did you mean 'send_order'",
    "result_first": r"turn 1 is a tool result that answers no earlier tool call",
}


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_agent_rows_name_file_and_line(
    tmp_path, monkeypatch, tokenizers_by_template, kind, cache
):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    path = write_jsonl(tmp_path / "rows.jsonl", [agent_row(), agent_row(), broken(kind)])
    tokenizer = AutoTokenizer.from_pretrained(tokenizers_by_template["chatml"])
    spec = DataSpec(train=str(path), chat_template="fallback", cache=cache, num_proc=1)
    with pytest.raises(DataError, match=rf"{path} line 3: not a valid messages row: {BAD[kind]}"):
        prepare_data(spec, tokenizer, seed=0)


# ChatML that lists the tools but drops the calls and the results
TOOLS_ONLY = (
    "{% if tools %}{{ '<|im_start|>system\\n' }}{% for t in tools %}{{ t | tojson }}{% endfor %}"
    "{{ '<|im_end|>\\n' }}{% endif %}{% for m in messages %}{% if m.role != 'tool' %}"
    "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.mark.parametrize("template", ["chatml", "llama3", "plain", "tools_only"])
def test_templates_that_ignore_tools_are_refused(tokenizers_by_template, template):
    folder = tokenizers_by_template["chatml" if template == "tools_only" else template]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    resolve_chat_template(tokenizer, TOOLS_ONLY if template == "tools_only" else "auto")
    example = to_example(RawRow(agent_row(), "rows.jsonl line 4"), "messages", None)
    with pytest.raises(DataError, match=r"rows.jsonl line 4: the chat template ignores") as e:
        Encoder(tokenizer, "completion").encode(example)
    assert "data.chat_template: fallback" in str(e.value)
    if template == "tools_only":  # it lists the tools: what it drops is named
        assert "ignores tool calls and tool results" in str(e.value)
        return
    # only the tools list, no calls: refused too (the model would never see the functions)
    only_tools = {
        "tools": TOOLS,
        "messages": [*agent_row()["messages"][:1], agent_row()["messages"][3]],
    }
    example = to_example(RawRow(only_tools, "rows.jsonl line 5"), "messages", None)
    with pytest.raises(DataError, match="ignores the tools list"):
        Encoder(tokenizer, "completion").encode(example)


def test_fallback_template_renders_tools_calls_and_results(tokenizers_by_template):
    tokenizer = AutoTokenizer.from_pretrained(tokenizers_by_template["chatml"])
    resolve_chat_template(tokenizer, "fallback")
    encoder = Encoder(tokenizer, "completion")
    example = to_example(RawRow(agent_row(), "rows.jsonl line 1"), "messages", None)
    text = encoder.render(copy.deepcopy(example)).text
    assert json.dumps(TOOLS[0]) in text  # the functions, as the template got them
    call = '<tool_call>{"name": "send_order", "arguments": {"item": "tea"}}</tool_call>'
    assert "### Tool result:\n" + json.dumps({"status": "ok"}) in text
    row = encoder.encode(example)
    supervised = tokenizer.decode(row.input_ids[row.labels != IGNORE])
    assert supervised == call + "<|endoftext|>I am fine, thank you!<|endoftext|>"
    assert encoder.stop_tokens == {"<|endoftext|>"}
    # without tools the fallback writes exactly what it wrote before it knew them
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert encoder.render(to_example(RawRow({"messages": plain}, "x"), "messages", None)).text == (
        "<|begin_of_text|>### User:\nhi\n\n### Assistant:\nyo<|endoftext|>\n\n"
    )


def test_data_tools_apply_to_rows_without_their_own(tmp_path, tokenizers_by_template):
    row = agent_row()
    del row["tools"]
    path = write_jsonl(tmp_path / "rows.jsonl", [row] * 3)
    tokenizer = AutoTokenizer.from_pretrained(tokenizers_by_template["chatml"])
    bare = [{"name": "send_order", "parameters": {"type": "object"}}]  # wrapped as a function
    spec = DataSpec(train=str(path), chat_template="fallback", cache=False, tools=bare)
    data = prepare_data(spec, tokenizer, seed=0)
    text = tokenizer.decode(data.train[0].input_ids)
    assert '{"type": "function", "function": {"name": "send_order"' in text
    wrong = DataSpec(
        train=str(path),
        chat_template="fallback",
        cache=False,
        tools=[*TOOLS[:0], {"name": "other"}],
    )
    with pytest.raises(DataError, match=f"{path} line 1: .*not in the tools list"):
        prepare_data(wrong, tokenizer, seed=0)


def test_sharegpt_function_call_and_observation_turns():
    data = {
        "tools": json.dumps(TOOLS),  # LLaMA-Factory writes the list as a JSON string
        "conversations": [
            {"from": "human", "value": "order tea"},
            {
                "from": "function_call",
                "value": '{"name": "send_order", "arguments": {"item": "tea"}}',
            },
            {"from": "observation", "value": '{"status": "ok"}'},
            {"from": "gpt", "value": "Done."},
        ],
    }
    messages = to_example(RawRow(data, "rows.jsonl line 1"), "sharegpt", None).messages
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[1]["tool_calls"][0]["function"] == {
        "name": "send_order",
        "arguments": {"item": "tea"},
    }
    assert messages[2]["name"] == "send_order"  # filled in from the call it answers


def test_inline_think_becomes_reasoning_content():
    data = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "<think>\nstep one\n</think>\n\nthe answer"},
        ]
    }
    message = to_example(RawRow(data, "x"), "messages", None).messages[1]
    assert message == {
        "role": "assistant",
        "content": "the answer",
        "reasoning_content": "step one",
    }


@pytest.mark.parametrize("cache", [False, True])
def test_audit_shows_tool_calls_results_and_reasoning_apart(
    tmp_path, monkeypatch, tokenizers_by_template, cache
):
    from peftkit.data.audit import audit_lines, audit_record
    from peftkit.report.run_page import _audit

    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    row = agent_row()
    row["messages"][3]["reasoning_content"] = "thinking it over"
    path = write_jsonl(tmp_path / "rows.jsonl", [row] * 2)
    tokenizer = AutoTokenizer.from_pretrained(tokenizers_by_template["chatml"])
    spec = DataSpec(train=str(path), chat_template="fallback", cache=cache, num_proc=1)
    data = prepare_data(spec, tokenizer, seed=0)
    shown = audit_record(data, tokenizer, "causal_lm", None)["rows"][0]
    by_part: dict[str, list[tuple[str, bool]]] = {}
    for (text, supervised), part in zip(shown["segments"], shown["parts"]):
        by_part.setdefault(part, []).append((text, supervised))
    call = '<tool_call>{"name": "send_order", "arguments": {"item": "tea"}}</tool_call>'
    assert by_part["tool_call"] == [(call, True)]
    assert by_part["tool_result"] == [('{"status": "ok"}', False)]
    assert by_part["reasoning"] == [("thinking it over", True)]
    assert "«tool call: " + call + "»" in "\n".join(audit_lines(data, tokenizer, "causal_lm", None))
    page = _audit(audit_record(data, tokenizer, "causal_lm", None) | {"splits": []})
    assert "class='part tool_result'" in page and "class='part reasoning'" in page
