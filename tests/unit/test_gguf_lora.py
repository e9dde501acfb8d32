"""write_lora_gguf: a PEFT LoRA adapter as llama.cpp's GGUF adapter, read back with `gguf`'s reader
and applied to the base in torch, equal to PEFT's own adapted model."""

from __future__ import annotations

import copy

import gguf
import pytest
import torch

from peftkit.errors import UnsupportedGGUFExport
from peftkit.export.gguf_lora import apply_lora_gguf, write_lora_gguf
from tests.unit.test_gguf_arch import make_arch_model
from tests.unit.test_gguf_write import TEXTS, make_model, make_tokenizer


def _adapted(base, **lora):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **lora)
    model = get_peft_model(copy.deepcopy(base), config)
    torch.manual_seed(1)
    with torch.no_grad():  # B starts at zero: give it values, so the delta is there to compare
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize(
    "kind, lora",
    [
        ("llama", {}),  # q/k rows permuted in the base, so B's rows must be too
        (
            "llama",
            {"use_rslora": True, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"o_proj": 3}},
        ),
        ("phi3", {}),  # fused qkv_proj / gate_up_proj adapted as one tensor each
    ],
)
def test_read_back_adapter_applied_to_base_equals_peft(kind, lora, tmp_path):
    tokenizer = make_tokenizer("gpt-2")
    base = (
        make_model("llama", len(tokenizer), tied=False)
        if kind == "llama"
        else make_arch_model(kind, len(tokenizer))
    )
    peft_model = _adapted(base, **lora)
    peft_model.save_pretrained(tmp_path / "adapter")
    path = write_lora_gguf(tmp_path / "adapter", base.config, tmp_path / "lora.gguf")

    reader = gguf.GGUFReader(path)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    names = {t.name for t in reader.tensors}
    assert "blk.0.attn_q.weight.lora_a" in names or "blk.0.attn_qkv.weight.lora_a" in names

    applied = apply_lora_gguf(copy.deepcopy(base), path).eval()
    merged = copy.deepcopy(peft_model).merge_and_unload()  # PEFT's own W + s B A
    with torch.no_grad():
        for text in TEXTS:
            ids = torch.tensor([tokenizer.encode(text)])
            want, got = merged(ids).logits, applied(ids).logits
            assert (want - base(ids).logits).norm() > 1e-2  # the adapter changes the output
            assert ((peft_model(ids).logits - want).norm() / want.norm()).item() < 1e-5
            assert ((got - want).norm() / want.norm()).item() < 1e-6


def test_unrepresentable_adapters_are_refused_before_writing(tmp_path):
    tokenizer = make_tokenizer("gpt-2")
    base = make_model("llama", len(tokenizer), tied=False)
    _adapted(base, use_dora=True).save_pretrained(tmp_path / "dora")
    with pytest.raises(UnsupportedGGUFExport, match="DoRA"):
        write_lora_gguf(tmp_path / "dora", base.config, tmp_path / "x.gguf")
    with pytest.raises(UnsupportedGGUFExport, match="q8_0"):
        write_lora_gguf(tmp_path / "dora", base.config, tmp_path / "x.gguf", quant="q8_0")
    assert not (tmp_path / "x.gguf").exists()
