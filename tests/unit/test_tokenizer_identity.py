"""One tokenizer identity for every check: tokenizers that differ only in their chat template, a
special token or an added token are different tokenizers to the data cache, to `--resume` (which
refuses, naming the part) and to an adapter's manifest (which ignores the chat template)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from peftkit.data.cache.key import data_key
from peftkit.errors import AdapterMismatchError, RunDirError
from peftkit.io import RunLayout
from peftkit.models import manifest
from peftkit.models.builtin import ASSETS
from peftkit.models.tokenizer_identity import tokenizer_identity
from peftkit.recipe.schema import DataSpec
from peftkit.training import inputs

TINY_LLAMA = ASSETS / "tiny-llama"


@pytest.fixture(scope="module")
def base():
    return AutoTokenizer.from_pretrained(TINY_LLAMA)


def _template(tok):
    other = copy.deepcopy(tok)
    other.chat_template = tok.chat_template + "{# another template #}"
    return other


def _role(tok):
    other = copy.deepcopy(tok)
    other.eos_token = "<|pad|>"  # a token the vocabulary has: only its role changes
    return other


def _special(tok):
    other = copy.deepcopy(tok)
    word = next(t for t in tok.get_vocab() if t.isalpha() and len(t) > 2)
    other.add_special_tokens({"additional_special_tokens": [word]})  # now never split
    return other


def _added(tok):
    other = copy.deepcopy(tok)
    other.add_tokens(["<|new|>"])
    return other


VARIANTS = {
    "chat template": _template,
    "special token role": _role,
    "special tokens": _special,
    "added token": _added,
}


def test_the_same_tokenizer_has_one_identity_whatever_its_calls_left_behind(base):
    again = AutoTokenizer.from_pretrained(TINY_LLAMA)
    again(["a", "a longer text"], padding="max_length", truncation=True, max_length=8)
    assert tokenizer_identity(again) == tokenizer_identity(base)


@pytest.mark.parametrize("change", VARIANTS)
def test_a_tokenizer_that_differs_in_one_thing_is_another_tokenizer(base, change):
    other = VARIANTS[change](base)
    assert other.get_vocab() == base.get_vocab() or change == "added token"
    mine, theirs = tokenizer_identity(base), tokenizer_identity(other)
    assert mine.sha() != theirs.sha()
    expected = {"chat template": ["chat template"], "added token": ["vocabulary", "special tokens"]}
    assert set(expected.get(change, ["special tokens"])) <= set(mine.differences(theirs.parts))
    spec = DataSpec(train=[{"path": __file__}])  # any local file: the key needs a content sha
    assert data_key(spec, base, "T", 0) != data_key(spec, other, "T", 0)


@pytest.mark.parametrize("change", VARIANTS)
def test_resume_refuses_another_tokenizer_naming_the_part(tmp_path, base, change):
    data = DataSpec(train=[{"path": __file__}])
    run = RunLayout(tmp_path)
    inputs.record(run, inputs.fingerprints(data, base, "T"))
    inputs.check_unchanged(run, inputs.fingerprints(data, copy.deepcopy(base), "T"))  # same: fine
    with pytest.raises(RunDirError, match="tokenizer has other") as err:
        inputs.check_unchanged(run, inputs.fingerprints(data, VARIANTS[change](base), "T"))
    part = {"chat template": "chat template", "added token": "vocabulary"}.get(change, "special")
    assert part in str(err.value)


def test_manifest_checks_the_identity_without_the_chat_template(tmp_path, base):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2))  # fmt: skip
    trained = manifest.BaseIdentity.of("base", model, base)
    written = manifest.write_manifest(
        tmp_path, trained, method="lora", chat_template=None, stop_tokens=[], recipe=None
    )
    for change, fn in VARIANTS.items():
        loaded = manifest.BaseIdentity.of("base", model, fn(base))
        if change == "chat template":  # an adapter brings its own template: still compatible
            assert manifest.check_compatible("a", tmp_path, written, loaded) == []
            continue
        with pytest.raises(AdapterMismatchError, match=r"tokenizer differs \(.*special tokens"):
            manifest.check_compatible("a", tmp_path, written, loaded)
    # a manifest of format 1 is checked against the fingerprint it recorded
    old = {**written, "format": 1, "tokenizer": {"fingerprint": trained.format1_tokenizer}}
    assert manifest.check_compatible("a", tmp_path, old, trained) == []
    with pytest.raises(AdapterMismatchError, match="tokenizer differs"):
        manifest.check_compatible(
            "a", tmp_path, old, manifest.BaseIdentity.of("base", model, _added(base))
        )
