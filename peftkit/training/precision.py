"""Which mixed precision to run and which dtype to store the base weights in."""

from __future__ import annotations

import torch

from peftkit.errors import RecipeError
from peftkit.methods.base import MethodSpec
from peftkit.models.load import DTYPES
from peftkit.recipe.schema import ModelSpec, TrainSpec

# the dtype (a `DTYPES` name) each mixed precision computes in
_PRECISION_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def resolve_precision(train: TrainSpec, cuda: bool) -> str:
    """bf16 | fp16 | fp32 for this machine; rejects what it cannot run (fp16 autocast on CPU)."""
    if train.precision == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if train.precision == "fp16" and not cuda:
        raise RecipeError("train.precision fp16 needs a GPU; on CPU use bf16 or fp32")
    if train.precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise RecipeError("this GPU has no bf16 support: set train.precision fp16 (or fp32)")
    return train.precision


def cpu_has_fast_bf16() -> bool:
    """True on x86 CPUs with native bf16 matmul instructions (AVX512-BF16 or AMX), where oneDNN
    runs bf16 far faster than fp32. Without them bf16 is emulated and slower, so auto stays fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def weights_dtype(model: ModelSpec, method: MethodSpec, precision: str) -> torch.dtype:
    """Storage dtype of the base weights. Frozen weights may live in the half format the run computes
    in; trained weights (full/partial) stay fp32 master copies unless the recipe says otherwise."""
    if model.dtype != "auto":
        return DTYPES[model.dtype]
    if method.wants_low_precision_base():
        return DTYPES[_PRECISION_DTYPE[precision]]
    return torch.float32
