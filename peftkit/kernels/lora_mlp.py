"""A fused SwiGLU MLP for LoRA training: the same math, fewer saved activations and matmuls.

The gated MLP of Llama-family models (Llama, Mistral, Qwen2/3, SmolLM, ...) with LoRA on its
three projections computes, with d_* the LoRA dropout of each projection (identity in eval),

    g = W_g x + s_g B_g A_g d_g(x),   u = W_u x + s_u B_u A_u d_u(x),   h = silu(g) * u,
    y = W_d h + s_d B_d A_d d_d(h)

Run module by module, autograd keeps g, silu(g), u and h for the backward (and, with dropout,
each dropped input and its mask): four or more intermediate-size tensors per token and layer,
about half of all activations on a model such as SmolLM2. `LoraSwiGLU` keeps g and u, recomputes
silu(g) and h in the backward (elementwise, cheap next to the matmuls) and, with dropout,
regenerates the masks from the RNG state it saved (as activation checkpointing does) instead of
keeping them. Without dropout the two LoRA-A products that share x run as one matmul.

It follows peft's `lora.Linear` / `lora.Linear4bit` forward in every dtype choice: the LoRA input
is cast to the LoRA weights' dtype before dropout; under autocast every matmul runs in the
autocast dtype (fp32 LoRA weights and fp32 or half bases alike); without autocast a LoRA branch
in a wider dtype than the base is summed in that dtype and cast back. 4-bit (bitsandbytes NF4/FP4)
bases are dequantized per layer inside the function, in the forward and again in the backward,
never kept. Gradients equal the module-by-module autograd to float rounding (tests).

It runs only where it is exactly that math: frozen `nn.Linear` or 4-bit bases, one active plain
LoRA adapter on all three projections (no DoRA or other variant, no LoRA bias), not merged,
adapters enabled. Any other call runs the model's own forward, so an 8-bit base, a disabled
adapter (the reference pass of a preference loss, the forgetting report) get exactly what they
got before. Each installed MLP records how its training calls ran (`fused_mlp_status`).
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _dense(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's weight (out, in) in `dtype`; a 4-bit weight is dequantized (a transient)."""
    if type(base) is nn.Linear:
        return base.weight.to(dtype)
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).to(dtype)


