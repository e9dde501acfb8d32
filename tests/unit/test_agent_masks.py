"""Agent chats (tool calls, tool results, reasoning) on the public templates' formats: the loss
mask is exactly the assistant turns as each template writes them, token for token.

The expected mask is computed here, independently of peftkit's renderer: the chat is rendered
with transformers' own `apply_chat_template`, each assistant turn's text (written out below from
the template's format) is located in it in order, and the tokens overlapping those characters
are the supervised ones."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from peftkit.data.encode import IGNORE, Encoder
from peftkit.data.formats import to_example
from peftkit.data.sources import RawRow
from peftkit.errors import DataError

TEMPLATES = Path(__file__).parent.parent / "fixtures" / "chat_templates"
ARGS = {"name": "Ana", "item": "tea", "quantity": 2, "city": "Lyon", "day": "Monday"}
ARGS_JSON = json.dumps(ARGS)
RESULT = '{"status": "ok", "order_id": 17}'
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "send_order",
            "description": "Place an order.",
            "parameters": {
                "type": "object",
                "properties": {k: {"type": "string"} for k in ARGS},
                "required": list(ARGS),
            },
        },
    }
]
CALL = {"id": "call00001", "type": "function", "function": {"name": "send_order"}}


def row(reasoning: bool = False, last_user: bool = True) -> dict:
    """A row as a data file holds it (arguments as a JSON string, as OpenAI writes them)."""
    turns = [
        {"role": "system", "content": "You take orders."},
        {"role": "user", "content": "Order 2 teas for Ana in Lyon on Monday."},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{**CALL, "function": {"name": "send_order", "arguments": ARGS_JSON}}],
        },
        {"role": "tool", "tool_call_id": "call00001", "content": RESULT},
        {"role": "assistant", "content": "Done: order 17 is placed."},
    ]
    if last_user:
        turns += [
            {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "content": "You are welcome."},
        ]
    if reasoning:
        turns[2]["reasoning_content"] = "The user wants tea."
        turns[4]["content"] = "<think>\nThe order went through.\n</think>\n\n" + turns[4]["content"]
        if last_user:
            turns[6]["reasoning_content"] = "Easy."
    return {"messages": turns, "tools": TOOLS}


def canonical(data: dict, reasoning: str = "keep") -> list[dict]:
    """The same chat as chat templates take it, written out by hand (not by peftkit)."""
    out = copy.deepcopy(data["messages"])
    for m in out:
        if m.get("content") is None:
            m["content"] = ""
        for call in m.get("tool_calls", []):
            call["function"]["arguments"] = ARGS
        if m["role"] == "tool":
            m["name"] = "send_order"
        if m["content"].startswith("<think>"):
            think, _, answer = m["content"].partition("</think>")
            m["reasoning_content"] = think.removeprefix("<think>").strip("\n")
            m["content"] = answer.lstrip("\n")
        if reasoning == "drop":
            m.pop("reasoning_content", None)
    return out


SPECIALS = {
    "qwen": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "llama": [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<|eom_id|>",
        "<|python_tag|>",
    ],
    "mistral": [
        "<s>",
        "</s>",
        "[INST]",
        "[/INST]",
        "[TOOL_CALLS]",
        "[AVAILABLE_TOOLS]",
        "[/AVAILABLE_TOOLS]",
        "[TOOL_RESULTS]",
        "[/TOOL_RESULTS]",
    ],
}
# family -> (eos, bos); Qwen's <tool_call>/<think> are added tokens but not special ones
TOKENS = {
    "qwen": ("<|endoftext|>", None),
    "llama": ("<|eot_id|>", "<|begin_of_text|>"),
    "mistral": ("</s>", "<s>"),
}


def agent_tokenizer(folder: Path, template: str, family: str):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=SPECIALS[family],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [json.dumps(row(True)), json.dumps(TOOLS), "You are welcome. Done."] * 10
    tok.train_from_iterator(corpus, trainer)
    if family == "qwen":
        tok.add_tokens([AddedToken(t, special=False) for t in ("<tool_call>", "</tool_call>")])
        tok.add_tokens([AddedToken(t, special=False) for t in ("<think>", "</think>")])
    eos, bos = TOKENS[family]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=bos)
    fast.chat_template = (TEMPLATES / template).read_text()
    fast.save_pretrained(str(folder))
    return fast


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    family = {"qwen2_5": "qwen", "qwen3": "qwen", "llama3_1": "llama", "mistral": "mistral"}
    return {
        name: agent_tokenizer(tmp_path_factory.mktemp(name), f"{name}.jinja", fam)
        for name, fam in family.items()
    }


def expected_labels(tokenizer, text: str, turns: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of `text` and the labels that supervise exactly the characters of `turns`,
    found one after another in `text`."""
    spans, at = [], 0
    for turn in turns:
        start = text.index(turn, at)
        spans.append((start, start + len(turn)))
        at = start + len(turn)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.array(enc["input_ids"])
    mask = np.array([any(s < hi and e > lo for lo, hi in spans) for s, e in enc["offset_mapping"]])
    return ids, np.where(mask, ids, IGNORE)


