"""The workarounds in peftkit/_compat.py against the installed libraries: every private attribute
they touch still exists, the version-gated fast paths are in their checked range, and each shim
still does what it is for. A library upgrade that breaks one fails here, by name."""

from __future__ import annotations

import importlib

import pytest
import torch

from peftkit import _compat


def _resolve(dotted: str):
    module, _, name = dotted.rpartition(".")
    try:
        return importlib.import_module(dotted)
    except ImportError:
        return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize(
    "library, owner, attr, checked", _compat.PRIVATE_API, ids=lambda v: str(v).split(".")[-1]
)
def test_every_private_attribute_still_exists(library, owner, attr, checked):
    assert hasattr(_resolve(owner), attr), (
        f"{library} {_compat.installed(library)} removed {owner}.{attr} (checked with {checked}): "
        "revisit the workaround in peftkit/_compat.py"
    )


def test_a_missing_private_attribute_is_a_clear_error():
    class Owner:
        pass

    with pytest.raises(
        _compat.PrivateApiChanged, match=r"peft [\d.]+ has no Owner\._active_adapter"
    ):
        _compat._private(Owner, "_active_adapter", "peft")


def test_the_installed_peft_is_in_the_fast_switch_range():
    low, below = _compat.FAST_LORA_SWITCH_PEFT
    assert _compat.fast_lora_switch_supported(), (
        f"peft {_compat.installed('peft')} is outside [{low}, {below}): adapters switch through "
        "peft's slow path; check switch_lora_adapter against it and widen the range"
    )


def test_bitsandbytes_types_are_recognised_without_class_names():
    bnb = pytest.importorskip("bitsandbytes")
    assert _compat.is_packed_4bit(bnb.nn.Params4bit(torch.zeros(4, 4), requires_grad=False))
    assert not _compat.is_packed_4bit(torch.nn.Parameter(torch.zeros(4, 4)))
    assert _compat.is_quantized_linear(bnb.nn.Linear8bitLt(4, 4, has_fp16_weights=False))
    assert not _compat.is_quantized_linear(torch.nn.Linear(4, 4))


def test_a_second_accelerator_may_change_mixed_precision():
    from accelerate import Accelerator

    Accelerator(mixed_precision="no", cpu=True)
    _compat.allow_new_mixed_precision()
    assert Accelerator(mixed_precision="bf16", cpu=True).mixed_precision == "bf16"
    _compat.allow_new_mixed_precision()


def test_gguf_architectures_come_from_transformers():
    assert {"llama", "qwen2"} <= _compat.gguf_architectures()


def test_the_attention_implementation_is_read_from_the_model(tiny_model):
    from transformers import AutoModelForCausalLM

    for name in ("eager", "sdpa"):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model), attn_implementation=name)
        assert _compat.attention_implementation(model) == name


def test_the_installed_transformers_is_in_the_fast_chat_render_range():
    low, below = _compat.FAST_CHAT_RENDER_TRANSFORMERS
    assert _compat._fast_chat_render_supported(), (
        f"transformers {_compat.installed('transformers')} is outside [{low}, {below}): chats "
        "render through apply_chat_template; check chat_renderer against it and widen the range"
    )


@pytest.mark.parametrize("template", ["chatml", "llama3", "plain", "none", "tiny-llama"])
def test_chat_renderer_renders_what_apply_chat_template_renders(template, tokenizers_by_template):
    from pathlib import Path

    from transformers import AutoTokenizer

    from peftkit.data.chat import resolve_chat_template

    folder = (
        Path(_compat.__file__).parent / "assets" / "tiny-llama"
        if template == "tiny-llama"
        else tokenizers_by_template[template]
    )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    resolve_chat_template(tokenizer, "auto")
    render = _compat.chat_renderer(tokenizer)
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " café 日本語 🙂\n"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "and {{ this }}?"},
        {"role": "assistant", "content": "  It is 5.  "},
    ]
    for end in range(1, len(chat) + 1):
        for prompt in (False, True):
            expected = tokenizer.apply_chat_template(
                chat[:end], tokenize=False, add_generation_prompt=prompt
            )
            assert render(chat[:end], prompt) == expected
    with pytest.raises(ValueError, match="empty conversation"):
        render([], False)


def test_the_cache_keyword_is_one_the_forward_takes_without_warning(tiny_model):
    import inspect
    import warnings

    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from peftkit import _compat

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    name = _compat.cache_keyword(model)
    assert name in inspect.signature(type(model).forward).parameters
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model(input_ids=torch.tensor([[1, 2]]), use_cache=True, **{name: DynamicCache()})


def test_head_gets_a_contiguous_input_when_generation_keeps_the_last_position(tiny_model):
    """torch 2.13 CPU: a frozen bf16 head given the last position as a strided slice
    materialises (batch, vocab, hidden); load_model installs the hook that hands it a copy."""
    from peftkit.models.load import load_model
    from peftkit.recipe.schema import ModelSpec

    model = load_model(ModelSpec(name=str(tiny_model)), torch.bfloat16, torch.device("cpu"))
    model.requires_grad_(False)
    head = model.get_output_embeddings()
    seen = []
    head.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    ids = torch.randint(1, 50, (3, 9))
    with torch.no_grad():
        fast = model(input_ids=ids, logits_to_keep=1).logits  # the model slices [:, -1:]
        full = model(input_ids=ids).logits[:, -1:]
    assert seen[0] is True  # the compat hook (registered first) made the slice contiguous
    torch.testing.assert_close(fast, full)


@pytest.mark.parametrize("template", ["qwen2_5", "qwen3", "llama3_1", "mistral"])
def test_chat_renderer_renders_tools_and_reasoning_as_apply_chat_template(template, tmp_path):
    """Agent chats (tools, tool calls, results, reasoning, extra template variables) render
    identically through the fast path and `apply_chat_template`."""
    from pathlib import Path

    from tests.conftest import CHATML, build_tokenizer

    tokenizer = build_tokenizer(tmp_path, CHATML)
    fixtures = Path(__file__).parent.parent / "fixtures" / "chat_templates"
    tokenizer.chat_template = (fixtures / f"{template}.jinja").read_text()
    render = _compat.chat_renderer(tokenizer)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    call = {"id": "abcdefghi", "type": "function", "function": {"name": "f", "arguments": {}}}
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "call f"},
        {"role": "assistant", "content": "", "tool_calls": [call], "reasoning_content": "hm"},
        {"role": "tool", "tool_call_id": "abcdefghi", "name": "f", "content": "42"},
        {"role": "assistant", "content": "It is 42.", "reasoning_content": "so"},
    ]
    for variables in ({}, {"enable_thinking": False}):
        for end in (2, 3, 4, 5):
            expected = tokenizer.apply_chat_template(
                chat[:end], tools=tools, tokenize=False, add_generation_prompt=True, **variables
            )
            assert render(chat[:end], True, tools, **variables) == expected
