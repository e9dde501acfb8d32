"""report.html: everything about one run on one page, rebuilt from the files of its run directory
(so it works while the run trains, after it finished, and after an export)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

from peftkit import units
from peftkit.io import FIDELITY, RunLayout, atomic_write_text
from peftkit.metrics import read_records
from peftkit.recipe import yaml_strict
from peftkit.report.page import (
    REFERENCE,
    esc,
    key_values,
    loss_series,
    render_page,
    series,
    table,
)

log = logging.getLogger(__name__)

_SKIP_EVAL = ("eval_loss", "eval_ppl")
_SAMPLE_ROWS = 20  # answers.json rows shown side by side (the file holds them all)


def read_json(path: Path) -> Any:
    """A JSON file of the run, or None when it is not there (yet) or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return read_records(path) if path.is_file() else []


def run_charts(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chart specs of one run: loss (with per-task eval loss and the reference loss on its own
    axis), the task metric on generated answers, head metrics, lr, tokens/s, gradient norm."""
    keys = list(dict.fromkeys(k for r in records for k in r))

    def curve(key: str, name: str | None = None, scale: float = 1.0, **style: Any):
        points = [(r["step"], r[key] * scale) for r in records if key in r]
        return series(name or key, points, **style)

    loss = loss_series(records)
    loss += [
        curve(k, f"eval loss: {k.removeprefix('eval_loss/')}", style="dashed")
        for k in keys
        if k.startswith("eval_loss/")
    ]
    if "reference_loss" in keys:
        loss.append(
            curve("reference_loss", "reference loss", axis="y2", style="markers", color=REFERENCE)
        )
    charts = [
        {
            "id": "loss",
            "title": "Loss",
            "x": "optimizer step",
            "y": "loss (nats / supervised token)",
            "y2": "reference loss (nats / token)",
            "series": loss,
        }
    ]
    answers = sorted(
        (k for k in keys if k.startswith("answer_")), key=lambda k: k != "answer_score"
    )
    if answers:
        charts.append(
            {
                "id": "answers",
                "title": "Task metric on generated answers",
                "x": "optimizer step",
                "y": "held-out answers (%)",
                "range": [-3, 103],
                "series": [
                    curve(k, k.removeprefix("answer_").replace("_", " "), 100, style="markers")
                    for k in answers
                ],
            }
        )
    rewards = [k for k in keys if k.startswith(("rewards/", "logps/"))]
    if rewards:  # preference objectives: per step, beside their eval_ counterparts below
        charts.append(
            {
                "id": "preference",
                "title": "Preference rewards (training steps)",
                "x": "optimizer step",
                "y": "value",
                "series": [curve(k) for k in rewards if not k.startswith("logps/")],
            }
        )
    heads = [k for k in keys if k.startswith("eval_") and not k.startswith(_SKIP_EVAL)]
    if heads:
        charts.append(
            {
                "id": "eval-metrics",
                "title": "Evaluation metrics",
                "x": "optimizer step",
                "y": "value",
                "series": [curve(k, k.removeprefix("eval_"), style="markers") for k in heads],
            }
        )
    for key, title, unit in (
        ("lr", "Learning rate", "lr"),
        ("tokens_per_s", "Throughput", "tokens / s (training steps only)"),
        ("grad_norm", "Gradient norm", "norm before clipping"),
    ):
        if key in keys:
            charts.append(
                {
                    "id": key,
                    "title": title,
                    "x": "optimizer step",
                    "y": unit,
                    "series": [curve(key)],
                }
            )
    return charts


def _audit(audit: dict[str, Any] | None) -> str:
    if audit is None:
        return "<p class='muted'>no data_audit.json in this run</p>"
    columns = ["split", "rows_read", "rows_kept", "tokens", "supervised_tokens", "supervised_share"]
    columns += ["rows_truncated", "rows_dropped_too_long", "rows_without_supervised_tokens"]
    out = table(columns, ([s.get(c) for c in columns] for s in audit["splits"]))
    if audit.get("class_names"):
        out += f"<p>classes: {esc(', '.join(audit['class_names']))}</p>"
    if audit.get("rows"):
        out += (
            f"<p>chat template: {esc(audit['chat_template_source'])}; turns end with "
            f"{esc(', '.join(audit['stop_tokens']))}. The first training rows, "
            "<mark>supervised tokens highlighted</mark> (the loss is computed on these only):</p>"
        )
        if any(row.get("parts") for row in audit["rows"]):
            out += "<p>Agent parts: " + ", ".join(
                _part(label, kind) for kind, label in _PARTS.items()
            )
            out += " (tool results never carry loss).</p>"
        for row in audit["rows"]:
            parts = row.get("parts") or [""] * len(row["segments"])
            text = "".join(
                _part(f"<mark>{esc(t)}</mark>" if supervised else esc(t), kind, escaped=True)
                for (t, supervised), kind in zip(row["segments"], parts)
            )
            out += f"<h3>{esc(row['origin'])}</h3><div class='row'>{text}</div>"
    return out


_PARTS = {"reasoning": "reasoning", "tool_call": "tool call", "tool_result": "tool result"}
_PART_STYLE = {
    "reasoning": "border-bottom:2px dotted #7a5195;font-style:italic",
    "tool_call": "border-bottom:2px solid #ef5675",
    "tool_result": "border-bottom:2px dashed #ffa600;background:#fff6e0",
}


def _part(text: str, kind: str, escaped: bool = False) -> str:
    """`text` marked as an agent part of a chat (reasoning, tool call, tool result)."""
    body = text if escaped else esc(text)
    if kind not in _PART_STYLE:
        return body
    return f"<span class='part {kind}' title='{_PARTS[kind]}' style='{_PART_STYLE[kind]}'>{body}</span>"


def _before_after(rows: list[dict[str, Any]], first: str, scored: bool) -> str:
    header = [first, "before", "after"]
    if scored:
        header[1:1] = ["reference"]
        header += ["score before", "score after"]
    cells = (
        [r[first.lower()]]
        + ([r["reference"]] if scored else [])
        + [r.get("before", "-"), r["after"]]
        + ([r.get("score_before"), r.get("score_after")] if scored else [])
        for r in rows[:_SAMPLE_ROWS]
    )
    note = (
        f"<p class='muted'>first {_SAMPLE_ROWS} of {len(rows)}</p>"
        if len(rows) > _SAMPLE_ROWS
        else ""
    )
    return table(header, cells) + note


def _fidelity(run: RunLayout) -> str:
    parts = []
    for record in read_jsonl(run.exports):
        out = Path(record["out"])
        report = read_json(out / FIDELITY)
        if report is None:
            parts.append(f"<p class='muted'>{esc(out)}: no longer there</p>")
            continue
        verdict = (
            "<span class='pass'>passed</span>"
            if report.get("passed")
            else "<span class='fail'>failed</span>"
        )
        link = f"<a href='{esc(out.resolve().as_uri())}'>{esc(out)}</a>"
        parts.append(
            f"<h3>{link}: {verdict} ({esc(report.get('what', report.get('format', '')))})</h3>"
            + key_values(report.get("fidelity", {}))
        )
    return "".join(parts)


def _readable(summary: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    """summary.json's `keys` as the Summary table shows them: sizes and times in human units
    (the file keeps the exact numbers)."""
    shown: dict[str, Any] = {}
    for key in keys:
        value = summary.get(key)
        if key == "train_seconds":
            shown["train_time"] = None if value is None else units.duration(value)
        elif key == "peak_memory_bytes":
            kind = summary.get("peak_memory_kind")
            text = None if value is None else units.size(value) + (f" ({kind})" if kind else "")
            shown["peak_memory"] = text
        else:
            shown[key] = value
    return shown


def _sections(run: RunLayout, summary: dict[str, Any] | None) -> list[tuple[str, str]]:
    sections = []
    if summary is not None:
        keys = [
            "steps", "epochs", "stop_reason", "tokens", "supervised_tokens", "tokens_per_s",
            "train_seconds", "peak_memory_bytes", "trainable_params", "total_params",
            "first_train_loss", "final_train_loss", "first_eval_loss", "final_eval_loss",
            "best_eval_loss", "best_step",
        ]  # fmt: skip
        sections.append(("Summary", key_values(_readable(summary, keys))))
        for key, title in (
            ("answers", "Task metric (before -> after)"),
            ("forgetting", "Forgetting (reference set)"),
            ("tasks", "Tasks"),
            ("eval_metrics", "Evaluation metrics (last evaluation)"),
        ):
            if summary.get(key):
                sections.append((title, key_values(summary[key])))
    answers, samples = read_json(run.answers), read_json(run.samples)
    if answers:
        sections.append(("Held-out answers before / after", _before_after(answers, "Prompt", True)))
    if samples:
        sections.append(("Sample prompts before / after", _before_after(samples, "Prompt", False)))
    sections.append(("Data audit", _audit(read_json(run.audit))))
    fidelity = _fidelity(run)
    if fidelity:
        sections.append(("Exports and their fidelity", fidelity))
    recipe = run.recipe.read_text() if run.recipe.is_file() else "(no recipe.yaml)"
    sections.append(("Recipe", f"<pre>{esc(recipe)}</pre>"))
    meta = read_json(run.meta)
    if meta is not None:
        env = {k: meta.get(k) for k in ("peftkit_version", "device", "precision", "weights_dtype")}
        env |= {"processes": meta.get("processes"), **meta.get("versions", {})}
        sections.append(("Environment", key_values(env)))
    return sections


def run_recipe(run: RunLayout) -> dict[str, Any]:
    """The run's saved recipe as a dict ({} when there is none or it does not parse)."""
    try:
        recipe = yaml_strict.load(run.recipe.read_text())  # as strictly as any recipe
    except (OSError, yaml.YAMLError):
        return {}
    return recipe if isinstance(recipe, dict) else {}


def run_title(run: RunLayout) -> str:
    recipe = run_recipe(run)
    method = (recipe.get("adapter") or {}).get("method", "?")
    model = (recipe.get("model") or {}).get("name", "?")
    return f"{recipe.get('name', run.path.name)}: {method} on {model}"


def write_run_report(run_dir: str | Path) -> Path:
    """Write RUN/report.html (atomically) from the run directory's files; returns its path.

    Called by training at every evaluation and at the end, and by export; safe to call on any run
    directory at any time: what is not there yet (summary, answers, exports) is left out.
    """
    run = RunLayout(run_dir)
    records = read_jsonl(run.metrics)
    summary = read_json(run.summary)
    last = max((r.get("step", 0) for r in records), default=0)
    if summary is not None and summary.get("steps", -1) < last:
        summary = None  # the summary of the run before a --resume that is training now
    if summary is not None:
        status = f"finished: {summary.get('stop_reason')} at step {summary.get('steps')}"
    else:
        status = f"training: last logged step {last} (reload to update)"
    title = run_title(run)
    charts = run_charts(records)
    html = render_page(title, status, _sections(run, summary), charts)
    atomic_write_text(run.report, html)
    log.debug("wrote %s", run.report)
    return run.report


def refresh_run_report(run_dir: str | Path) -> Path | None:
    """`write_run_report` for training and export: a page that cannot be written (a full disk, a
    hand-edited file) is logged as a warning and never stops the run or the export."""
    try:
        return write_run_report(run_dir)
    except Exception as e:  # the report is a view; the run's own files are what counts
        log.warning("could not write %s: %s", RunLayout(run_dir).report, e)
        return None
