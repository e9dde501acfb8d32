"""Loss masks: exactly the assistant tokens plus their end-of-turn token carry labels."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from peftkit.data.chat import resolve_chat_template
from peftkit.data.encode import IGNORE, Encoder
from peftkit.data.formats import Example

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "hello world"},
    {"role": "assistant", "content": "I am fine, thank you!"},
    {"role": "user", "content": "Tell me a joke about cats."},
    {"role": "assistant", "content": "the quick brown fox"},
]
# template -> the token that must close every assistant turn
END_OF_TURN = {
    "chatml": "<|im_end|>",
    "llama3": "<|eot_id|>",
    "plain": "<|endoftext|>",
    "none": "<|endoftext|>",
}


def supervised_runs(ids: np.ndarray, labels: np.ndarray) -> list[list[int]]:
    runs, current = [], []
    for token, label in zip(ids.tolist(), labels.tolist()):
        if label != IGNORE:
            assert label == token, "a label differs from its input token"
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("template", ["chatml", "llama3", "plain", "none"])
def test_multi_turn_chat_supervises_exactly_assistant_turns_and_their_end(
    template, tokenizers_by_template
):
    tokenizer = AutoTokenizer.from_pretrained(tokenizers_by_template[template])
    resolve_chat_template(tokenizer, "auto")
    encoder = Encoder(tokenizer, loss_on="completion")
    row = encoder.encode(Example("mem", messages=[dict(m) for m in CHAT]))

    runs = supervised_runs(row.input_ids, row.labels)
    end = END_OF_TURN[template]
    expected = [m["content"] + end for m in CHAT if m["role"] == "assistant"]
    decoded = [tokenizer.decode(r) for r in runs]
    if template == "plain":
        # Its generation prompt ends in a space that BPE may merge into the answer's first token;
        # such a straddling token is supervised (the answer needs it).
        decoded = [d.removeprefix(" ") for d in decoded]
    # Token by token: each supervised run is exactly the answer's tokens followed by the end token.
    assert decoded == expected
    end_id = tokenizer.convert_tokens_to_ids(end)
    assert all(r[-1] == end_id for r in runs)
    # Nothing else carries loss: the supervised token count equals the answers' own token count.
    assert sum(len(r) for r in runs) == int((row.labels != IGNORE).sum())
    assert encoder.stop_tokens == {end}


def test_eos_is_supervised_even_when_it_is_the_pad_token(tmp_path):
    from tests.conftest import CHATML, PLAIN, build_tokenizer

    for template in (CHATML, PLAIN):
        folder = tmp_path / str(hash(template))
        tokenizer = build_tokenizer(folder, template, pad_is_eos=True)
        assert tokenizer.pad_token_id == tokenizer.eos_token_id
        resolve_chat_template(tokenizer, "auto")
        encoder = Encoder(tokenizer, loss_on="completion")
        chat = encoder.encode(Example("mem", messages=[dict(m) for m in CHAT]))
        pc = encoder.encode(Example("mem", prompt="What is 2 + 3?", completion=" It is 5."))
        for row in (chat, pc):
            eos_positions = np.flatnonzero(row.input_ids == tokenizer.eos_token_id)
            if template == PLAIN or row is pc:
                assert len(eos_positions) > 0
            assert all(row.labels[i] == tokenizer.eos_token_id for i in eos_positions)


def test_prompt_completion_supervises_completion_and_appended_eos(tokenizers_by_template):
    tokenizer = AutoTokenizer.from_pretrained(tokenizers_by_template["none"])
    row = Encoder(tokenizer, "completion").encode(
        Example("mem", prompt="What is 2 + 3?", completion=" It is 5.")
    )
    runs = supervised_runs(row.input_ids, row.labels)
    assert [tokenizer.decode(r) for r in runs] == [" It is 5.<|endoftext|>"]
    everything = Encoder(tokenizer, "all").encode(
        Example("mem", prompt="What is 2 + 3?", completion=" It is 5.")
    )
    assert everything.n_supervised == len(everything.input_ids) - 1


def test_loss_on_all_supervises_whole_chat(tokenizers_by_template):
    tokenizer = AutoTokenizer.from_pretrained(tokenizers_by_template["chatml"])
    row = Encoder(tokenizer, "all").encode(Example("mem", messages=[dict(m) for m in CHAT]))
    assert (row.labels != IGNORE).all()


def test_template_that_rewrites_history_is_refused(tokenizers_by_template):
    from peftkit.errors import DataError

    tokenizer = AutoTokenizer.from_pretrained(tokenizers_by_template["chatml"])
    # Drops all but the last assistant message, as some reasoning-model templates do.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['role'] + ': ' + m['content'] + '\\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(DataError, match="renders earlier turns differently"):
        Encoder(tokenizer, "completion").encode(
            Example("rows.jsonl line 3", messages=[dict(m) for m in CHAT])
        )
