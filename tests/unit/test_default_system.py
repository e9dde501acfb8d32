"""`with_default_system`: a chat template whose default system turn is training's system prompt,
checked by rendering on the real SmolLM2 template, a Qwen2.5-style (ChatML) one and Llama-3-style
ones: without a system message it renders what the original renders with the prompt given; with
one, exactly what the original renders."""

from __future__ import annotations

import pytest

from peftkit.data.default_system import (
    REPLACED,
    WRAPPED,
    TemplateNotTransformable,
    tokenizer_renderer,
    with_default_system,
)
from tests.conftest import CHATML, LLAMA3, build_tokenizer

SMOLLM_DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QWEN_DEFAULT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN25 = (  # Qwen2.5-Instruct's layout: its default written twice (with and without tools)
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] }}{%- else %}{{- '" + QWEN_DEFAULT + "' }}{%- endif %}"
    '{{- "\\n\\n# Tools\\n<tools>" }}{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}'
    '{%- endfor %}{{- "\\n</tools><|im_end|>\\n" }}{%- else %}'
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}"
    "{{- '<|im_start|>system\\n" + QWEN_DEFAULT + "<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- for message in messages %}{%- if (message.role == 'user') or (message.role == 'system' "
    "and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)
LLAMA31 = (  # Llama-3.1's layout: a system header always, its date lines before the prompt
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}"
    '{%- else %}{%- set system_message = "" %}{%- endif %}'
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}'
    '{{- "Cutting Knowledge Date: December 2023\\n\\n" }}{{- system_message }}{{- "<|eot_id|>" }}'
    "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
TEXT_DEFAULT = (  # the default written as the template's text, not a string literal
    "{% if messages[0]['role'] != 'system' %}system: Be helpful.\n{% endif %}"
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
SYSTEM = 'Extract the order as "JSON" (it\'s {{ not jinja }}), \\n stays;\nsecond line: ü'
CHATS = [
    [{"role": "user", "content": "Hello"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hey"},
        {"role": "user", "content": "More"},
    ],
]


@pytest.fixture(scope="module")
def render(tmp_path_factory):
    return tokenizer_renderer(build_tokenizer(tmp_path_factory.mktemp("tok"), CHATML))


def smollm2_template() -> str:
    """The chat template inside the SmolLM2-135M-Instruct GGUF that builtin:smollm2-135m is."""
    import gguf

    from peftkit.models.builtin import packaged_gguf

    field = gguf.GGUFReader(str(packaged_gguf("smollm2-135m"))).fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode()


def assert_renders_as_training(template: str, original: str, render) -> None:
    for chat in CHATS:
        given = [{"role": "system", "content": SYSTEM}, *chat]
        assert render(template, chat, True) == render(original, given, True)
        mine = [{"role": "system", "content": "Be brief."}, *chat]
        assert render(template, mine, True) == render(original, mine, True)


def test_the_real_smollm2_default_is_replaced_in_place(render):
    original = smollm2_template()
    assert SMOLLM_DEFAULT in original
    result = with_default_system(original, SYSTEM, render)
    assert (result.how, result.replaced_default) == (REPLACED, SMOLLM_DEFAULT)
    assert SMOLLM_DEFAULT not in result.template
    assert result.template.count("{%") == original.count("{%")  # no block added
    assert_renders_as_training(result.template, original, render)
    assert SYSTEM in render(result.template, CHATS[0], True)


@pytest.mark.parametrize(
    "original, how, own",
    [
        (QWEN25, WRAPPED, QWEN_DEFAULT),  # written twice: not replaced in place
        (CHATML, WRAPPED, None),  # no default of its own
        (LLAMA3, WRAPPED, None),
        (LLAMA31, WRAPPED, None),  # a system header always, empty by default
        (TEXT_DEFAULT, REPLACED, "Be helpful."),
    ],
    ids=["qwen2.5", "chatml", "llama-3", "llama-3.1", "text-default"],
)
def test_other_templates_render_the_training_prompt_by_default(render, original, how, own):
    result = with_default_system(original, SYSTEM, render)
    assert (result.how, result.replaced_default) == (how, own)
    assert_renders_as_training(result.template, original, render)
    if own:
        assert own not in render(result.template, CHATS[0], True)


def test_a_template_that_refuses_system_turns_cannot_get_one(render):
    refuses = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}"
        "{% endif %}" + CHATML
    )
    with pytest.raises(TemplateNotTransformable, match="system turn"):
        with_default_system(refuses, SYSTEM, render)


def test_template_variables_become_defaults_a_caller_can_still_override():
    from jinja2 import Environment

    from peftkit.data.default_system import with_default_variables

    template = "{{ enable_thinking }}|{{ style }}|{{ tags | join(',') }}|{{ extra['k'] }}"
    values = {
        "enable_thinking": False,
        "style": 'it\'s "short"\n',
        "tags": ["a", 1],
        "extra": {"k": None},
    }
    wrapped = Environment().from_string(with_default_variables(template, values))
    assert wrapped.render() == 'False|it\'s "short"\n|a,1|None'
    assert wrapped.render(enable_thinking=True).startswith("True|")
