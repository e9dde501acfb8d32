"""Sizes and times as printed and rendered (peftkit/units.py)."""

from __future__ import annotations

import pytest

from peftkit.units import duration, size


@pytest.mark.parametrize(
    ("n_bytes", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (3.5 * 2**10, "3.50 KiB"),
        (566_722_560, "540 MiB"),  # the quickstart's peak memory
        (12.34 * 2**30, "12.3 GiB"),
        (80 * 2**30, "80.0 GiB"),
        (2**30 - 1, "1.00 GiB"),  # rounds up into the next unit, never "1,024 MiB"
        (-5 * 2**20, "-5.00 MiB"),
    ],
)
def test_size_in_binary_units_to_three_digits(n_bytes, text):
    assert size(n_bytes) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.42, "0.42 s"),
        (45.31, "45.3 s"),
        (59.97, "1 min 00 s"),
        (258, "4 min 18 s"),
        (605.4, "10 min 05 s"),
        (3599.6, "1 h 00 min"),
        (7500, "2 h 05 min"),
    ],
)
def test_duration_in_seconds_minutes_or_hours(seconds, text):
    assert duration(seconds) == text
