"""The fused paths of a run: applied to the model in one explicit step at setup, and asked at the
end what each did, so that summary.json (`attention`, `speedups`) says why a run is fast or slow.

The kernels themselves live in their own modules: the fused LoRA SwiGLU MLP (`lora_mlp.py`), the
fused head and cross-entropy (`linear_ce.py`, chosen by the objective's loss) and the varlen
attention for packed rows (`attention.py`). Each counts its own training calls, so the report
says what ran, not only what was installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from peftkit import _compat
from peftkit.kernels import attention, linear_ce
from peftkit.kernels.lora_mlp import fused_mlp_status, install_fused_lora_mlps
from peftkit.models.layers import unwrap_peft


class KernelChoices(Protocol):
    """What the fused paths ask of a run's objective (training's `Objective` has both)."""

    varlen: bool
    """Packed micro-batches carry row boundaries for the varlen attention."""

    def fused_head_status(self, model: nn.Module) -> dict[str, Any]:
        """Whether the objective's loss runs the fused head: {"used": bool, "reason": why not}."""
        ...


@dataclass
class Kernels:
    """What `apply_kernels` installed."""

    attention: str | None
    """The model's own attention implementation (`sdpa`, `eager`, `flash_attention_2`, ...)."""
    varlen: bool
    """Packed rows run through `attention.py`'s varlen implementation."""

    def report(self, model: nn.Module, objective: KernelChoices) -> dict[str, Any]:
        """summary.json's `attention` (the kernel packed training rows ran) and `speedups` (each
        fused path: {"used": bool, "reason": why not})."""
        calls = attention.CALLS
        kernel = self.attention
        if self.varlen:
            if calls["flash_varlen"]:
                kernel = "flash_attn_varlen_func (packed rows)"
            elif calls["sdpa_per_row"]:
                kernel = "sdpa per packed row"
            varlen = {"used": bool(calls["flash_varlen"] or calls["sdpa_per_row"])}
            if calls["sdpa_per_row"] and attention.flash_varlen_available():
                varlen["note"] = "flash-attn varlen needs fp16/bf16 tensors on a GPU"
            elif calls["sdpa_per_row"]:
                varlen["note"] = "flash-attn is not installed: one SDPA call per packed row"
        else:
            varlen = {"used": False, "reason": _why_not_varlen(kernel)}
        return {
            "attention": kernel,
            "speedups": {
                "fused_mlp": fused_mlp_status(model),
                "fused_head": _fused_head(model, objective),
                "varlen_attention": varlen,
            },
        }


def _fused_head(model: nn.Module, objective: KernelChoices) -> dict[str, Any]:
    status = objective.fused_head_status(model)
    if status.get("used") and not linear_ce.CALLS["training"]:
        return {"used": False, "reason": "no training forward ran"}
    return status


def _why_not_varlen(kernel: str | None) -> str:
    if kernel in ("flash_attention_2", "flash_attention_3"):
        return f"{kernel} runs packed rows as variable-length sequences itself"
    return f"batches are not packed rows under SDPA (attention: {kernel})"


def apply_kernels(model: nn.Module, objective: KernelChoices) -> Kernels:
    """Install the fused paths the model and the objective's batching allow (before accelerate
    wraps the model), and start their call counts afresh. Each checks at every call that it
    applies, else the model's own code runs."""
    install_fused_lora_mlps(model)
    kernels = Kernels(_compat.attention_implementation(unwrap_peft(model)), objective.varlen)
    attention.CALLS.clear()
    linear_ce.CALLS.clear()
    if kernels.varlen:  # packed rows: one varlen call (or one SDPA per row), no mask
        attention.use_varlen_attention(model)
    return kernels
