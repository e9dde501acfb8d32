"""LoRA and its variants (rsLoRA, DoRA; PiSSA/OLoRA/LoftQ/EVA/CorDA init) and QLoRA, through peft.

LoRA freezes W0 and learns a low-rank update:  y = W0 x + (alpha / r) B A x,
with A (r x in) and B (out x r); B starts at zero so training starts from the base model.
rsLoRA scales by alpha / sqrt(r) instead, which keeps high ranks stable. DoRA splits W into
magnitude and direction, y = m * (W0 + BA) x / ||W0 + BA||, training m as well.
QLoRA is LoRA over a 4-bit (NF4) frozen base whose weights are dequantized per matmul.
LoRA+ (`loraplus_lr_ratio`) trains B (and the 1-d vectors: DoRA's magnitudes) at lr x ratio, A at
lr, as peft's `create_loraplus_optimizer` groups them. The initialisations are described in
`lora_init.py`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, model_validator

from peftkit.errors import RecipeError
from peftkit.methods.base import ApplyContext, RecipeView
from peftkit.methods.lora_init import (
    CordaSpec,
    EvaSpec,
    LoftQSpec,
    peft_init,
    run_corda,
    run_eva,
    token_batches,
)
from peftkit.methods.peft_method import PeftMethod
from peftkit.methods.registry import register

if TYPE_CHECKING:
    from peft import LoraConfig
    from torch import nn

_INIT_DIR = "lora-init"  # the adapter at step 0, needed to convert PiSSA/OLoRA back to plain LoRA
_MOVES_BASE = ("pissa", "olora", "corda", "loftq")  # inits that rewrite W0 as they fill A, B
_CONVERTIBLE = ("pissa", "olora", "corda")  # ... and whose adapter converts back to plain LoRA
_SECTIONS = {"loftq": "loftq", "eva": "eva", "corda": "corda"}  # init -> its options section


@register
class LoraSpec(PeftMethod):
    """LoRA: low-rank updates on the chosen linear layers."""

    method: Literal["lora"] = "lora"
    mergeable: ClassVar[bool] = True
    gguf_adapter: ClassVar[bool] = True
    lora_family: ClassVar[bool] = True
    quantized_variant: ClassVar[str | None] = "qlora"
    r: int = Field(default=16, gt=0)
    """Rank: higher = more capacity, more memory."""
    alpha: float = Field(default=32, gt=0)
    """Scale numerator: the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt, or all-linear (every linear layer but the output head)."""
    target_parameters: list[str] | Literal["auto"] | None = None
    """Parameters to adapt that are not linear modules: a MoE's routed experts, stored by
    transformers 5 as 3-D tensors (`experts.gate_up_proj`, `experts.down_proj`). auto = every
    such expert parameter of the model; a list = peft's `target_parameters`."""
    exclude_modules: list[str] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    init: Literal["default", "gaussian", "pissa", "olora", "loftq", "eva", "corda"] = "default"
    """default: B = 0, A Kaiming. pissa/olora start from the principal/orthogonal part of W0;
    loftq fits A, B to a quantized W0; eva/corda read the run's first training batches (A from
    the layer inputs' SVD; W0 decomposed against their covariance)."""
    pissa_niter: int | None = Field(default=None, gt=0)
    """init pissa: fast randomised SVD with this many subspace iterations (peft's
    pissa_niter_K); null = the exact SVD."""
    loftq: LoftQSpec | None = None
    """init loftq: the quantization the adapter is fitted to (defaults when null)."""
    eva: EvaSpec | None = None
    """init eva: its options (defaults when null)."""
    corda: CordaSpec | None = None
    """init corda: its options (defaults when null)."""
    init_batches: int = Field(default=8, gt=0)
    """init eva/corda: how many training micro-batches (the run's first, in training order)
    feed the initialisation."""
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] = []
    """Modules trained in full and saved with the adapter (e.g. lm_head, embed_tokens)."""
    layers_to_transform: list[int] | None = None
    loraplus_lr_ratio: float | None = Field(default=None, gt=0)
    """LoRA+: B matrices (and 1-d vectors) learn at train.lr x this ratio (the paper suggests
    ~16); A at train.lr. None = plain LoRA."""
    loraplus_lr_embedding: float = Field(default=1e-6, gt=0)
    """LoRA+: the absolute learning rate of LoRA on embeddings (peft's default)."""

    @model_validator(mode="after")
    def _init_options_match_init(self) -> LoraSpec:
        for init, key in _SECTIONS.items():
            if getattr(self, key) is not None and self.init != init:
                raise ValueError(f"adapter.{key} configures init: {init}; set adapter.init: {init}")
        if self.pissa_niter is not None and self.init != "pissa":
            raise ValueError("adapter.pissa_niter configures init: pissa; set adapter.init: pissa")
        if self.init in ("loftq", "eva", "corda") and self.use_dora:
            raise ValueError(
                f"adapter.init {self.init} cannot start a DoRA adapter: remove use_dora"
            )
        return self

    def lr_scales(self, model: nn.Module, lr: float) -> dict[str, float] | None:
        """LoRA+'s groups, as peft's `create_loraplus_optimizer` forms them."""
        if self.loraplus_lr_ratio is None:
            return None
        scales = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if "lora_embedding_" in name:
                scales[name] = self.loraplus_lr_embedding / lr
            elif "lora_B" in name or p.ndim == 1:
                scales[name] = self.loraplus_lr_ratio
            else:
                scales[name] = 1.0
        return scales

    @property
    def off_is_start(self) -> bool:
        return self.init not in _MOVES_BASE  # eva keeps B = 0; the others move W0

    def check_recipe(self, recipe: RecipeView) -> list[str]:
        problems = super().check_recipe(recipe)
        if self.init in _MOVES_BASE and recipe.model.quantization is not None:
            problems.append(
                f"adapter.init {self.init!r} rewrites the base weights and cannot run on a quantized base: "
                + (
                    "LoftQ quantizes a full-precision base itself; remove model.quantization"
                    if self.init == "loftq"
                    else "use init: default with QLoRA"
                )
            )
        return problems

    def sharded_problems(self, engine: str) -> list[str]:
        if self.init in ("loftq", "eva", "corda"):
            return [
                f"adapter.init {self.init} under {engine}: it reads or rewrites whole weights "
                "before the engine shards them; launch it with DDP or on one process"
            ]
        return []

    def export_refusal(self, adapter_only: bool) -> str | None:
        if self.init != "loftq":
            return None
        base = (
            "the base loaded in 4-bit NF4 (bnb_4bit_use_double_quant: false)"
            if self._loftq.bits == 4
            else "the base loaded in 8-bit"
        )
        return (
            "a LoftQ adapter is fitted to the quantized base Q(W0) that training used, not to the "
            f"full-precision base peftkit's export loads (merged or checked): use RUN/adapter over {base}"
        )

    def for_counting(self) -> LoraSpec:
        if self.init in ("default", "gaussian"):
            return self
        # SVD/QR/quantization cannot run on meta weights, nor EVA/CorDA without data
        cleared = {
            "init": "default",
            "pissa_niter": None,
            "loftq": None,
            "eva": None,
            "corda": None,
        }
        return self.model_copy(update=cleared)

    @property
    def _loftq(self) -> LoftQSpec:
        return self.loftq or LoftQSpec()

    def peft_config(self, model: nn.Module, ctx: ApplyContext) -> LoraConfig:
        from peft import EvaConfig, LoftQConfig, LoraConfig
        from peft.tuners.lora.config import CordaConfig

        extra = {}
        if self.init == "loftq":
            import importlib.util

            if importlib.util.find_spec("scipy") is None:
                raise RecipeError(
                    "adapter.init loftq needs scipy (peft's LoftQ requires it): "
                    "pip install 'peftkit[loftq]'"
                )
            extra["loftq_config"] = LoftQConfig(
                loftq_bits=self._loftq.bits, loftq_iter=self._loftq.iter
            )
        elif self.init == "eva":
            extra["eva_config"] = EvaConfig(**(self.eva or EvaSpec()).model_dump())
        elif self.init == "corda":
            corda = self.corda or CordaSpec()
            extra["corda_config"] = CordaConfig(
                corda_method=corda.mode,
                use_float16_for_covariance=corda.use_float16_for_covariance,
                verbose=False,
            )
        return LoraConfig(
            task_type=ctx.task_type,
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            target_parameters=self._target_parameters(model),
            exclude_modules=self.exclude_modules,
            use_rslora=self.use_rslora,
            use_dora=self.use_dora,
            init_lora_weights=peft_init(self.init, self.pissa_niter),
            bias=self.bias,
            modules_to_save=self.modules_to_save or None,
            layers_to_transform=self.layers_to_transform,
            **extra,
        )

    def _target_parameters(self, model: nn.Module) -> list[str] | None:
        if self.target_parameters != "auto":
            return self.target_parameters
        from peftkit.models.layers import expert_parameters

        return expert_parameters(model) or None

    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        if self.init == "loftq":
            import torch

            if not torch.cuda.is_available():
                raise RecipeError(
                    "adapter.init loftq quantizes the base on a CUDA GPU (peft's LoftQ, with "
                    "bitsandbytes) and none is visible: run it on a GPU, or use init: default"
                )
        if self.init == "corda":  # CorDA decomposes the base's weights before A, B exist
            run_corda(
                model, self.peft_config(model, ctx), token_batches(ctx, "corda", self.init_batches)
            )
        batches = token_batches(ctx, "eva", self.init_batches) if self.init == "eva" else None
        model = super().apply(model, ctx)
        if batches is not None:
            run_eva(model, batches, ctx.work_dir)
        if self.init in _CONVERTIBLE:
            init_dir = ctx.work_dir / _INIT_DIR
            if not init_dir.exists():
                # Saved with init=True so that loading it does not run PiSSA/OLoRA a second time.
                config = model.peft_config["default"]
                init, config.init_lora_weights = config.init_lora_weights, True
                tmp = init_dir.with_name(init_dir.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                model.save_pretrained(str(tmp), safe_serialization=True)
                tmp.replace(init_dir)
                config.init_lora_weights = init
        return model

    def save(self, model: nn.Module, out_dir: Path, ctx: ApplyContext) -> None:
        if self.init in _CONVERTIBLE:
            # PiSSA/OLoRA/CorDA changed W0; converting yields a rank-2r LoRA on the *original* base.
            model.save_pretrained(
                str(out_dir),
                safe_serialization=True,
                path_initial_model_for_weight_conversion=str(ctx.work_dir / _INIT_DIR),
            )
        else:
            super().save(model, out_dir, ctx)


@register
class QLoraSpec(LoraSpec):
    """QLoRA: LoRA over a bitsandbytes-quantized base (set model.quantization)."""

    method: Literal["qlora"] = "qlora"
    quantized_variant: ClassVar[str | None] = None

    def check_recipe(self, recipe: RecipeView) -> list[str]:
        problems = super().check_recipe(recipe)
        if recipe.model.quantization is None:
            problems.append(
                "adapter.method 'qlora' needs a quantized base: add model.quantization (e.g. bits: 4), "
                "or use method: lora"
            )
        return problems
