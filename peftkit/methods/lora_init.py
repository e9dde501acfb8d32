"""LoRA's initialisations beyond B = 0 (`adapter.init` of method lora), through peft.

- pissa / olora: A, B from the principal (SVD) / orthonormal (QR) part of W0, which they remove
  from W0; `pissa_niter` uses the fast randomised SVD (peft's `pissa_niter_K`).
- loftq: W0 is replaced by its 4-/8-bit quantization Q(W0) and A, B start from the rank-r SVD of
  the residual, so that Q + B A ~ W0 (alternating `iter` times). Needs a full-precision base and
  a CUDA GPU (peft quantizes with bitsandbytes there).
- eva: A starts from the right singular vectors of the layer inputs on the run's first training
  batches (incremental SVD), B = 0; ranks are redistributed across layers by explained variance
  (up to r x rho per layer, the same total).
- corda: W0 = U S V^T is decomposed against the covariance C of its inputs on the run's first
  training batches (SVD of W0 C); ipm keeps the r most input-relevant components in A, B (and
  removes them from W0), kpm the r least (knowledge-preserving).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from peftkit.errors import RecipeError
from peftkit.methods.base import ApplyContext
from peftkit.section import Section

if TYPE_CHECKING:
    from peft import LoraConfig
    from torch import nn

EVA_FILE = "eva-init.safetensors"  # the EVA vectors, so a resumed run rebuilds the same ranks


class LoftQSpec(Section):
    """LoftQ's quantization of the base (peft's LoftQConfig)."""

    bits: Literal[4, 8] = 4
    """Bits of the quantized base the adapter is fitted to: 4 (NF4) or 8."""
    iter: int = Field(default=1, gt=0)
    """Alternating quantize / SVD rounds."""


class EvaSpec(Section):
    """EVA's options (peft's EvaConfig)."""

    rho: float = Field(default=2.0, ge=1.0)
    """A layer may get up to r x rho ranks (1.0 = every layer keeps r)."""
    tau: float = Field(default=0.99, ge=0.0, le=1.0)
    """Convergence threshold: cosine similarity of the components between two batches."""
    use_label_mask: bool = True
    """Only supervised positions (labels set) feed the SVD."""
    whiten: bool = False
    """Scale the components by their singular values' inverse square root."""
    adjust_scaling_factors: bool = True
    """Scale alpha with a redistributed rank, so every layer's update keeps its scale."""


class CordaSpec(Section):
    """CorDA's options (peft's CordaConfig)."""

    mode: Literal["ipm", "kpm"] = "ipm"
    """ipm: instruction-previewed (adapt the r components the data uses most); kpm:
    knowledge-preserving (adapt the r it uses least)."""
    use_float16_for_covariance: bool = False
    """Keep the input covariances in fp16 (half the extra memory, less precise)."""


def peft_init(init: str, pissa_niter: int | None) -> bool | str:
    """peft's `init_lora_weights` value for `adapter.init`."""
    if init == "default":
        return True
    if init == "pissa" and pissa_niter is not None:
        return f"pissa_niter_{pissa_niter}"
    return init


def token_batches(ctx: ApplyContext, init: str, n: int) -> list:
    """The run's first `n` training micro-batches, for a data-aware init; a named error without."""
    if ctx.batches is None:
        raise RecipeError(
            f"adapter.init {init} reads activations of the training rows, and this run's rows are "
            "not token sequences (preference pairs, prompts or labeled rows): use init: default"
        )
    return ctx.batches(n)


def run_corda(model: nn.Module, config: LoraConfig, batches: list) -> None:
    """peft's `preprocess_corda` on the base model (before the adapter is attached), its
    covariances collected from a forward pass over each row of `batches`."""
    import torch

    from peftkit import _compat

    preprocess_corda = _compat.peft_corda().preprocess_corda
    device = next(model.parameters()).device
    if config.target_modules == "all-linear":  # resolved by get_peft_model, not by CorDA's matcher
        config.target_modules = _linear_names(model)

    @torch.no_grad()
    def run_model() -> None:  # one unpadded row per call: peft's hook reads (seq, dim) inputs
        for batch in batches:
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                model(input_ids=ids[mask.bool()].unsqueeze(0).to(device))  # (1, seq)

    preprocess_corda(model, config, run_model=run_model)


def _linear_names(model: nn.Module) -> set[str]:
    """The names (last part) of the linear layers but the output head, as peft's all-linear."""
    from torch import nn

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head
    }


def run_eva(model: nn.Module, batches: list, work_dir: Path) -> None:
    """peft's EVA on the attached adapter. The vectors are kept in the run's work folder (and read
    from there on --resume, so the ranks are those the run started with)."""
    from peft import initialize_lora_eva_weights
    from peft.tuners.lora.eva import get_eva_state_dict
    from safetensors.torch import load_file, save_file

    from peftkit.io import atomic_write_with

    path = work_dir / EVA_FILE
    if path.exists():
        state = load_file(str(path), device=str(next(model.parameters()).device))
    else:
        # Every process feeds the same rows, so nothing is gathered across processes.
        state = get_eva_state_dict(
            model, batches, gather_distributed_inputs=False, show_progress_bar=False
        )
        atomic_write_with(
            path, lambda tmp: save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        )
    initialize_lora_eva_weights(model, eva_state_dict=state, show_progress_bar=False)
