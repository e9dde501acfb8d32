"""Build the models export compares: the trained model as it was trained, and the merged candidates.

All of them compute in fp32 so that the comparison measures the *weights* (merge and rounding),
not the arithmetic of one precision or another.

QLoRA merge bases: the trained model computed with W = dequant(NF4(W0)) + s·BA.
  original     W0 + s·BA            (the 16-bit weights the base was quantized from)
  dequantized  dequant(NF4(W0)) + s·BA   (exactly what training saw)
  requantized  dequant(NF4(dequant(NF4(W0)) + s·BA))  (merging into 4-bit weights, as peft's
               merge_and_unload on a 4-bit model does: only measured, to show what it costs)
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from peft.utils.integrations import dequantize_module_weight
from torch import nn
from transformers import AutoModelForCausalLM

from peftkit import _compat
from peftkit.errors import ExportError
from peftkit.export.source import ExportSource
from peftkit.models.load import DTYPES, load_model


def trained_dtype(source: ExportSource) -> torch.dtype:
    """The dtype training loaded the base in (the trained model computes in it, upcast to fp32)."""
    return DTYPES[source.meta.get("weights_dtype", "float32")]


def to_fp32(model: nn.Module) -> nn.Module:
    """Upcast every floating parameter and buffer to fp32 (exact); packed quantized weights are
    integer tensors and stay as they are."""
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.float()
        for name, b in list(module.named_buffers(recurse=False)):
            if b.is_floating_point():
                setattr(module, name, b.float())
    return model


def _attach(base: nn.Module, source: ExportSource, adapter_dir: Path | None = None) -> PeftModel:
    try:
        return PeftModel.from_pretrained(base, str(adapter_dir or source.result_dir))
    except (RuntimeError, ValueError, KeyError) as e:
        raise ExportError(
            f"the adapter in {source.result_dir} does not fit the base model {source.recipe.model.name!r}: "
            f"{str(e).splitlines()[0][:300]}"
        ) from None


def load_trained(source: ExportSource, adapter_dir: Path | None = None) -> nn.Module:
    """The trained model: base loaded exactly as in training (quantization included) + the adapter
    (from `adapter_dir` when given, e.g. an exported copy)."""
    if source.whole_model:
        return _load_folder(str(source.result_dir))
    spec = source.recipe.model
    if spec.quantization is not None:
        quant = spec.quantization.model_copy(update={"compute_dtype": "float32"})
        spec = spec.model_copy(update={"quantization": quant})
    base = load_model(spec, trained_dtype(source), torch.device("cpu"))
    model = _attach(to_fp32(base), source, adapter_dir)
    model.eval()
    return model


def dense_base(source: ExportSource) -> nn.Module:
    """The base model unquantized, in the dtype training stored it in, upcast to fp32."""
    spec = source.recipe.model.model_copy(update={"quantization": None})
    return to_fp32(load_model(spec, trained_dtype(source), torch.device("cpu")))


def dequantized_base(source: ExportSource) -> tuple[nn.Module, dict[str, int]]:
    """A dense base whose quantized linears hold the dequantized weights training computed with.

    Returns the model and {name: blocksize} of the linears that were quantized.
    """
    quantized = load_model(source.recipe.model, trained_dtype(source), torch.device("cpu"))
    dense = dense_base(source)
    dense_modules = dict(dense.named_modules())
    blocksizes = {}
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if _compat.is_quantized_linear(module):
                dense_modules[name].weight.copy_(dequantize_module_weight(module).float())
                state = getattr(module.weight, "quant_state", None)
                blocksizes[name] = getattr(state, "blocksize", 64)
    return dense, blocksizes


def merged(base: nn.Module, source: ExportSource) -> nn.Module:
    """Attach the adapter to a dense fp32 base and fold it into the weights."""
    model = _attach(base, source).merge_and_unload(safe_merge=True)
    model.eval()
    return model


def requantize(model: nn.Module, source: ExportSource, blocksizes: dict[str, int]) -> nn.Module:
    """Round the linears that were 4-bit in training through NF4/FP4 again (in place)."""
    import bitsandbytes.functional as bnbf

    quant = source.recipe.model.quantization
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, blocksize in blocksizes.items():
            weight = modules[name].weight
            packed, state = bnbf.quantize_4bit(
                weight.data.float(),
                blocksize=blocksize,
                quant_type=quant.quant_type,
                compress_statistics=quant.double_quant,
            )
            weight.copy_(bnbf.dequantize_4bit(packed, state).float())
    return model


def _load_folder(path: str) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    model.eval()
    return model


def reload_exported(path: str) -> nn.Module:
    """The exported folder, loaded with plain transformers (no peftkit code), computed in fp32."""
    return _load_folder(path)
