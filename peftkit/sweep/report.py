"""What a sweep leaves behind: trials.jsonl (one record per trial), results.md (the table, best
first) and best_recipe.yaml (the recipe with the best trial's values, ready for `peftkit train`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from peftkit import units
from peftkit.errors import RecipeError, SweepError
from peftkit.io import atomic_write_text
from peftkit.recipe.load import apply_override, load_recipe, read_yaml
from peftkit.sweep.space import override

if TYPE_CHECKING:
    import optuna

# Table order: finished trials by objective first, then trials that stopped early.
_STATE_RANK = {"complete": 0, "pruned": 1, "failed": 2, "interrupted": 3, "running": 4}


@dataclass
class TrialRecord:
    """One line of trials.jsonl."""

    number: int
    state: str
    """complete | pruned | failed | interrupted | running (a trial of an earlier, stopped sweep)."""
    params: dict[str, Any]
    value: float | None
    """The objective of a complete trial (lower is better)."""
    best_eval_loss: float | None
    steps: int | None
    seconds: float | None
    run_dir: str | None
    error: str | None
    baseline: bool = False
    """Trial 0 of a space with `baseline: true`: the recipe's own values."""


def trial_records(study: optuna.Study) -> list[TrialRecord]:
    """Every trial of the study, sorted best first."""
    records = []
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.WAITING:  # enqueued, never started: no values, no run
            continue
        attrs = t.user_attrs
        state = attrs.get("state", t.state.name.lower())
        records.append(
            TrialRecord(
                number=t.number,
                state=state,
                params=dict(t.params),
                value=t.value if state == "complete" else None,
                best_eval_loss=attrs.get("best_eval_loss"),
                steps=attrs.get("steps"),
                seconds=attrs.get("seconds"),
                run_dir=attrs.get("run_dir"),
                error=attrs.get("error"),
                baseline=attrs.get("baseline", False),
            )
        )
    return sorted(records, key=_rank)


def _rank(r: TrialRecord) -> tuple[int, float, int]:
    score = r.value if r.value is not None else r.best_eval_loss
    return (_STATE_RANK.get(r.state, 5), score if score is not None else float("inf"), r.number)


def write_trials(path: Path, records: list[TrialRecord]) -> None:
    """trials.jsonl in trial order, rewritten whole so a reader never sees half a line."""
    lines = [json.dumps(asdict(r)) for r in sorted(records, key=lambda r: r.number)]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def results_table(records: list[TrialRecord], objective: str) -> str:
    """A markdown table of the trials, best first."""
    keys = sorted({k for r in records for k in r.params})
    head = ["#", "trial", "state", objective, *keys, "steps", "time", "note"]
    rows = [
        [
            str(i),
            str(r.number),
            r.state,
            _loss(r.value if r.state == "complete" else r.best_eval_loss),
            *(format_value(r.params.get(k)) for k in keys),
            str(r.steps if r.steps is not None else ""),
            units.duration(r.seconds) if r.seconds is not None else "",
            _note(r),
        ]
        for i, r in enumerate(records, 1)
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def format_value(value: Any) -> str:
    """A param value for a table: 3 significant digits for floats (learning rates)."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _loss(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _note(r: TrialRecord) -> str:
    notes = ["baseline"] if r.baseline else []
    if r.error:
        notes.append(r.error.splitlines()[0][:120])
    return "; ".join(notes)


def write_results(
    path: Path, records: list[TrialRecord], objective: str, title: str, best_recipe: Path | None
) -> str:
    """results.md: a line of counts, where the best recipe is, and the table. Returns the table."""
    counts = {s: sum(r.state == s for r in records) for s in _STATE_RANK}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    table = results_table(records, objective)
    best = f"Best recipe: `{best_recipe}`\n\n" if best_recipe else "No trial completed.\n\n"
    text = (
        f"# Sweep: {title}\n\n{len(records)} trials ({summary}); objective {objective}, "
        f"lower is better. Pruned trials show their best eval loss before they were stopped.\n\n"
        f"{best}{table}\n"
    )
    atomic_write_text(path, text)
    return table


def write_best_recipe(
    path: Path,
    recipe_path: Path,
    overrides: list[str],
    best: TrialRecord,
    objective: str,
) -> None:
    """The original recipe file with the sweep's overrides and the best params applied.

    Data paths are written as the recipe resolved them (absolute), because relative paths are
    read from the recipe's folder and this file lives in the sweep folder. Loaded once before
    it is kept, so what is written is a recipe `peftkit train` accepts.
    """
    raw = read_yaml(recipe_path, "recipe", RecipeError)  # as load_recipe reads it
    param_overrides = [override(k, v) for k, v in best.params.items()]
    for item in [*overrides, *param_overrides]:
        apply_override(raw, item)
    resolved = load_recipe(recipe_path, [*overrides, *param_overrides])
    data = raw.setdefault("data", {})
    for split in ("train", "eval"):
        if data.get(split):
            data[split] = [
                s.model_dump(exclude_defaults=True) for s in getattr(resolved.data, split)
            ]
    params = ", ".join(param_overrides)
    header = (
        f"# peftkit train {path}\n"
        f"# Best of sweep {path.parent}: trial {best.number}, {objective} {best.value:.4f}\n"
        f"# {recipe_path}" + (f" + {' '.join(overrides)}" if overrides else "") + f" + {params}\n"
    )
    text = header + yaml.safe_dump(raw, sort_keys=False)
    tmp = path.with_name(f".{path.name}.check.yaml")
    tmp.write_text(text)
    try:
        load_recipe(tmp)
    except RecipeError as e:  # a bug in the lines above, not in the user's input
        raise SweepError(f"the best recipe written to {tmp} does not load: {e}") from e
    tmp.unlink()
    atomic_write_text(path, text)
