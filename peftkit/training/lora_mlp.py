"""A fused SwiGLU MLP for LoRA training: the same math, fewer saved activations and matmuls.

The gated MLP of Llama-family models (Llama, Mistral, Qwen2/3, SmolLM, ...) with LoRA on its
three projections computes

    g = W_g x + s_g B_g A_g x,   u = W_u x + s_u B_u A_u x,   h = silu(g) * u,
    y = W_d h + s_d B_d A_d h

Run module by module, autograd keeps g, silu(g), u and h for the backward: four
intermediate-size tensors per token and layer, about half of all activations on a model such as
SmolLM2. `LoraSwiGLU` keeps g and u and recomputes silu(g) and h in the backward (elementwise,
cheap next to the matmuls), and does the two LoRA-A products that share x as one matmul.
Gradients equal the module-by-module autograd to float rounding (tests).

It runs only where it is exactly that math: plain float `nn.Linear` bases (not quantized) that
are frozen, one active LoRA adapter on all three projections, no dropout while training, no
DoRA or other LoRA variant, not merged, adapters enabled, one dtype, no autocast. Any other call
runs the model's own forward, so a quantized base, a disabled adapter (the reference pass of a
preference loss, the forgetting report) or mixed precision get exactly what they got before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class LoraSwiGLU(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)), LoRA on all three; saves x, g, u and the LoRA-A outputs."""

    @staticmethod
    def forward(ctx, x, w_g, w_u, w_d, b_g, b_u, b_d, a_gu, bl_g, bl_u, a_d, bl_d, scales):
        s_g, s_u, s_d = scales
        r_g = bl_g.shape[1]
        xa = x @ a_gu.t()  # (tokens, r_g + r_u): both LoRA-A products in one matmul
        g = F.linear(x, w_g, b_g).addmm_(xa[:, :r_g], bl_g.t(), alpha=s_g)  # (tokens, inter)
        u = F.linear(x, w_u, b_u).addmm_(xa[:, r_g:], bl_u.t(), alpha=s_u)
        h = F.silu(g).mul_(u)
        ha = h @ a_d.t()  # (tokens, r_d)
        y = F.linear(h, w_d, b_d).addmm_(ha, bl_d.t(), alpha=s_d)  # (tokens, hidden)
        ctx.save_for_backward(x, g, u, xa, ha, w_g, w_u, w_d, a_gu, bl_g, bl_u, a_d, bl_d)
        ctx.scales = scales
        return y

    @staticmethod
    def backward(ctx, dy):
        x, g, u, xa, ha, w_g, w_u, w_d, a_gu, bl_g, bl_u, a_d, bl_d = ctx.saved_tensors
        s_g, s_u, s_d = ctx.scales
        r_g = bl_g.shape[1]
        need = ctx.needs_input_grad
        sig = torch.sigmoid(g)
        silu = g * sig
        dha = (dy @ bl_d).mul_(s_d)  # (tokens, r_d)
        d_bl_d = (dy.t() @ ha).mul_(s_d) if need[11] else None
        d_a_d = dha.t() @ (silu * u) if need[10] else None  # h, recomputed rather than saved
        dh = torch.addmm(dy @ w_d, dha, a_d)  # (tokens, inter)
        du = dh * silu
        del silu
        # d silu(g) / dg = sig * (1 + g * (1 - sig))
        dg = dh.mul_(u).mul_(torch.sub(1, sig).mul_(g).add_(1).mul_(sig))
        del sig
        dxa = torch.cat([(dg @ bl_g).mul_(s_g), (du @ bl_u).mul_(s_u)], dim=1)  # (tokens, r_g+r_u)
        return (
            torch.addmm(torch.addmm(dxa @ a_gu, dg, w_g), du, w_u) if need[0] else None,
            None,
            None,
            None,
            dg.sum(0) if need[4] else None,
            du.sum(0) if need[5] else None,
            dy.sum(0) if need[6] else None,
            dxa.t() @ x if need[7] else None,
            (dg.t() @ xa[:, :r_g]).mul_(s_g) if need[8] else None,
            (du.t() @ xa[:, r_g:]).mul_(s_u) if need[9] else None,
            d_a_d,
            d_bl_d,
            None,
        )


