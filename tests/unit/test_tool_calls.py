"""Generated text back into OpenAI tool calls, reasoning and content, per template family."""

from __future__ import annotations

import json

import pytest

from peftkit.data.tool_calls import (
    ReplyStream,
    UnknownToolFormat,
    call_opener,
    detect_family,
    parse_reply,
    parse_tool_calls,
    require_family,
    split_reasoning,
)
from tests.conftest import CHATML, LLAMA3

# the tool parts of the families' published templates (abridged)
HERMES_T = (
    "{%- if tools %}<tools>{{ tools | tojson }}</tools> reply in <tool_call></tool_call>{% endif %}"
)
LLAMA31_T = (
    '<|start_header_id|>ipython<|end_header_id|>{"name": function name, "parameters": ...}'
    "{%- if message.tool_calls %}<|python_tag|>{% endif %}"
)
MISTRAL_T = (
    "[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% if calls %}[TOOL_CALLS]{% endif %}"
)


def calls_of(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_the_family_is_read_off_the_template():
    assert detect_family(HERMES_T) == "hermes"
    assert detect_family(LLAMA31_T) == "llama3"
    assert detect_family(MISTRAL_T) == "mistral"
    assert detect_family(CHATML) is None and detect_family(LLAMA3) is None
    assert detect_family(None) is None
    with pytest.raises(UnknownToolFormat, match="no format peftkit can parse"):
        require_family(CHATML)


def test_hermes_one_call_several_calls_and_text_around():
    one = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    content, calls = parse_tool_calls(one, "hermes")
    assert content == "" and calls_of(calls) == [("get_weather", {"city": "Paris"})]
    call = calls[0]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert isinstance(call["function"]["arguments"], str)  # a JSON string, as OpenAI sends
    two = (
        'Let me look.\n<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>\n'
        '<tool_call>{"name": "b", "arguments": {}}</tool_call>'
    )
    content, calls = parse_tool_calls(two, "hermes")
    assert content == "Let me look." and calls_of(calls) == [("a", {"x": 1}), ("b", {})]
    assert calls[0]["id"] != calls[1]["id"]
    # a call cut by the stop token before its closing tag still counts
    _, calls = parse_tool_calls('<tool_call>{"name": "a", "arguments": {"x": [1, 2]}}', "hermes")
    assert calls_of(calls) == [("a", {"x": [1, 2]})]
    # arguments written as a JSON string are read as the object they hold
    _, calls = parse_tool_calls('<tool_call>{"name": "a", "arguments": "{\\"x\\": 1}"}', "hermes")
    assert calls_of(calls) == [("a", {"x": 1})]


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>{"name": "a", "arguments": {"x": 1}</tool_call>',  # bad JSON
        '<tool_call>{"arguments": {"x": 1}}</tool_call>',  # no name
        '<tool_call>{"name": "a", "arguments": [1]}</tool_call>',  # arguments not an object
        '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>oops</tool_call>',
        '{"name": "a", "arguments": {}, "extra": 1}',  # not a call's keys
        '{"name": "Ada Byron"}',  # an answer in JSON with a name field
        '<tool_call>{"name": "a"}</tool_call>',  # no arguments
        "no call here",
    ],
)
def test_a_malformed_hermes_call_is_text(text):
    assert parse_tool_calls(text, "hermes") == (text, [])


def test_llama3_json_with_and_without_the_python_tag():
    text = '<|python_tag|>{"name": "search", "parameters": {"q": "peft"}}'
    assert calls_of(parse_tool_calls(text, "llama3")[1]) == [("search", {"q": "peft"})]
    # decoding drops the special tag: the JSON alone is the call
    bare = '{"name": "search", "parameters": {"q": "peft"}}; {"name": "now", "parameters": {}}'
    content, calls = parse_tool_calls(bare, "llama3")
    assert content == "" and calls_of(calls) == [("search", {"q": "peft"}), ("now", {})]
    prose = 'I would call {"name": "search", "parameters": {}}'
    assert parse_tool_calls(prose, "llama3") == (prose, [])
    broken = '{"name": "search", "parameters": {"q": }'
    assert parse_tool_calls(broken, "llama3") == (broken, [])


def test_mistral_tool_calls_list_and_ids():
    text = '[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]'
    content, calls = parse_tool_calls(text, "mistral")
    assert content == "" and calls_of(calls) == [("a", {"x": 1}), ("b", {})]
    # Mistral's templates accept 9-character alphanumeric ids only
    assert all(len(c["id"]) == 9 and c["id"].isalnum() for c in calls)
    bare = '[{"name": "a", "arguments": {"x": 1}}]'  # [TOOL_CALLS] dropped by decoding
    assert calls_of(parse_tool_calls(bare, "mistral")[1]) == [("a", {"x": 1})]
    newer = '[TOOL_CALLS]a[ARGS]{"x": 1}'
    assert calls_of(parse_tool_calls(newer, "mistral")[1]) == [("a", {"x": 1})]
    broken = '[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}'
    assert parse_tool_calls(broken, "mistral") == (broken, [])


def test_reasoning_is_split_from_content():
    text = "<think>\nThe user wants weather.\n</think>\n\nIt is sunny."
    assert split_reasoning(text) == ("The user wants weather.", "It is sunny.")
    assert split_reasoning("plain") == (None, "plain")
    # the prompt opened the block: the answer starts inside it
    assert split_reasoning("hmm</think>ok", started=True) == ("hmm", "ok")
    assert split_reasoning("<think>never closed") == ("never closed", "")
    reply = parse_reply(
        '<think>use the tool</think><tool_call>{"name": "a", "arguments": {}}</tool_call>',
        "hermes",
        reasoning=True,
    )
    assert reply.reasoning == "use the tool" and reply.content == ""
    assert calls_of(reply.tool_calls) == [("a", {})]
    # without `reasoning` (a template that knows no <think>) the text stays content
    assert parse_reply("<think>x</think>y", None).content == "<think>x</think>y"


