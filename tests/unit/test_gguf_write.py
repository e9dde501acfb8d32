"""write_gguf: tiny Llama / Qwen2 models written to GGUF and read back with transformers' own GGUF
loader (independent of peftkit), compared on logits, tokenization and chat template."""

from __future__ import annotations

import pytest
import torch

from peftkit.errors import UnsupportedGGUFExport
from peftkit.export.gguf import write_gguf
from peftkit.export.gguf_vocab import LLAMA3_SPLIT, QWEN2_SPLIT
from tests.conftest import CHATML, CORPUS, SPECIALS

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "What is 12345 + 678? It is 13023.",
    "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n",
    "Ünïcödé façade — naïve   spaces\n\nand\ttabs 🙂",
]
# Relative logit error ||Δ|| / ||logits|| of the read-back model, all texts together. f32 is exact
# (measured 0); f16 rounds each weight to 11 significant bits (measured 6.9e-4 .. 8.4e-4); bf16 to 8
# (measured 5.7e-3); q8_0 (blocks of 32 int8 with one f16 scale) measured 1.9e-2 .. 2.3e-2 on these
# random 64-wide models, so its bound leaves about 2x margin.
BOUNDS = {"f32": 1e-5, "f16": 1e-2, "bf16": 1.5e-2, "q8_0": 5e-2}

PRE_TOKENIZERS = {
    "gpt-2": lambda pt: pt.ByteLevel(add_prefix_space=False),
    "smollm": lambda pt: pt.Sequence(
        [pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)]
    ),
    "llama-bpe": lambda pt: _split(pt, LLAMA3_SPLIT),
    "qwen2": lambda pt: _split(pt, QWEN2_SPLIT),
}


