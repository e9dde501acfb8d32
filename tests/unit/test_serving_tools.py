"""How a chat request's tools and tool_choice decide the prompt's prefill and the answer's calls."""

from __future__ import annotations

import pytest

from peftkit.serving import protocol as p
from peftkit.serving.tools import plan_tools

HERMES_T = "{{ tools | tojson }} <tool_call></tool_call>"
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "get_time"}},
]
RENDERED = "tools: get_weather get_time\nassistant:"


def byte_tokenizer(text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
    return {"input_ids": list(text.encode())}


def plan(template: str = HERMES_T, rendered: str = RENDERED, **request):
    req = p.ChatRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, **request}
    )
    return plan_tools(req, template, rendered, byte_tokenizer)


def call(name: str, args: str = "{}") -> str:
    return f'<tool_call>{{"name": "{name}", "arguments": {args}}}</tool_call>'


def test_auto_reads_calls_and_prefills_nothing():
    tools, prefill = plan()
    assert prefill == [] and tools.family == "hermes"
    reply = tools.reply(call("get_time") + call("get_weather"))
    assert [c["function"]["name"] for c in reply.tool_calls] == ["get_time", "get_weather"]
    assert tools.reply("just words").content == "just words"


def test_parallel_tool_calls_false_keeps_the_first_call():
    tools, _ = plan(parallel_tool_calls=False)
    reply = tools.reply(call("get_time") + call("get_weather"))
    assert [c["function"]["name"] for c in reply.tool_calls] == ["get_time"]


def test_a_named_function_is_prefilled_and_its_call_required():
    tools, prefill = plan(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    opener = '<tool_call>\n{"name": "get_weather", "arguments": '
    assert bytes(prefill).decode() == opener and tools.prefill == opener
    reply = tools.reply('{"city": "Oslo"}}</tool_call>')  # the prefill is part of the answer
    assert [c["function"]["arguments"] for c in reply.tool_calls] == ['{"city": "Oslo"}']
    with pytest.raises(p.ApiError, match="function 'get_weather'") as caught:
        tools.reply("{broken")
    assert caught.value.status == 422


def test_required_accepts_any_tool_of_the_request_only():
    tools, prefill = plan(tool_choice="required")
    assert bytes(prefill).decode() == '<tool_call>\n{"name": "'
    assert tools.reply('get_time", "arguments": {}}</tool_call>').tool_calls
    with pytest.raises(p.ApiError, match="one of the tools") as caught:
        tools.reply('rm_rf", "arguments": {}}</tool_call>')
    assert caught.value.status == 422


def test_tool_choice_none_reads_no_calls():
    tools, prefill = plan(tool_choice="none")
    assert prefill == [] and tools.family is None
    assert tools.reply(call("get_time")).tool_calls == []


@pytest.mark.parametrize(
    ("template", "rendered", "needle"),
    [
        (HERMES_T, "assistant:", "has no tool support (the tools get_weather, get_time"),
        ("{{ tools | tojson }}", RENDERED, "no format peftkit can parse"),
    ],
)
def test_templates_without_usable_tool_support_are_400(template, rendered, needle):
    with pytest.raises(p.ApiError, match="tools: `m`") as caught:
        plan(template, rendered)
    assert caught.value.status == 400 and needle in caught.value.message