def _lora_parts(proj: nn.Module, dtype: torch.dtype | None, training: bool | None = None):
    """(weight, bias, A, B, scale) of a peft LoRA Linear in the plain case, else None.

    dtype None: the layer's own; training None: the dropout module's mode."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    if type(proj) is not LoraLinear or proj.merged or proj.disable_adapters:
        return None
    names = proj.active_adapters
    if len(names) != 1 or names[0] not in proj.lora_A:
        return None
    name = names[0]
    base, a, b = proj.base_layer, proj.lora_A[name], proj.lora_B[name]
    dropout = proj.lora_dropout[name]
    dtype = base.weight.dtype if dtype is None else dtype
    training = dropout.training if training is None else training
    if (
        type(base) is not nn.Linear
        or base.weight.requires_grad
        or (base.bias is not None and base.bias.requires_grad)
        or getattr(proj, "use_dora", {}).get(name, False)
        or getattr(proj, "lora_variant", {}).get(name) is not None
        or type(a) is not nn.Linear
        or type(b) is not nn.Linear
        or a.bias is not None
        or b.bias is not None
        or (training and not isinstance(dropout, nn.Identity) and dropout.p > 0)
        or not isinstance(proj.scaling[name], (int, float))
        or any(t.dtype != dtype for t in (base.weight, a.weight, b.weight))
    ):
        return None
    return base.weight, base.bias, a.weight, b.weight, float(proj.scaling[name])


def fused_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The fused MLP's output, or None when this call is not the plain LoRA case."""
    if torch.is_autocast_enabled(x.device.type):
        return None
    parts = [_lora_parts(getattr(mlp, p), x.dtype) for p in _PROJECTIONS]
    if any(p is None for p in parts):
        return None
    (w_g, b_g, a_g, bl_g, s_g), (w_u, b_u, a_u, bl_u, s_u), (w_d, b_d, a_d, bl_d, s_d) = parts
    flat = x.reshape(-1, x.shape[-1])  # (tokens, hidden)
    y = LoraSwiGLU.apply(
        flat,
        w_g,
        w_u,
        w_d,
        b_g,
        b_u,
        b_d,
        torch.cat([a_g, a_u]),
        bl_g,
        bl_u,
        a_d,
        bl_d,
        (s_g, s_u, s_d),
    )
    return y.view(*x.shape[:-1], y.shape[-1])


def is_swiglu_mlp(module: nn.Module) -> bool:
    """A gate/up/down MLP whose activation is SiLU: y = down(silu(gate(x)) * up(x))."""
    act = getattr(module, "act_fn", None)
    return (
        all(hasattr(module, p) for p in _PROJECTIONS)
        and act is not None
        and type(act).__name__ in ("SiLU", "SiLUActivation")
    )


def fused_in_training(model: nn.Module) -> int:
    """How many MLPs of `model` a training step would run fused, given one dtype and no
    autocast (what the memory planner asks of a model built on the meta device)."""
    return sum(
        is_swiglu_mlp(m) and all(_lora_parts(getattr(m, p), None, True) for p in _PROJECTIONS)
        for m in model.modules()
    )


def install_fused_lora_mlps(model: nn.Module) -> int:
    """Route each SwiGLU MLP of `model` through `LoraSwiGLU` when a call allows it; returns how
    many MLPs it installed on. The module's own forward stays the fallback for any other call."""
    count = 0
    for module in model.modules():
        if is_swiglu_mlp(module) and "forward" not in vars(module):
            module.forward = _FusedOrOwn(module)
            count += 1
    return count


class _FusedOrOwn:
    """A bound forward: the fused MLP where it applies, else the module's own forward."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = fused_forward(self.module, x)
        return type(self.module).forward(self.module, x) if y is None else y
