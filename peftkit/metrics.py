"""metrics.jsonl (one JSON object per logged step or evaluation) and the loss-curve plot."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from peftkit.io import atomic_write_text


class MetricsLog:
    """Appends metric records to a JSONL file (main process only) and keeps them for the plot."""

    def __init__(
        self,
        path: Path,
        enabled: bool,
        resume_from_step: int | None,
        on_log: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """`on_log(record)` is called with each record too (the experiment trackers)."""
        self.path = path
        self.enabled = enabled
        self.on_log = on_log
        self.records: list[dict[str, Any]] = []
        if enabled and path.exists():
            if resume_from_step is None:
                path.unlink()
            else:
                # Records after the checkpoint belong to steps that are about to be redone.
                kept = [r for r in self._read() if r.get("step", 0) <= resume_from_step]
                atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
                self.records = kept

    def _read(self) -> list[dict[str, Any]]:
        return read_records(self.path)

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.on_log is not None:
            self.on_log(record)

    def train_losses(self) -> list[tuple[int, float]]:
        return [(r["step"], r["loss"]) for r in self.records if "loss" in r]

    def eval_losses(self) -> list[tuple[int, float]]:
        return [(r["step"], r["eval_loss"]) for r in self.records if "eval_loss" in r]

    def series(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of every record that has `key` (e.g. `eval_loss/<task>`)."""
        return [(r["step"], r[key]) for r in self.records if key in r]

    def record_at(self, step: int) -> dict[str, Any]:
        """Every key logged at `step` (train and evaluation records merged)."""
        merged: dict[str, Any] = {}
        for r in self.records:
            if r["step"] == step:
                merged |= r
        return merged

    def task_names(self, prefix: str = "eval_loss/") -> list[str]:
        """Tasks with a `<prefix><task>` metric, in first-logged order."""
        keys = (k for r in self.records for k in r if k.startswith(prefix))
        return [k.removeprefix(prefix) for k in dict.fromkeys(keys)]


def read_records(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records; a line a kill cut short (or garbage) is dropped, not fatal."""
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def smooth(values: Sequence[float]) -> tuple[int, list[float]] | None:
    """Trailing mean over k = len/20 points (at least 2): the smoothed train-loss curve drawn in
    loss.png and report.html. None below 10 points, where smoothing would hide the curve."""
    if len(values) < 10:
        return None
    k = max(2, len(values) // 20)
    windows = (values[max(0, i - k + 1) : i + 1] for i in range(len(values)))
    return k, [sum(w) / len(w) for w in windows]


ChartPanel = tuple[Callable[["MetricsLog", Any], None], str]
"""A panel below the losses: `draw(log, ax)`, shown when the log has the series it names (an
objective's charts, `peftkit.objectives.base.ObjectiveKind.charts`)."""


def plot_losses(log: MetricsLog, path: Path, title: str, charts: Sequence[ChartPanel] = ()) -> None:
    """Train loss (raw and smoothed) and eval loss against optimizer step, saved as a PNG; below
    them the task metric on generated answers and the objective's own `charts`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = log.train_losses(), log.eval_losses()
    # panels below the losses: the task metric on generated answers; the objective's charts
    panels = [draw for draw, key in [(_plot_answers, "answer_score"), *charts] if log.series(key)]
    if panels:
        fig, axes = plt.subplots(
            1 + len(panels),
            1,
            figsize=(8, 4.5 + 2 * len(panels)),
            dpi=110,
            sharex=True,
            gridspec_kw={"height_ratios": [3] + [2] * len(panels)},
        )
        ax = axes[0]
        for draw, lower in zip(panels, axes[1:]):
            draw(log, lower)
    else:
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    answers = panels
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="train loss")
        smoothed = smooth(losses)
        if smoothed is not None:
            k, values = smoothed
            ax.plot(steps, values, color="tab:blue", linewidth=2, label=f"train loss (mean of {k})")
    if evals:
        steps, losses = zip(*evals)
        ax.plot(steps, losses, "o-", color="tab:orange", linewidth=2, label="eval loss")
    for task in log.task_names():
        steps, losses = zip(*log.series(f"eval_loss/{task}"))
        ax.plot(steps, losses, ".--", linewidth=1.2, label=f"eval loss: {task}")
    if not answers:
        ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / supervised token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    reference = log.series("reference_loss")
    if reference:  # forgetting: general-text loss on its own scale, beside the task curves
        right = ax.twinx()
        steps, losses = zip(*reference)
        right.plot(steps, losses, "s-", color="tab:red", linewidth=2, label="reference loss")
        right.set_ylabel("reference loss (nats / token, all tokens)", color="tab:red")
        right.tick_params(axis="y", colors="tab:red")
        more_handles, more_labels = right.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, fontsize="small")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def _plot_answers(log: MetricsLog, ax) -> None:
    """Share of held-out rows answered right (and the metric's other figures), in percent."""
    keys = [k for k in dict.fromkeys(k for r in log.records for k in r) if k.startswith("answer_")]
    for key in sorted(keys, key=lambda k: k != "answer_score"):
        steps, values = zip(*log.series(key))
        main = key == "answer_score"
        ax.plot(
            steps,
            [100 * v for v in values],
            "o-" if main else ".--",
            linewidth=2 if main else 1.2,
            color="tab:green" if main else None,
            label="task metric (rows right)"
            if main
            else key.removeprefix("answer_").replace("_", " "),
        )
    ax.set_ylim(-3, 103)
    ax.set_ylabel("held-out answers (%)")
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