def check(tokenizer, data, turns, reasoning="template", variables=None, canon="keep"):
    example = to_example(RawRow(copy.deepcopy(data), "rows.jsonl line 1"), "messages", None)
    encoder = Encoder(tokenizer, "completion", reasoning, variables)
    got = encoder.encode(example)
    reference = tokenizer.apply_chat_template(
        canonical(data, canon), tools=TOOLS, tokenize=False, **(variables or {})
    )
    ids, labels = expected_labels(tokenizer, reference, turns)
    assert got.input_ids.tolist() == ids.tolist()  # the text is the template's own, unchanged
    assert got.labels.tolist() == labels.tolist()
    supervised = tokenizer.decode(got.input_ids[got.labels != IGNORE])
    assert supervised == "".join(turns)
    return encoder


QWEN_CALL = f'<tool_call>\n{{"name": "send_order", "arguments": {ARGS_JSON}}}\n</tool_call>'


def test_qwen2_5_hermes_tool_calls(tokenizers):
    turns = [
        QWEN_CALL + "<|im_end|>",
        "Done: order 17 is placed.<|im_end|>",
        "You are welcome.<|im_end|>",
    ]
    encoder = check(tokenizers["qwen2_5"], row(), turns)
    assert encoder.stop_tokens == {"<|im_end|>"}  # no EOS added after the content-less call


def test_qwen2_5_gets_reasoning_inline_as_it_has_no_field_for_it(tokenizers):
    # The template never renders reasoning_content: the reasoning goes into the content.
    data = row(reasoning=True, last_user=False)
    a1 = "<think>\nThe user wants tea.\n</think>\n\n\n" + QWEN_CALL + "<|im_end|>"
    a2 = "<think>\nThe order went through.\n</think>\n\nDone: order 17 is placed.<|im_end|>"
    example = to_example(RawRow(copy.deepcopy(data), "rows.jsonl line 1"), "messages", None)
    got = Encoder(tokenizers["qwen2_5"], "completion").encode(example)
    tok = tokenizers["qwen2_5"]
    assert tok.decode(got.input_ids[got.labels != IGNORE]) == a1 + a2
    masked = Encoder(tok, "completion", "mask").encode(copy.deepcopy(example))
    assert tok.decode(masked.input_ids[masked.labels != IGNORE]) == (
        QWEN_CALL + "<|im_end|>Done: order 17 is placed.<|im_end|>"
    )


@pytest.mark.parametrize("thinking", [True, False])
def test_qwen3_without_reasoning_data(tokenizers, thinking):
    variables = {"enable_thinking": thinking}
    last = "You are welcome.<|im_end|>"
    turns = [
        QWEN_CALL + "<|im_end|>",  # earlier turns carry no think block
        "Done: order 17 is placed.<|im_end|>",
        # the last turn always has one; thinking off puts it in the generation prompt
        ("<think>\n\n</think>\n\n" + last) if thinking else last,
    ]
    check(tokenizers["qwen3"], row(), turns, variables=variables)


