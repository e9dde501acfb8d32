"""`peftkit plan`: predict a recipe's peak training memory, say whether it fits, and what to change.

The prediction uses the real micro-batches of the run: the data is tokenized as training would,
and the step plan (same seed) gives every micro-batch the run will see, so the largest one is
known exactly. Parameter counts come from the model built on the meta device (no weights load).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from peftkit import units
from peftkit.launch import Launch
from peftkit.planner.counts import ModelCounts, count
from peftkit.planner.estimate import (
    STORAGE,
    Estimate,
    Workload,
    estimate,
    generated_row_bytes,
)
from peftkit.recipe.schema import Recipe

log = logging.getLogger(__name__)


@dataclass
class Plan:
    device: str
    precision: str
    packing: bool
    workload: Workload
    counts: ModelCounts
    estimate: Estimate
    budget: float | None
    advice: list[str]
    launch: Launch | None = None
    """The launch planned for (processes, sharding); None = one process."""

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.estimate.total <= self.budget


def largest_micro_batch(
    recipe: Recipe, lengths: np.ndarray, supervised: np.ndarray, packing: bool, multiple: int = 1
) -> Workload:
    """Tokens (padding included) and supervised positions of the run's largest micro-batch."""
    from peftkit.data.step_plan import StepPlan, TokenBudget

    t = recipe.train
    seed = recipe.data_seed
    plan = StepPlan(len(lengths), t.micro_batch_size, t.grad_accum, 1, seed)
    steps = t.max_steps or math.ceil(t.epochs * plan.steps_per_epoch)
    group = None if packing or not t.group_by_length else lengths
    budget = (
        TokenBudget(lengths, t.micro_batch_tokens) if packing and t.micro_batch_tokens else None
    )
    best = Workload(0, 0)
    for epoch in range(math.ceil(steps / plan.steps_per_epoch)):
        order = plan.epoch_order(epoch)
        for step in range(min(plan.steps_per_epoch, steps - epoch * plan.steps_per_epoch)):
            for mb in plan.micro_batches(order, step, 0, group, budget):
                if packing:
                    tokens = -(-int(lengths[mb].sum()) // multiple) * multiple
                else:
                    tokens = len(mb) * int(lengths[mb].max())
                if tokens > best.tokens:
                    best = Workload(tokens, int(supervised[mb].sum()))
    return best


def with_generation(
    work: Workload, recipe: Recipe, eval_rows: list, tokenizer, counts, value_bytes: int
) -> Workload:
    """`work` plus the evaluation's largest generate call (`training/generated.py`), if the
    recipe's evaluation generates: its rows (eval.batch_size, fewer to fit the generation budget)
    and the longest prompt."""
    from peftkit.training.generated import held_out_answers, rows_per_generate

    spec = recipe.eval
    items = held_out_answers(eval_rows[: spec.rows], tokenizer) if spec.metric != "none" else []
    if not items:
        return work
    prompt = max(len(item.prompt_ids) for item in items)
    one_row = generated_row_bytes(counts, prompt, spec.max_new_tokens, value_bytes)
    rows = rows_per_generate(min(spec.batch_size, len(items)), one_row)
    return replace(
        work,
        generation_rows=rows,
        prompt_tokens=prompt,
        generation_tokens=prompt + spec.max_new_tokens,
    )


def _runtime_bytes(device: str) -> float:
    if device != "cpu":
        from peftkit.planner.estimate import CUDA_CONTEXT

        return CUDA_CONTEXT
    import psutil

    return float(psutil.Process().memory_info().rss)


def make_plan(
    recipe: Recipe, gpu_memory: float | None = None, launch: Launch | None = None
) -> Plan:
    """Predict the peak memory of training `recipe` (per process under `launch`, which says how
    state is sharded); on a GPU of `gpu_memory` bytes if given."""
    from peftkit.data.encode import row_lengths
    from peftkit.models.load import load_tokenizer
    from peftkit.objectives.batches import pack_multiple, resolve_packing
    from peftkit.training.precision import resolve_precision, weights_dtype

    kind = recipe.objective_kind
    if kind.support.plan is not None:
        from peftkit.errors import RecipeError

        raise RecipeError(
            f"peftkit plan models supervised fine-tuning of a causal LM; objective {kind.name!r} "
            f"({kind.support.plan}) is not modelled yet"
        )
    on_gpu = gpu_memory is not None or torch.cuda.is_available()
    if (
        gpu_memory is not None
        and not torch.cuda.is_available()
        and recipe.train.precision == "auto"
    ):
        precision = "bf16"  # planning for a GPU from a machine without one: assume a bf16 GPU
    else:
        precision = resolve_precision(recipe.train, on_gpu)
    tokenizer = load_tokenizer(recipe.model, needs_eos=kind.needs_eos)
    data, _ = kind.prepare_data(recipe, tokenizer, recipe.data_seed)  # the rows training reads
    lengths = row_lengths(data.train)
    supervised = np.array([r.n_supervised for r in data.train])
    packing = resolve_packing(recipe.train, recipe.adapter, recipe.model.attn_implementation)
    multiple = pack_multiple(precision, on_gpu)
    work = largest_micro_batch(recipe, lengths, supervised, packing, multiple)
    counts = count(recipe, tokenizer)
    if counts.frozen_experts:
        log.warning(
            f"the MoE experts ({', '.join(counts.frozen_experts)}) stay frozen: no adapter "
            "reaches these 3-D expert weights; set adapter.target_parameters: auto to adapt them"
        )
    device = "gpu" if on_gpu else "cpu"
    runtime = _runtime_bytes(device)
    storage = str(weights_dtype(recipe.model, recipe.adapter, precision)).removeprefix("torch.")
    work = with_generation(work, recipe, data.eval or [], tokenizer, counts, STORAGE[storage])
    quant = recipe.model.quantization

    def predict(recipe_: Recipe, work_: Workload, bits: int | None) -> Estimate:
        t = recipe_.train
        return estimate(
            counts,
            precision=precision,
            storage_dtype=storage,
            quant_bits=bits,
            full_weights=recipe_.adapter.full_weights,
            optimizer=t.optimizer,
            gradient_checkpointing=t.gradient_checkpointing,
            supervised_only=t.supervised_logits_only and not recipe_.adapter.virtual_tokens,
            lora=recipe_.adapter.lora_family,
            work=work_,
            runtime_bytes=runtime,
            cpu=device == "cpu",
            shards=launch.processes if launch and launch.shards_state else 1,
            shard_weights=launch is not None and launch.shards_weights,
            upcast_unquantized=quant is not None and quant.upcast_unquantized,
        )

    est = predict(recipe, work, quant.bits if quant else None)
    budget = gpu_memory
    if budget is None and device == "cpu":
        import psutil

        budget = float(psutil.virtual_memory().total)
    advice = []
    if budget is not None and est.total > budget:
        advice = _advice(recipe, work, quant.bits if quant else None, predict, budget, packing)
    return Plan(device, precision, packing, work, counts, est, budget, advice, launch)


def _advice(recipe, work, bits, predict, budget, packing: bool) -> list[str]:
    """Changes that bring the prediction under the budget, each with its predicted peak."""
    options = []
    t = recipe.train
    if not t.gradient_checkpointing:
        r = recipe.model_copy(
            update={"train": t.model_copy(update={"gradient_checkpointing": True})}
        )
        options.append(("train.gradient_checkpointing=true", predict(r, work, bits)))
    if t.micro_batch_size > 1:
        half = t.micro_batch_size // 2
        scale = half / t.micro_batch_size
        w = replace(
            work, tokens=max(1, int(work.tokens * scale)), supervised=int(work.supervised * scale)
        )
        options.append(
            (
                f"train.micro_batch_size={half} train.grad_accum={t.grad_accum * 2} (same global batch)",
                predict(recipe, w, bits),
            )
        )
    if packing and work.tokens > 1:
        half = work.tokens // 2
        w = replace(work, tokens=half, supervised=work.supervised // 2)
        options.append(
            (f"train.micro_batch_tokens={half} (same global batch)", predict(recipe, w, bits))
        )
    variant = recipe.adapter.quantized_variant
    if bits is None and variant is not None:
        options.append(
            (f"adapter.method={variant} model.quantization.bits=4", predict(recipe, work, 4))
        )
    if recipe.adapter.full_weights and t.optimizer == "adamw":
        r = recipe.model_copy(update={"train": t.model_copy(update={"optimizer": "adamw_8bit"})})
        options.append(("train.optimizer=adamw_8bit", predict(r, work, bits)))
    lines = []
    for change, est in sorted(options, key=lambda o: o[1].total):
        verdict = "fits" if est.total <= budget else "still too big"
        lines.append(f"{change}: ~{units.size(est.total)} ({verdict})")
    return lines


def format_plan(plan: Plan) -> str:
    c, w = plan.counts, plan.workload
    lines = [
        f"model: {c.base_params / 1e6:,.1f}M parameters, {c.layers} layers, hidden {c.hidden}, vocab {c.vocab:,}; "
        f"trainable {c.trainable_params / 1e6:,.2f}M",
        f"device: {plan.device}, precision {plan.precision}, "
        + ("packed rows" if plan.packing else "padded rows")
        + f"; largest micro-batch: {w.tokens:,} tokens, {w.supervised:,} supervised",
        *([f"launch: {plan.launch.describe()}; figures are per process"] if plan.launch else []),
        "",
        f"{'component':<16}{'memory':>11}",
    ]
    for name, value in plan.estimate.parts.items():
        lines.append(f"{name:<16}{units.size(value):>11}")
    lines.append(f"{'peak (total)':<16}{units.size(plan.estimate.total):>11}")
    if plan.budget is not None:
        where = "GPU" if plan.device == "gpu" else "RAM"
        lines.append(
            f"\n{'fits' if plan.fits else 'does NOT fit'} in {units.size(plan.budget)} of {where}"
        )
    if plan.advice:
        lines.append("to make it fit, change (predicted peak):")
        lines += [f"  - {a}" for a in plan.advice]
    return "\n".join(lines)


def parse_size(text: str) -> float:
    """'24GB', '24GiB', '80G', '512MB' -> bytes (GB and GiB both read as 2**30, as GPUs are sold)."""
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    if s and s[-1] in units:
        return float(s[:-1]) * units[s[-1]]
    return float(s)