@pytest.mark.parametrize("family", ["hermes", "llama3", "mistral"])
def test_the_call_opener_leads_to_the_named_call(family):
    rest = '{"x": 1}}' + {"hermes": "</tool_call>", "llama3": "", "mistral": "]"}[family]
    text = call_opener(family, "get") + rest
    assert calls_of(parse_tool_calls(text, family)[1]) == [("get", {"x": 1})]
    free = call_opener(family) + 'get", "' + ("parameters" if family == "llama3" else "arguments")
    assert calls_of(parse_tool_calls(free + '": ' + rest, family)[1]) == [("get", {"x": 1})]


STREAMED = [
    ("hermes", False, False, 'Sure.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>'),
    ("hermes", True, False, '<think>plan it</think>\n<tool_call>{"name": "a", "arguments": {}}</tool_call>'),
    ("hermes", True, True, "thinking...</think>The answer is <b>4</b>."),
    ("hermes", False, False, '<tool_call>{"name": "a", "arguments": {</tool_call> after'),
    ("hermes", False, False, '{"name": "a", "arguments": {"k": "v"}}'),
    ("hermes", False, False, "just text with < and <tool in it"),
    ("llama3", False, False, '<|python_tag|>{"name": "s", "parameters": {"q": "x"}}'),
    ("llama3", False, False, '{"name": "s", "parameters": {}}; {"name": "t", "parameters": {}}'),
    ("llama3", False, False, "{not json at all"),
    ("mistral", False, False, 'ok [TOOL_CALLS][{"name": "a", "arguments": {"y": [1]}}]'),
    ("mistral", False, False, "[1] is a footnote"),
    (None, True, False, "<think>a</think>b"),
]  # fmt: skip


def _squash(text: str | None) -> str:
    return " ".join((text or "").split())


@pytest.mark.parametrize(("family", "reasoning", "started", "text"), STREAMED)
def test_streamed_deltas_add_up_to_the_whole_text_parse(family, reasoning, started, text):
    whole = parse_reply(text, family, reasoning, started)
    for size in (1, 3, 7, len(text)):
        stream = ReplyStream(family, reasoning, started)
        deltas = []
        for i in range(0, len(text), size):
            deltas += stream.feed(text[i : i + size])
        deltas += stream.finish()
        content = "".join(d.get("content", "") for d in deltas)
        thought = "".join(d.get("reasoning_content", "") for d in deltas)
        calls = [c for d in deltas for c in d.get("tool_calls", [])]
        assert _squash(content) == _squash(whole.content), (size, deltas)
        assert _squash(thought) == _squash(whole.reasoning)
        assert calls_of(calls) == calls_of(whole.tool_calls)
        assert [c["index"] for c in calls] == list(range(len(calls)))
        plain = not any(m in text for m in ("<tool_call>", "[TOOL_CALLS]", "{", "["))
        if plain and size == 1 and len(whole.content) > 3:
            assert len([d for d in deltas if d.get("content")]) > 1  # text still streams


def _published(name: str) -> str:
    """A chat template as its model publishes it (the copies TRL ships)."""
    trl = pytest.importorskip("trl")
    from pathlib import Path

    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text()


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("qwen2_5", "hermes"),
        ("qwen3", "hermes"),
        ("llama3_1", "llama3"),
        ("llama3_2", "llama3"),
        ("llama3", None),  # Llama 3.0: no tools
        ("gemma", None),
    ],
)
def test_the_family_of_published_templates(name, family):
    assert detect_family(_published(name)) == family


def test_the_tool_probe_on_published_templates(tiny_model):
    from transformers import AutoTokenizer

    from peftkit.data.tool_calls import NoToolSupport, tool_family

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    messages = [{"role": "user", "content": "Weather?"}]
    for name, family in (("qwen2_5", "hermes"), ("llama3_1", "llama3")):
        template = _published(name)
        rendered = tokenizer.apply_chat_template(
            messages, tools=tools, chat_template=template, tokenize=False
        )
        assert tool_family(template, rendered, tools) == family
    plain = _published("llama3")
    rendered = tokenizer.apply_chat_template(
        messages, tools=tools, chat_template=plain, tokenize=False
    )
    with pytest.raises(NoToolSupport, match="the tools get_weather do not appear"):
        tool_family(plain, rendered, tools)


QWEN_ANSWERS = [
    '<think>\nplan\n</think>\n\nLooking.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n'
    '</tool_call>\n<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>',
    '<tool_call>\n{"name": "a", "arguments": {"x": [1, {"y": "z"}], "s": "é"}}\n</tool_call>',
    "<think>\nhmm\n</think>\n\nIt is sunny.",
    "Just text, no call.",
]


@pytest.mark.parametrize("text", QWEN_ANSWERS)
def test_hermes_parses_as_transformers_serve_does(text, tiny_model):
    """transformers' own server parses Qwen answers with a response template; ours agrees."""
    serving = pytest.importorskip("transformers.cli.serving.utils")
    from transformers import AutoTokenizer

    qwen = next(v for k, v in serving._RESPONSE_TEMPLATE_FALLBACKS.items() if "qwen3" in k)
    theirs = AutoTokenizer.from_pretrained(tiny_model).parse_response(text, qwen, prefix="")
    ours = parse_reply(text, "hermes", reasoning=True)
    assert ours.reasoning == theirs.get("reasoning_content")
    assert ours.content == theirs.get("content", "")
    expected = [
        (c["function"]["name"], c["function"]["arguments"]) for c in theirs.get("tool_calls", [])
    ]
    assert calls_of(ours.tool_calls) == expected
