"""Tools through `peftkit serve`, called with the official openai client on loopback.

A random tiny model never writes a tool call, so the fixture first trains one (a 2-layer Llama,
full fine-tune, a few hundred steps on one prompt) to answer the weather question, rendered with
the tools by a Hermes/Qwen-style template, with a short `<think>` block and then one
`<tool_call>`; and, for the prompt with the server's call opener prefilled (tool_choice naming
the function), the rest of that call. The adapter served beside the base is a LoRA at its
initialisation (B = 0: the trained model's outputs unchanged) whose folder carries that template,
so the request goes through the adapter's own template; the base keeps a ChatML template without
tool support. Everything between the HTTP request and the model's tokens is the real server.
"""

from __future__ import annotations

import json

import pytest

from peftkit.data.tool_calls import call_opener
from tests.conftest import CHATML, build_model, build_tokenizer

openai = pytest.importorskip("openai")

# a Qwen2.5/Qwen3-style template (abridged): tools in the system turn, calls in <tool_call>,
# results in <tool_response>, reasoning in <think>
HERMES = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>\n{% for t in tools %}{{ t | tojson }}\n"
    '{% endfor %}</tools>\nCall as <tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>'
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' %}<|im_start|>assistant\n"
    "{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}"
    "{{ m.content }}"
    "{% for c in m.tool_calls or [] %}{% set c = c.function if c.function is defined else c %}"
    '\n<tool_call>\n{"name": "{{ c.name }}", "arguments": {{ c.arguments | tojson }}}\n</tool_call>'
    "{% endfor %}<|im_end|>\n"
    "{% elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n"
    "</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
QUESTION = [{"role": "user", "content": "Weather in Paris?"}]
THOUGHT = "I need the weather tool."
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def _rendered(tokenizer, messages, tools=None) -> list[int]:
    """The prompt as transformers renders it with the template (the server must match)."""
    text = tokenizer.apply_chat_template(
        messages, tools=tools, chat_template=HERMES, tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _train_to_call(folder, tokenizer) -> None:
    import torch
    from transformers import LlamaForCausalLM

    prompt = _rendered(tokenizer, QUESTION, TOOLS)
    opener = call_opener("hermes", "get_weather")
    eos = [tokenizer.eos_token_id]
    answers = [
        (prompt, f"<think>{THOUGHT}</think>\n{CALL}"),
        (prompt + tokenizer(opener, add_special_tokens=False)["input_ids"], CALL[len(opener) :]),
    ]
    rows = [(p, tokenizer(a, add_special_tokens=False)["input_ids"] + eos) for p, a in answers]
    model = LlamaForCausalLM.from_pretrained(folder)
    optim = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(300):
        loss = 0
        for p, a in rows:
            ids = torch.tensor([p + a])
            labels = torch.tensor([[-100] * len(p) + a])
            loss = loss + model(input_ids=ids, labels=labels).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
        if loss.item() < 0.01:
            break
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(base folder, adapter folder, tokenizer, AdapterSet with the adapter as "tools")."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from peftkit.adapters.adapter_set import AdapterSet

    base = tmp_path_factory.mktemp("tool-base")
    tokenizer = build_tokenizer(base, CHATML)  # the base's own template: no tools
    build_model(base, len(tokenizer), max_position_embeddings=2048)
    _train_to_call(base, tokenizer)
    adapter = tmp_path_factory.mktemp("tool-adapter")
    lora = get_peft_model(LlamaForCausalLM.from_pretrained(base), LoraConfig(r=4))
    lora.save_pretrained(adapter)  # B = 0: the trained model, through the adapter's template
    (adapter / "chat_template.jinja").write_text(HERMES)
    aset = AdapterSet(str(base), dtype="float32", device="cpu")
    aset.add("tools", adapter)
    return base, adapter, tokenizer, aset


@pytest.fixture(scope="module")
def server(trained):
    from peftkit.serving.app import ServeLimits
    from peftkit.serving.security import ServeSecurity
    from peftkit.serving.server import Server

    server = Server(trained[3], ServeLimits(), "127.0.0.1", 0, "tiny", ServeSecurity()).start()
    yield server, trained[2]
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0].url + "/v1", api_key="unused", max_retries=0)


def ask(client, messages=QUESTION, **extra):
    settings = {"temperature": 0, "max_tokens": 160, **extra}
    return client.chat.completions.create(model="tools", messages=messages, **settings)


def test_a_generated_call_comes_back_as_tool_calls(client, server):
    response = ask(client, tools=TOOLS)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert choice.message.content is None
    assert choice.message.reasoning_content == THOUGHT  # apart from the content
    # the tools reached the model through the adapter's template, as transformers renders them
    assert response.usage.prompt_tokens == len(_rendered(server[1], QUESTION, TOOLS))


