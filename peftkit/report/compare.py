"""`peftkit report RUN [RUN ...]`: one page comparing runs, a table of their key figures and
their curves overlaid; a folder of runs (a sweep's) stands for every run inside it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peftkit import units
from peftkit.errors import PeftkitError
from peftkit.io import RunLayout, atomic_write_text
from peftkit.recipe.load import flatten
from peftkit.report.page import (
    PALETTE,
    esc,
    is_report_page,
    loss_series,
    render_page,
    series,
    table,
)
from peftkit.report.run_page import read_json, read_jsonl, run_recipe

# (column, summary.json key or a function of the summary)
_COLUMNS: list[tuple[str, Any]] = [
    ("method", "method"),
    ("steps", "steps"),
    ("stop", "stop_reason"),
    ("trainable params", "trainable_params"),
    ("final train loss", "final_train_loss"),
    ("best eval loss", "best_eval_loss"),
    ("final eval loss", "final_eval_loss"),
    ("task metric after", lambda s: (s.get("answers") or {}).get("score_after")),
    ("reference ppl change %", lambda s: (s.get("forgetting") or {}).get("reference_ppl_change_pct")),
    ("tokens/s", "tokens_per_s"),
    ("peak memory", lambda s: units.size(s["peak_memory_bytes"]) if s.get("peak_memory_bytes") else None),
]  # fmt: skip


def find_runs(paths: Sequence[str | Path]) -> list[RunLayout]:
    """Each path is a run directory (it holds recipe.yaml) or a folder of them (a sweep's
    trial-NNN/ folders, a runs/ folder): the runs inside it, sorted by name."""
    runs = []
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            raise PeftkitError(f"{path} is not a folder")
        if RunLayout(path).recipe.is_file():
            runs.append(RunLayout(path))
            continue
        inside = sorted(p for p in path.iterdir() if RunLayout(p).recipe.is_file())
        if not inside:
            raise PeftkitError(
                f"{path} is neither a run directory (no recipe.yaml) nor a folder "
                "holding run directories"
            )
        runs += [RunLayout(p) for p in inside]
    return runs


def _label(run: RunLayout, runs: list[RunLayout]) -> str:
    names = [r.path.name for r in runs]
    return run.path.name if names.count(run.path.name) == 1 else str(run.path)


def compare_runs(paths: Sequence[str | Path], out: str | Path) -> Path:
    """Write one HTML page comparing the runs at `paths` to `out` (atomically); returns `out`.

    Refuses to write over anything but a page it wrote before.
    """
    runs = find_runs(paths)
    out = Path(out)
    if out.suffix != ".html":
        raise PeftkitError(f"--out {out}: name the page FILE.html")
    if out.exists() and not is_report_page(out):
        raise PeftkitError(
            f"--out {out}: exists and is not a page peftkit report wrote; choose another file"
        )
    rows, loss, evals, answers, recipes = [], [], [], [], []
    for run in runs:
        label, summary = _label(run, runs), read_json(run.summary) or {}
        cells = [summary.get(key) if isinstance(key, str) else key(summary) for _, key in _COLUMNS]
        if not summary:
            cells[[name for name, _ in _COLUMNS].index("stop")] = (
                "no summary.json (running, or stopped)"
            )
        rows.append([label, *cells])
        recipes.append(flatten(run_recipe(run)))
        records = read_jsonl(run.metrics)
        color = PALETTE[(len(rows) - 1) % len(PALETTE)]
        for s in loss_series(records, prefix=f"{label}: ", colors=(color, color)):
            (evals if s["name"].endswith("eval loss") else loss).append(s)
        points = [(r["step"], 100 * r["answer_score"]) for r in records if "answer_score" in r]
        if points:
            answers.append(series(label, points, style="markers", color=color))
    charts = [
        {"id": "train", "title": "Train loss", "x": "optimizer step", "y": "loss", "series": loss},
        {"id": "eval", "title": "Eval loss", "x": "optimizer step", "y": "loss", "series": evals},
    ]
    if answers:
        charts.append(
            {
                "id": "answers",
                "title": "Task metric on generated answers",
                "x": "optimizer step",
                "y": "held-out answers (%)",
                "range": [-3, 103],
                "series": answers,
            }
        )
    charts = [c for c in charts if c["series"]]
    differ = [
        k
        for k in dict.fromkeys(k for r in recipes for k in r)
        if k not in ("name", "output.dir") and len({repr(r.get(k)) for r in recipes}) > 1
    ]
    for row, recipe in zip(rows, recipes):
        row.append(", ".join(f"{k}={recipe.get(k)}" for k in differ))
    header = ["run", *(name for name, _ in _COLUMNS), "recipe differences"]
    paths_list = "".join(
        f"<li><a href='{esc(r.report.resolve().as_uri())}'>{esc(r.path)}</a></li>"
        if r.report.is_file()
        else f"<li>{esc(r.path)}</li>"
        for r in runs
    )
    sections = [("Runs", table(header, rows) + f"<ul>{paths_list}</ul>")]
    html = render_page(f"{len(runs)} runs compared", "", sections, charts)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, html)
    return out