def _split(pt, regex: str):
    from tokenizers import Regex

    return pt.Sequence(
        [
            pt.Split(Regex(regex), behavior="isolated"),
            pt.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def make_tokenizer(pre: str, add_bos: bool = False):
    """A byte-level BPE tokenizer trained on the test corpus with the given pre-tokenizer; with
    `add_bos`, encoding prepends BOS (a post-processor, as Llama-3's tokenizer has)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = PRE_TOKENIZERS[pre](pre_tokenizers)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS + [t for t in TEXTS if "<|" not in t], trainer)
    if add_bos:
        bos = ("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[bos]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|begin_of_text|>",
        pad_token="<|pad|>",
    )
    fast.chat_template = CHATML
    return fast


def make_model(kind: str, vocab_size: int, tied: bool):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    shape = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": tied,
        "initializer_range": 0.1,
    }
    torch.manual_seed(0)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**shape))
        with torch.no_grad():  # random q/k/v biases, so that a missed bias would show
            for layer in model.model.layers:
                for proj in (
                    layer.self_attn.q_proj,
                    layer.self_attn.k_proj,
                    layer.self_attn.v_proj,
                ):
                    proj.bias.normal_(0, 0.1)
    elif kind == "mistral":  # head_dim 32 != 64 / 4 heads: the file must say so
        model = MistralForCausalLM(MistralConfig(**shape, head_dim=32))
    else:
        model = LlamaForCausalLM(LlamaConfig(**shape))
    with torch.no_grad():  # norms away from 1, so a norm written in the wrong place would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


# (model kind, tied embeddings, pre-tokenizer, tokenizer adds BOS)
CASES = {
    "llama": ("llama", False, "gpt-2", False),
    "llama-tied-smollm": ("llama", True, "smollm", False),
    "llama3-tokenizer": ("llama", False, "llama-bpe", True),
    "qwen2-tied": ("qwen2", True, "qwen2", False),
    "mistral": ("mistral", False, "gpt-2", False),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    kind, tied, pre, add_bos = CASES[request.param]
    tokenizer = make_tokenizer(pre, add_bos)
    return request.param, make_model(kind, len(tokenizer), tied), tokenizer


def relative_error(model, reread, tokenizer) -> float:
    diff = ref = 0.0
    with torch.no_grad():
        for text in TEXTS:
            ids = torch.tensor([tokenizer.encode(text)])
            a, b = model(ids).logits, reread(ids).logits  # (1, seq, vocab)
            diff += (a - b).pow(2).sum().item()
            ref += a.pow(2).sum().item()
    return (diff / ref) ** 0.5


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
def test_round_trip_through_transformers_reader(case, quant, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name, model, tokenizer = case
    path = write_gguf(model, tokenizer, tmp_path / f"{name}.gguf", quant=quant)
    assert path.exists() and [p.name for p in tmp_path.iterdir()] == [path.name]

    reread = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32
    )
    # Mistral is written as llama.cpp writes it: architecture "llama", read back as Llama.
    assert type(reread).__name__ == type(model).__name__.replace("Mistral", "Llama")
    assert reread.config.tie_word_embeddings == model.config.tie_word_embeddings
    error = relative_error(model, reread.eval(), tokenizer)
    print(f"{name} {quant}: relative logit error {error:.3g}")
    assert error <= BOUNDS[quant]

    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        assert tok.encode(text) == tokenizer.encode(text), text
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.chat_template == CHATML
    assert (tok.eos_token, tok.bos_token, tok.pad_token) == (
        tokenizer.eos_token,
        tokenizer.bos_token,
        tokenizer.pad_token,
    )


def read_fields(path) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    return {
        "fields": {
            k: f.contents()
            for k, f in reader.fields.items()
            if not k.startswith("tokenizer.ggml.t")
        },
        "tensors": {t.name: t.tensor_type.name for t in reader.tensors},
    }


def test_metadata_and_tensor_types(tmp_path):
    tokenizer = make_tokenizer("qwen2")
    model = make_model("qwen2", len(tokenizer), tied=True)
    path = write_gguf(
        model,
        tokenizer,
        tmp_path / "m.gguf",
        quant="q8_0",
        chat_template="{{ messages }}",
        stop_tokens=["<|im_end|>", "<|endoftext|>"],
    )
    meta = read_fields(path)
    fields, tensors = meta["fields"], meta["tensors"]
    assert fields["general.architecture"] == "qwen2"
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "qwen2"
    assert fields["tokenizer.chat_template"] == "{{ messages }}"
    assert fields["tokenizer.ggml.eot_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert "output.weight" not in tensors  # tied
    assert tensors["blk.0.attn_q.weight"] == "Q8_0"
    assert tensors["blk.0.attn_q.bias"] == "F32"
    assert tensors["blk.0.attn_norm.weight"] == "F32"


def test_bf16_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    tokenizer = make_tokenizer("gpt-2")
    model = make_model("llama", len(tokenizer), tied=False)
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", quant="bf16")
    reread = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32
    )
    error = relative_error(model, reread.eval(), tokenizer)
    print(f"llama bf16: relative logit error {error:.3g}")
    assert error <= BOUNDS["bf16"]


def test_unsupported_architecture_writes_nothing(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = make_tokenizer("gpt-2")
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64)
    )
    with pytest.raises(UnsupportedGGUFExport, match="gpt2"):
        write_gguf(model, tokenizer, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_unknown_pre_tokenizer_and_quant_refused(tmp_path):
    from tokenizers import pre_tokenizers

    tokenizer = make_tokenizer("gpt-2")
    model = make_model("llama", len(tokenizer), tied=False)
    with pytest.raises(UnsupportedGGUFExport, match="quant"):
        write_gguf(model, tokenizer, tmp_path / "m.gguf", quant="q4_k")
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(UnsupportedGGUFExport, match="pre-tokenizer"):
        write_gguf(model, tokenizer, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_failure_while_writing_leaves_no_file(tmp_path, monkeypatch):
    import gguf

    tokenizer = make_tokenizer("gpt-2")
    model = make_model("llama", len(tokenizer), tied=False)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(OSError, match="disk full"):
        write_gguf(model, tokenizer, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_check_counts_rows_that_encode_differently():
    import copy

    import numpy as np
    from tokenizers import pre_tokenizers

    from peftkit.data.encode import EncodedRow
    from peftkit.export.gguf_export import compare_tokenizers

    trained = make_tokenizer("gpt-2")
    other = copy.deepcopy(trained)  # same vocabulary, digits split one by one before BPE
    other.backend_tokenizer.pre_tokenizer = PRE_TOKENIZERS["smollm"](pre_tokenizers)
    rows = [
        EncodedRow(np.array(trained.encode(t)), np.array(trained.encode(t)), "test")
        for t in ("What is 12345 + 678?", "the lazy dog")
    ]
    assert compare_tokenizers(trained, trained, rows)["identical_rows"] == 2
    result = compare_tokenizers(trained, other, rows)
    assert result["identical_rows"] == 1 and "12345" in result["first_difference"]


def test_modelfile_names_every_stop_token_and_the_system_prompt():
    from peftkit.export.gguf_export import modelfile

    text = modelfile("m-q8_0.gguf", ["<|im_end|>", "<|endoftext|>"], None, "m")
    assert text.splitlines()[1:] == [
        "FROM ./m-q8_0.gguf",
        'PARAMETER stop "<|im_end|>"',
        'PARAMETER stop "<|endoftext|>"',
    ]
    assert 'SYSTEM """Be brief."""' in modelfile("m.gguf", [], "Be brief.", "m")
