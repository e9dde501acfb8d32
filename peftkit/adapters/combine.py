"""`peftkit combine`: one LoRA adapter made from several, and how it does on each source's task.

The combination is peft's `add_weighted_adapter` (all adapters must sit on the same base):
  linear       weighted sum of the A and of the B matrices (same rank and targets only)
  cat          concatenate the ranks: ΔW = Σ w_i B_i A_i exactly (rank = Σ r_i)
  svd          ΔW = Σ w_i B_i A_i, truncated back to rank `svd_rank` by SVD
  ties         TIES-merging (keep the top `density` fraction of each update, elect signs by
               majority, average what agrees) on A and B; ties_svd does it on ΔW, then SVD
  dare_linear  DARE (drop a random 1 - density of each update, rescale by 1/density, then sum);
  dare_ties    dare_* on A and B, dare_*_svd on ΔW (random: seeded)
Then every source that carries its training recipe (a run directory, or a peftkit manifest) is
evaluated: the loss per supervised token on its eval data with the base model, its own adapter
and the combined one — what combining costs each task.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch
from annotated_types import Gt, Le

from peftkit.adapters.adapter_set import AdapterSet, resolve_adapter_dir
from peftkit.data.encode import EncodedRow
from peftkit.errors import PeftkitError, ServingError
from peftkit.io import MANIFEST, RunLayout, atomic_dir, atomic_write_text, guard_output
from peftkit.models.manifest import (
    default_system_prompt,
    read_manifest,
    training_prompt,
    write_manifest,
)
from peftkit.objectives.causal_lm import CausalLM
from peftkit.recipe.load import load_run_recipe, validate_recipe
from peftkit.recipe.schema import Recipe
from peftkit.training.evaluation import held_out_loss

HOW = (
    "linear",
    "cat",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
_COMBINED = "combined"


@dataclass
class TaskLoss:
    task: str
    rows: int
    base: float
    own: float
    combined: float


@dataclass
class CombineResult:
    out: Path
    how: str
    weights: list[float]
    tasks: list[TaskLoss] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def table(self) -> str:
        lines = [
            "| task | eval rows | base | own adapter | combined | combined - own |",
            "|---|---|---|---|---|---|",
        ]
        for t in self.tasks:
            lines.append(
                f"| {t.task} | {t.rows} | {t.base:.4f} | {t.own:.4f} | {t.combined:.4f} | "
                f"{t.combined - t.own:+.4f} |"
            )
        lines += [f"\n(not evaluated: {s})" for s in self.skipped]
        return "\n".join(lines)


def combine(
    sources: dict[str, str | Path],
    out: str | Path,
    how: str = "ties",
    weights: list[float] | None = None,
    density: Annotated[float, Gt(0), Le(1)] = 0.5,
    svd_rank: Annotated[int, Gt(0)] | None = None,
    base: str | None = None,
    seed: int = 0,
    evaluate: bool = True,
    max_eval_rows: int = 200,
    overwrite: bool = False,
) -> CombineResult:
    """Combine `sources` ({name: run dir or adapter folder}) into a new adapter written to `out`.

    Args:
        how: one of `HOW` (see the module docstring): linear, cat, svd, ties, dare_ties, ...
        weights: one per source (default: equal, summing to 1).
        density: fraction of each update kept by ties / dare / magnitude_prune.
        svd_rank: rank of the *_svd results (default: the largest source rank).
        base: the base model (default: the one the adapters were trained on).
        seed: seed of the random dare_* drops.
        evaluate: score the result on each source's eval data (the evaluation table).
        max_eval_rows: eval rows per source at most.
        overwrite: replace an existing output folder (only a previous combination).
    """
    if how not in HOW:
        raise ServingError(f"combine: unknown method {how!r}; choose one of {', '.join(HOW)}")
    if len(sources) < 2:
        raise ServingError("combine: give at least two adapters")
    weights = weights or [1.0 / len(sources)] * len(sources)
    if len(weights) != len(sources):
        raise ServingError(f"combine: {len(sources)} adapters but {len(weights)} weights")
    out = Path(out)
    dirs = {name: resolve_adapter_dir(path) for name, path in sources.items()}
    inputs = [*sources.values(), *dirs.values()]
    guard_output(out, "combine", inputs, overwrite, "pass overwrite", ServingError)
    # fp32 and unquantized: combining is arithmetic on the adapters' weights, kept exact
    aset = AdapterSet.from_adapters(dirs, base, dtype="float32", quantization=None)
    torch.manual_seed(seed)  # DARE drops at random
    try:
        aset.model.add_weighted_adapter(
            list(dirs),
            weights,
            _COMBINED,
            combination_type=how,
            density=density if how not in ("linear", "cat", "svd") else None,
            svd_rank=svd_rank,
        )
    except (ValueError, RuntimeError) as e:
        raise ServingError(
            f"combine ({how}): {str(e).splitlines()[0][:300]} — adapters of different ranks or "
            "target modules need an *_svd method or cat"
        ) from None
    _write(aset, dirs, out, how, weights, density, svd_rank)
    result = CombineResult(out, how, weights)
    if evaluate:
        # evaluate what was written, loaded back like any adapter (checks it is a valid one)
        aset.model.delete_adapter(_COMBINED)
        aset.add(_COMBINED, out)
        for name, adapter_dir in dirs.items():
            try:
                rows = _eval_rows(adapter_dir, aset, max_eval_rows)
            except PeftkitError as e:
                result.skipped.append(f"{name}: {e}")
                continue
            if rows is None:
                result.skipped.append(f"{name}: no training recipe with its data is recorded")
                continue
            losses = {m: _mean_loss(aset, m, rows) for m in (None, name, _COMBINED)}
            result.tasks.append(
                TaskLoss(name, len(rows), losses[None], losses[name], losses[_COMBINED])
            )
        atomic_write_text(out / "combine_report.md", result.table() + "\n")
    return result


def _write(aset: AdapterSet, dirs: dict[str, Path], out: Path, how, weights, density, svd_rank):
    first = dirs[next(iter(dirs))]
    manifests = {n: read_manifest(d) for n, d in dirs.items()}
    stop_tokens = sorted({t for m in manifests.values() if m for t in m.get("stop_tokens", [])})
    template = aset.adapters[next(iter(dirs))].chat_template
    # the sources' shared default system prompt, if they have one (else none: tasks differ)
    systems = {default_system_prompt(m) for m in manifests.values()}
    shared = systems.pop() if len(systems) == 1 else None
    with atomic_dir(out) as tmp:
        aset.model.save_pretrained(str(tmp / "peft"), selected_adapters=[_COMBINED])
        for f in (tmp / "peft" / _COMBINED).iterdir():  # peft nests non-default adapters
            f.replace(tmp / f.name)
        shutil.rmtree(tmp / "peft")
        config = json.loads((tmp / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = aset.spec.name
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        for f in first.iterdir():  # the tokenizer and chat template of the first source
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy2(f, tmp / f.name)
        write_manifest(
            tmp,
            aset.identity,
            method="lora",
            chat_template=template,
            stop_tokens=stop_tokens,
            recipe=None,
            prompt=training_prompt(
                template,
                "adapter",
                shared,
                [shared] if shared else [],
                aset.adapters[next(iter(dirs))].template_kwargs,  # (the first's, as its template)
            ),
            derived_from={
                "combine": how,
                "sources": {n: str(d) for n, d in dirs.items()},
                "weights": weights,
                "density": density,
                "svd_rank": svd_rank,
            },
        )


def _source_recipe(adapter_dir: Path) -> Recipe | None:
    run_recipe = RunLayout(adapter_dir.parent).recipe
    if run_recipe.is_file():  # only its data section is read: no model is loaded from it (the
        # base is loaded with trust_remote_code off), so the run's switch has nothing to run
        return load_run_recipe(run_recipe, trust_remote_code=True)
    manifest = read_manifest(adapter_dir)
    if manifest and manifest.get("recipe"):
        return validate_recipe(manifest["recipe"], str(adapter_dir / MANIFEST))
    return None


def _eval_rows(adapter_dir: Path, aset: AdapterSet, limit: int) -> list[EncodedRow] | None:
    """The source run's eval rows (its held-out rows when it had no eval files), as in training."""
    recipe = _source_recipe(adapter_dir)
    if recipe is None:
        return None
    seed = recipe.data_seed
    data = recipe.objective_kind.scored_rows(recipe, aset.tokenizer, seed)
    if not data.eval:
        raise ServingError("its run had no eval data (set data.eval or data.eval_fraction)")
    return data.eval[:limit]


def _mean_loss(aset: AdapterSet, adapter: str | None, rows: list[EncodedRow]) -> float:
    aset.activate(adapter)
    objective = CausalLM.padded(aset.tokenizer.pad_token_id)
    loss = held_out_loss(aset.model, rows, objective, batch_size=8, device=aset.device)
    aset.activate(None)
    return loss