def _rng_state(device: torch.device) -> Any:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _masks(state: Any, device: torch.device, specs: list[tuple[tuple[int, ...], float]], dtype):
    """The dropout scale masks (0 or 1/(1-p)) the forward drew from `state`, drawn again in the
    same order, shape and dtype; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if device.type == "cuda":
            torch.cuda.set_rng_state(state, device)
        else:
            torch.set_rng_state(state)
        return [
            F.dropout(torch.ones(shape, dtype=dtype, device=device), p, True) if p else None
            for shape, p in specs
        ]


def _add_lora(base: torch.Tensor, xa: torch.Tensor, b: torch.Tensor, s: float, cd) -> torch.Tensor:
    """base + s (xa @ b^T), summed in xa's dtype (the LoRA branch's), returned in `cd`."""
    if xa.dtype == base.dtype:
        return base.addmm_(xa, b.t(), alpha=s)
    return torch.addmm(base.to(xa.dtype), xa, b.t(), alpha=s).to(cd)


class LoraSwiGLU(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)), LoRA on all three; saves x, g, u and the LoRA-A outputs.

    `cfg`: (bases, base biases, scales, dropout ps, compute dtype, LoRA compute dtype, dtype of
    the LoRA input (what dropout runs in))."""

    @staticmethod
    def forward(ctx, x, a_g, b_g, a_u, b_u, a_d, b_d, cfg):
        (base_g, base_u, base_d), (c_g, c_u, c_d), (s_g, s_u, s_d), ps, cd, lcd, ld = cfg
        ctx.rng = _rng_state(x.device) if any(ps) else None
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(cd)
            xl = x.to(ld)  # the LoRA input, in the dtype peft drops it out in
            if ps[0] or ps[1]:  # separate masks: two LoRA-A products
                xa_g = F.dropout(xl, ps[0], True).to(lcd) @ a_g.to(lcd).t()  # (tokens, r_g)
                xa_u = F.dropout(xl, ps[1], True).to(lcd) @ a_u.to(lcd).t()
            else:  # both LoRA-A products in one matmul
                xa = xl.to(lcd) @ torch.cat([a_g, a_u]).to(lcd).t()
                xa_g, xa_u = xa.split([a_g.shape[0], a_u.shape[0]], dim=1)
            g = _add_lora(F.linear(xc, _dense(base_g, cd), c_g), xa_g, b_g.to(lcd), s_g, cd)
            u = _add_lora(F.linear(xc, _dense(base_u, cd), c_u), xa_u, b_u.to(lcd), s_u, cd)
            h = F.silu(g).mul_(u)  # (tokens, inter)
            hl = h.to(ld)
            ha = (F.dropout(hl, ps[2], True) if ps[2] else hl).to(lcd) @ a_d.to(lcd).t()
            del hl
            y = _add_lora(F.linear(h, _dense(base_d, cd), c_d), ha, b_d.to(lcd), s_d, cd)
        ctx.save_for_backward(x, g, u, xa_g, xa_u, ha, a_g, b_g, a_u, b_u, a_d, b_d)
        ctx.cfg = cfg
        return y  # (tokens, hidden)

    @staticmethod
    def backward(ctx, dy):
        x, g, u, xa_g, xa_u, ha, a_g, b_g, a_u, b_u, a_d, b_d = ctx.saved_tensors
        (base_g, base_u, base_d), _, (s_g, s_u, s_d), ps, cd, lcd, ld = ctx.cfg
        need = ctx.needs_input_grad
        m_g = m_u = m_d = None
        if ctx.rng is not None:
            specs = [(tuple(x.shape), ps[0]), (tuple(x.shape), ps[1]), (tuple(g.shape), ps[2])]
            m_g, m_u, m_d = _masks(ctx.rng, x.device, specs, ld)

        def dropped(t, mask):  # the LoRA-A input the forward used, in lcd
            t = t.to(ld)
            return (t * mask if mask is not None else t).to(lcd)

        def undrop(grad, mask, dtype):  # gradient through the dtype cast and the dropout
            grad = grad.to(ld)
            return (grad * mask if mask is not None else grad).to(dtype)

        with torch.autocast(dy.device.type, enabled=False):
            sig = torch.sigmoid(g)
            silu = F.silu(g)  # as the forward rounded it (h is recomputed exactly)
            dy_l = dy.to(lcd)
            dha = (dy_l @ b_d.to(lcd)).mul_(s_d)  # (tokens, r_d)
            d_b_d = (dy_l.t() @ ha).mul_(s_d).to(b_d.dtype) if need[6] else None
            d_a_d = (dha.t() @ dropped(silu * u, m_d)).to(a_d.dtype) if need[5] else None
            dh = dy @ _dense(base_d, cd)  # (tokens, inter)
            dh += undrop(dha @ a_d.to(lcd), m_d, cd)
            du = dh * silu
            del silu
            # d silu(g) / dg = sig * (1 + g * (1 - sig))
            dg = dh.mul_(u).mul_(torch.sub(1, sig).mul_(g).add_(1).mul_(sig))
            del sig
            dg_l, du_l = dg.to(lcd), du.to(lcd)
            dxa_g = (dg_l @ b_g.to(lcd)).mul_(s_g)  # (tokens, r_g)
            dxa_u = (du_l @ b_u.to(lcd)).mul_(s_u)
            d_b_g = (dg_l.t() @ xa_g).mul_(s_g).to(b_g.dtype) if need[2] else None
            d_b_u = (du_l.t() @ xa_u).mul_(s_u).to(b_u.dtype) if need[4] else None
            d_a_g = (dxa_g.t() @ dropped(x, m_g)).to(a_g.dtype) if need[1] else None
            d_a_u = (dxa_u.t() @ dropped(x, m_u)).to(a_u.dtype) if need[3] else None
            dx = None
            if need[0]:
                dx = torch.addmm(
                    dg @ _dense(base_g, cd), du, _dense(base_u, cd)
                )  # (tokens, hidden)
                if m_g is None and m_u is None:
                    lora = torch.cat([dxa_g, dxa_u], 1) @ torch.cat([a_g, a_u]).to(lcd)
                    dx += undrop(lora, None, cd)
                else:
                    dx += undrop(dxa_g @ a_g.to(lcd), m_g, cd)
                    dx += undrop(dxa_u @ a_u.to(lcd), m_u, cd)
                dx = dx.to(x.dtype)
        return dx, d_a_g, d_b_g, d_a_u, d_b_u, d_a_d, d_b_d, None