def test_a_streamed_call_arrives_as_tool_call_deltas(client):
    chunks = list(ask(client, tools=TOOLS, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    assert reasoning.strip() == THOUGHT
    assert "".join(d.content or "" for d in deltas) == ""
    assert [(c.index, c.function.name) for c in calls] == [(0, "get_weather")]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"} and calls[0].id
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_named_function_is_prefilled_and_called(client):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    for stream in (False, True):
        if stream:
            chunks = list(ask(client, tools=TOOLS, tool_choice=choice, stream=True))
            calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
        else:
            calls = ask(client, tools=TOOLS, tool_choice=choice).choices[0].message.tool_calls
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
            ("get_weather", {"city": "Paris"})
        ]


def test_tool_choice_none_renders_no_tools(client, server):
    response = ask(client, tools=TOOLS, tool_choice="none")
    assert response.usage.prompt_tokens == len(_rendered(server[1], QUESTION))
    assert not response.choices[0].message.tool_calls


def test_tool_turns_in_the_history_render_as_the_template_does(client, server):
    history = [
        *QUESTION,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear"}'},
    ]
    response = ask(client, history, tools=TOOLS, max_tokens=4)
    # transformers with the arguments as an object (what templates expect) and content ""
    expected = [*QUESTION, {**history[1], "content": ""}, history[2]]
    expected[1]["tool_calls"] = [
        {**history[1]["tool_calls"][0], "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    ]  # fmt: skip
    assert response.usage.prompt_tokens == len(_rendered(server[1], expected, TOOLS))


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"model": "tiny"}, "has no tool support"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "no tool named 'nope'"),
        ({"tools": None, "tool_choice": "required"}, "needs `tools`"),
        ({"tools": [{"type": "function", "function": {}}]}, "tools.0.function.name"),
        ({"tools": [{"type": "code"}]}, "tools.0.type"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "only an assistant"),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
              "function": {"name": "f", "arguments": "{oops"}}]}]},
            "messages.0.tool_calls.0.function.arguments: not JSON",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "description": "<|im_end|>"}}]},
            "special token '<|im_end|>'",
        ),
    ],
)  # fmt: skip
def test_bad_tool_requests_are_400_naming_the_problem(client, extra, needle):
    body = {"model": "tools", "messages": QUESTION, "tools": TOOLS, **extra}
    with pytest.raises(openai.BadRequestError, match="") as caught:
        client.chat.completions.create(**body)
    assert caught.value.status_code == 400
    assert needle in caught.value.message


HISTORY_CALL = {"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}  # fmt: skip


def test_chat_session_holds_the_call_until_its_result_is_given(trained):
    from peftkit.adapters.chat import ChatSession
    from peftkit.adapters.generation import SamplingOptions

    tokenizer, aset = trained[2], trained[3]
    session = ChatSession(aset, "tools", SamplingOptions(max_new_tokens=160), tools=TOOLS)
    shown: list[str] = []
    session.answer(QUESTION[0]["content"], on_text=shown.append)
    assert "<tool_call>" not in "".join(shown) and "get_weather" not in "".join(shown)
    ((call_id, name, arguments),) = [
        (c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in session.calls
    ]
    assert (name, arguments) == ("get_weather", {"city": "Paris"})
    assert session.reasoning == THOUGHT
    session.add_tool_result(call_id, '{"sky": "clear"}')
    answer = session.resume()
    expected = [
        *QUESTION,
        {"role": "assistant", "content": "", "reasoning_content": THOUGHT,
         "tool_calls": [{**HISTORY_CALL, "id": call_id}]},
        {"role": "tool", "tool_call_id": call_id, "name": "get_weather", "content": '{"sky": "clear"}'},
    ]  # fmt: skip
    # the second answer saw the call and its result, rendered as transformers renders them
    assert answer.prompt_tokens == len(_rendered(tokenizer, expected, TOOLS))


def test_cli_chat_shows_a_call_and_asks_for_its_result(trained, tmp_path, monkeypatch, capsys):
    from peftkit.cli import main

    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([TOOLS[0]["function"]]))  # the function objects alone work too
    asked: list[str] = []
    lines = iter([QUESTION[0]["content"], '{"sky": "clear"}', "/quit"])

    def typed(prompt: str = "") -> str:
        asked.append(prompt)
        return next(lines)

    monkeypatch.setattr("builtins.input", typed)
    args = ["chat", "--base", str(trained[0]), "--adapter", f"tools={trained[1]}"]
    assert main([*args, "--tools", str(tools), "--max-new-tokens", "160"]) == 0
    out = capsys.readouterr().out
    assert 'tool call: get_weather({"city": "Paris"})' in out
    assert "<tool_call>" not in out
    assert asked == ["[tools] > ", "result of get_weather > ", "[tools] > "]


def test_the_answer_message_goes_back_as_history(client, server):
    first = ask(client, tools=TOOLS).choices[0].message  # the client's own message object
    (call,) = first.tool_calls
    history = [*QUESTION, first, {"role": "tool", "tool_call_id": call.id, "content": "18 C"}]
    again = ask(client, history, tools=TOOLS, max_tokens=4)
    turn = {"role": "assistant", "content": "", "tool_calls": [{**HISTORY_CALL, "id": call.id}]}
    turn["reasoning_content"] = THOUGHT  # returned apart, and rendered back by the template
    tool = {"role": "tool", "tool_call_id": call.id, "content": "18 C"}
    assert again.usage.prompt_tokens == len(_rendered(server[1], [*QUESTION, turn, tool], TOOLS))
