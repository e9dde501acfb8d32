"""One self-contained HTML page: inline CSS, the inline chart script and the data it draws from.
Nothing is fetched when the page is opened (no CDN, no fonts, no images by address)."""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from peftkit.metrics import smooth
from peftkit.recipe.load import flatten


def _asset(name: str) -> str:
    return resources.files("peftkit").joinpath("assets", "report", name).read_text()


GENERATOR = "peftkit report"
"""Marks a page as ours: `peftkit report --out` replaces no other HTML file."""


def is_report_page(path: Path) -> bool:
    try:
        head = path.read_text(errors="replace")[:2000]
    except OSError:
        return False
    return f"<meta name='generator' content='{GENERATOR}'>" in head


def render_page(
    title: str, status: str, sections: Sequence[tuple[str, str]], charts: list, wide: int = 1
) -> str:
    """The page: `sections` are (heading, inner HTML) after the charts, which the script draws
    (the first `wide` full width, the others two by two)."""
    data = json.dumps(
        {"charts": charts, "wide": wide, "palette": PALETTE}, allow_nan=False
    ).replace("</", "<\\/")
    body = "".join(f"<section><h2>{esc(h)}</h2>{inner}</section>" for h, inner in sections)
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<meta name='generator' content='{GENERATOR}'>"
        f"<title>{esc(title)}</title><style>{_asset('report.css')}</style></head><body>"
        f"<h1>{esc(title)}</h1><p class='status'>{esc(status)}</p>"
        "<section><h2>Curves</h2><div id='charts'></div></section>"
        f"{body}"
        f"<script type='application/json' id='report-data'>{data}</script>"
        f"<script>{_asset('report.js')}</script></body></html>\n"
    )


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """A figure as a table shows it: floats to 4 significant digits, big integers with commas."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def table(header: Sequence[str] | None, rows: Iterable[Sequence[Any]]) -> str:
    head = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join(
        "<tr>"
        + "".join(
            f"<td class='num'>{esc(fmt(c))}</td>"
            if isinstance(c, (int, float)) and not isinstance(c, bool)
            else f"<td>{esc(fmt(c))}</td>"
            for c in row
        )
        + "</tr>"
        for row in rows
    )
    return f"<table>{head}{body}</table>"


def key_values(data: dict[str, Any]) -> str:
    """A two-column table; nested dicts become dotted keys."""
    return table(None, flatten(data).items())


def series(name: str, points: list[tuple[int, float]], **style: Any) -> dict[str, Any]:
    """One curve for the chart script: [step, value] points (non-finite values dropped)."""
    clean = [[s, v] for s, v in points if isinstance(v, (int, float)) and v == v and abs(v) < 1e308]
    return {"name": name, "points": clean, **style}


# matplotlib's tab10, so report.html's curves have loss.png's colours (train blue, eval orange,
# reference red); curves without a colour of their own get the next unused one.
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]  # fmt: skip
TRAIN, EVAL, REFERENCE = PALETTE[0], PALETTE[1], PALETTE[3]


def loss_series(
    records: list[dict[str, Any]], prefix: str = "", colors: tuple[str, str] = (TRAIN, EVAL)
) -> list[dict[str, Any]]:
    """Train loss raw and smoothed (as loss.png draws them), eval loss: the curves every run has."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    out = [series(f"{prefix}train loss", train, style="raw", color=colors[0])]
    smoothed = smooth([v for _, v in train])
    if smoothed is not None:
        k, values = smoothed
        steps = [s for s, _ in train]
        name = f"{prefix}train loss (mean of {k})"
        out.append(series(name, list(zip(steps, values)), color=colors[0]))
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    out.append(series(f"{prefix}eval loss", evals, style="markers", color=colors[1]))
    return [s for s in out if s["points"]]