def _lora_linear_types() -> tuple[type, ...]:
    from peft.tuners.lora.layer import Linear as LoraLinear

    if sys.modules.get("bitsandbytes") is None:
        return (LoraLinear,)
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    return (LoraLinear, LoraLinear4bit)


def _is_4bit(base: nn.Module) -> bool:
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and type(base) is bnb.nn.Linear4bit


def _lora_parts(proj: nn.Module, cd: torch.dtype | None, training: bool | None = None):
    """(base, A, B, scale, dropout p) of a peft LoRA Linear in the plain case, else the reason.

    cd: the compute dtype (None: the base's own); training None: the dropout module's mode."""
    if type(proj) not in _lora_linear_types():
        return f"{type(proj).__name__} layers (only LoRA over plain or 4-bit linear bases)"
    if proj.merged or proj.disable_adapters:
        return "adapter merged or disabled"
    names = proj.active_adapters
    if len(names) != 1 or names[0] not in proj.lora_A:
        return "not exactly one active LoRA adapter"
    name = names[0]
    base, a, b = proj.base_layer, proj.lora_A[name], proj.lora_B[name]
    dropout = proj.lora_dropout[name]
    training = dropout.training if training is None else training
    four_bit = _is_4bit(base)
    if type(base) is not nn.Linear and not four_bit:
        return f"base layer {type(base).__name__} (only plain or 4-bit linear bases)"
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return "the base layer trains"
    if (
        getattr(proj, "use_dora", {}).get(name, False)
        or getattr(proj, "lora_variant", {}).get(name) is not None
    ):
        return "a LoRA variant (DoRA, ...)"
    if (
        type(a) is not nn.Linear
        or type(b) is not nn.Linear
        or a.bias is not None
        or b.bias is not None
    ):
        return "LoRA layers with bias"
    if any(hasattr(w, "ds_id") for w in (base.weight, a.weight, b.weight)):
        return "DeepSpeed ZeRO-3 partitions the weights (gathered per module call)"
    if type(dropout) not in (nn.Identity, nn.Dropout):
        return f"LoRA dropout {type(dropout).__name__}"
    if not isinstance(proj.scaling[name], (int, float)):
        return "a per-input LoRA scaling"
    if a.weight.dtype != b.weight.dtype or not a.weight.dtype.is_floating_point:
        return "LoRA A and B in different dtypes"
    if four_bit:
        state = base.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            return "4-bit weight repacked for CPU inference"
        if cd is not None and (base.compute_dtype or cd) != cd:
            return "4-bit compute dtype differs from the input's"
    elif cd is not None and base.weight.dtype != cd:
        return "base weight dtype differs from the input's"
    p = dropout.p if training and type(dropout) is nn.Dropout else 0.0
    return base, a.weight, b.weight, float(proj.scaling[name]), p