def test_qwen3_drops_earlier_reasoning_and_trains_the_last(tokenizers):
    tok = tokenizers["qwen3"]
    earlier = [QWEN_CALL + "<|im_end|>", "Done: order 17 is placed.<|im_end|>"]
    last = "You are welcome.<|im_end|>"
    check(tok, row(True), [*earlier, "<think>\nEasy.\n</think>\n\n" + last])
    check(tok, row(True), [*earlier, last], reasoning="mask")  # rendered, no loss
    check(tok, row(True), [*earlier, "<think>\n\n</think>\n\n" + last], "drop", canon="drop")
    with pytest.raises(DataError, match=r"rows.jsonl line 1: .*drops the reasoning of message 2"):
        check(tok, row(True), [], reasoning="train")


@pytest.mark.parametrize("reasoning", ["template", "train"])
def test_qwen3_keeps_reasoning_within_a_tool_loop(tokenizers, reasoning):
    # After the last user message every turn keeps its reasoning, the call's included.
    turns = [
        "<think>\nThe user wants tea.\n</think>\n\n" + QWEN_CALL + "<|im_end|>",
        "<think>\nThe order went through.\n</think>\n\nDone: order 17 is placed.<|im_end|>",
    ]
    check(tokenizers["qwen3"], row(True, last_user=False), turns, reasoning)


def test_qwen3_thinking_off_with_reasoning_data_is_refused(tokenizers):
    with pytest.raises(DataError, match=r"rows.jsonl line 1: .*reasoning"):
        check(tokenizers["qwen3"], row(True), [], variables={"enable_thinking": False})
    turns = [QWEN_CALL + "<|im_end|>", "Done: order 17 is placed.<|im_end|>"]
    turns.append("You are welcome.<|im_end|>")
    check(
        tokenizers["qwen3"],
        row(True),
        turns,
        "drop",
        {"enable_thinking": False},
        canon="drop",
    )


def test_llama3_1_json_tool_calls_and_ipython_results(tokenizers):
    turns = [
        f'{{"name": "send_order", "parameters": {ARGS_JSON}}}<|eot_id|>',
        "Done: order 17 is placed.<|eot_id|>",
        "You are welcome.<|eot_id|>",
    ]
    tok = tokenizers["llama3_1"]
    check(tok, row(), turns)
    text = tok.apply_chat_template(canonical(row()), tools=TOOLS, tokenize=False)
    assert "<|start_header_id|>ipython<|end_header_id|>" in text  # the result's own role
    example = to_example(RawRow(row(), "rows.jsonl line 1"), "messages", None)
    got = Encoder(tok, "completion").encode(example)
    (start, end, _), *_ = [p for p in got.parts if p[2] == "tool_result"]
    assert json.dumps(RESULT) in tok.decode(got.input_ids[start:end])  # found for the audit
    assert (got.labels[start:end] == IGNORE).all()


def test_mistral_tool_calls_available_tools_and_results(tokenizers):
    # [AVAILABLE_TOOLS] and the system message move to the last user turn, so earlier turns are
    # not a prefix of the whole chat: the turns are found in it.
    call = f'[TOOL_CALLS] [{{"name": "send_order", "arguments": {ARGS_JSON}, "id": "call00001"}}]'
    turns = [call + "</s>", " Done: order 17 is placed.</s>", " You are welcome.</s>"]
    tok = tokenizers["mistral"]
    check(tok, row(), turns)
    text = tok.apply_chat_template(canonical(row()), tools=TOOLS, tokenize=False)
    assert text.index("[AVAILABLE_TOOLS]") > text.index(call)
    assert "[TOOL_RESULTS]" in text


def test_tool_results_and_prompts_never_carry_loss(tokenizers):
    for name, tok in tokenizers.items():
        example = to_example(RawRow(row(), "rows.jsonl line 1"), "messages", None)
        got = Encoder(tok, "completion").encode(example)
        supervised = tok.decode(got.input_ids[got.labels != IGNORE])
        for never in ("order_id", "You take orders", "Order 2 teas", "Thanks!", "Place an order"):
            assert never not in supervised, (name, never)
