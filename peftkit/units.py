"""Sizes and times as a person reads them: `540 MiB`, `1.23 GiB`, `45.3 s`, `4 min 18 s`.

The one place that turns bytes and seconds into text for the terminal, report.html, `peftkit
plan` and export cards. Files meant for programs (summary.json, metrics.jsonl) keep the exact
numbers; only what is printed or rendered goes through here.
"""

from __future__ import annotations

import math

_SIZE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def size(n_bytes: float) -> str:
    """Bytes in binary units (1 KiB = 1024 B), three significant digits from KiB up.

    Args:
        n_bytes: a size in bytes (negative sizes keep their sign).

    Returns:
        `"512 B"`, `"3.50 KiB"`, `"540 MiB"`, `"12.3 GiB"`, `"80.0 GiB"`.
    """
    if not math.isfinite(n_bytes):
        return f"{n_bytes} B"
    sign, n = ("-" if n_bytes < 0 else ""), abs(float(n_bytes))
    if n < 1024:
        return f"{sign}{n:.0f} B"
    exponent, value = 0, n
    while value >= 1024 and exponent < len(_SIZE_UNITS) - 1:
        exponent, value = exponent + 1, value / 1024
    if round(value, _decimals(value)) >= 1024 and exponent < len(_SIZE_UNITS) - 1:
        exponent, value = exponent + 1, value / 1024  # 1023.9 MiB reads as 1.00 GiB
    return f"{sign}{value:,.{_decimals(value)}f} {_SIZE_UNITS[exponent]}"


def _decimals(value: float) -> int:
    """Decimals that give three significant digits (none past 100)."""
    return 2 if value < 10 else 1 if value < 100 else 0


def duration(seconds: float) -> str:
    """Seconds as `"0.42 s"`, `"45.3 s"`, `"4 min 18 s"` or `"2 h 05 min"`.

    Args:
        seconds: a duration in seconds (not negative).

    Returns:
        Under a minute in seconds (3 significant digits), under an hour in minutes and whole
        seconds, else in hours and whole minutes.
    """
    if not math.isfinite(seconds):
        return f"{seconds} s"
    if seconds < 59.95:
        return f"{seconds:.{_decimals(seconds)}f} s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min"