def fused_forward(mlp: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor | None, str | None]:
    """(the fused MLP's output, None), or (None, why not) when this call is not the plain case."""
    autocast = torch.is_autocast_enabled(x.device.type)
    cd = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
    parts = [_lora_parts(getattr(mlp, p), None if autocast else cd) for p in _PROJECTIONS]
    reason = next((p for p in parts if isinstance(p, str)), None)
    if reason is not None:
        return None, reason
    if len({a.dtype for _, a, _, _, _ in parts}) != 1:
        return None, "LoRA weights of the three projections in different dtypes"
    if any(_is_4bit(base) and (base.compute_dtype or cd) != cd for base, *_ in parts):
        return None, "4-bit compute dtype differs from autocast's"
    four_bit = {_is_4bit(base) for base, *_ in parts}
    if four_bit == {True} and x.dtype != cd:
        return None, "4-bit base with an input outside its compute dtype"
    if len(four_bit) != 1:
        return None, "4-bit and unquantized bases in one MLP"
    (base_g, a_g, b_g, s_g, p_g), (base_u, a_u, b_u, s_u, p_u), (base_d, a_d, b_d, s_d, p_d) = parts
    bases = (base_g, base_u, base_d)
    biases = tuple(None if base.bias is None else base.bias.to(cd) for base in bases)
    # under autocast every matmul is in its dtype; else the LoRA branch runs in its own
    lcd = cd if autocast else a_g.dtype
    # peft casts the LoRA input to the LoRA dtype before dropout, except over 4-bit bases under
    # autocast (`lora.Linear4bit`: no conversion there)
    ld = x.dtype if autocast and four_bit == {True} else a_g.dtype
    cfg = (bases, biases, (s_g, s_u, s_d), (p_g, p_u, p_d), cd, lcd, ld)
    flat = x.reshape(-1, x.shape[-1])  # (tokens, hidden)
    y = LoraSwiGLU.apply(flat, a_g, b_g, a_u, b_u, a_d, b_d, cfg)
    return y.view(*x.shape[:-1], y.shape[-1]), None


def is_swiglu_mlp(module: nn.Module) -> bool:
    """A gate/up/down MLP whose activation is SiLU: y = down(silu(gate(x)) * up(x))."""
    act = getattr(module, "act_fn", None)
    return (
        all(hasattr(module, p) for p in _PROJECTIONS)
        and act is not None
        and type(act).__name__ in ("SiLU", "SiLUActivation")
    )


def fused_in_training(model: nn.Module) -> int:
    """How many MLPs of `model` a training step would run fused (what the memory planner asks of
    a model built on the meta device; autocast and weight dtypes do not stop it)."""
    return sum(
        is_swiglu_mlp(m)
        and not any(isinstance(_lora_parts(getattr(m, p), None, True), str) for p in _PROJECTIONS)
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


def fused_mlp_status(model: nn.Module) -> dict[str, Any]:
    """Whether the fused MLP ran in the training forwards (autograd on) of `model` so far:
    {"used": bool, "reason": why not (absent when used)}."""
    forwards = [
        m.forward for m in model.modules() if isinstance(vars(m).get("forward"), _FusedOrOwn)
    ]
    if not forwards:
        return {"used": False, "reason": "no SwiGLU MLP with LoRA on gate, up and down"}
    fused = sum(f.fused for f in forwards)
    own = Counter()
    for f in forwards:
        own.update(f.own)
    if fused and not own:
        return {"used": True}
    if not fused and not own:
        return {"used": False, "reason": "no training forward ran"}
    reason = own.most_common(1)[0][0]
    if fused:
        return {
            "used": True,
            "partly": f"{sum(own.values())} of {fused + sum(own.values())} "
            f"MLP calls ran the model's own forward: {reason}",
        }
    return {"used": False, "reason": reason}


class _FusedOrOwn:
    """A bound forward: the fused MLP where it applies, else the module's own forward. Counts
    training calls (autograd on): `fused`, and `own` by the reason the fused path did not run."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.fused = 0
        self.own: Counter[str] = Counter()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y, reason = fused_forward(self.module, x)
        if torch.is_grad_enabled():
            if y is None:
                self.own[reason] += 1
            else:
                self.fused += 1
        return type(self.module).forward(self.module, x) if y is None else y
