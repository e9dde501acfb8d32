"""The training progress bar: its elapsed time, rate and ETA count training steps only.

tqdm measures the time between two updates; an evaluation, a round of generated answers or a
checkpoint between two steps would count as part of the next step (a 30 s step-0 evaluation
before 3 s steps reads as "35 s/step" and a tenfold ETA). Here the loop times each optimizer step
on a `StepClock`, and the bar reads its elapsed time and rate from that clock; the work between
steps is shown as a labelled phase instead (`bar.phase("answering 40 held-out rows")`).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from tqdm.auto import tqdm


class StepClock:
    """Seconds spent inside training steps, nothing else.

    `with clock:` times one optimizer step (`clock.last` is its duration afterwards); `clock()` is
    the total so far, the step in progress included.
    """

    def __init__(self, now: Callable[[], float] = time.perf_counter) -> None:
        """`now`: the time source in seconds (a fake one in tests)."""
        self._now = now
        self.seconds = 0.0
        self.last = 0.0
        self._started: float | None = None

    def __enter__(self) -> StepClock:
        self._started = self._now()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._started is not None
        self.last = self._now() - self._started
        self.seconds += self.last
        self._started = None

    def __call__(self) -> float:
        running = self._now() - self._started if self._started is not None else 0.0
        return self.seconds + running


class TrainingBar(tqdm):
    """A tqdm bar over optimizer steps whose elapsed time, rate and ETA come from a `StepClock`:
    steps done in this session over the seconds spent in them, whatever ran between steps."""

    def __init__(
        self,
        *args: Any,
        clock: StepClock,
        desc: str = "training",
        live: bool = True,
        **kwargs: Any,
    ) -> None:
        """`live`: redraw the bar when a phase starts and ends (on a terminal; in a log file the
        phase's own log line says it, and each redraw would be another line)."""
        self.clock = clock  # before tqdm's __init__, which draws the bar once
        self.training_desc = desc
        self.live = live
        super().__init__(*args, desc=desc, **kwargs)

    @classmethod
    def for_run(cls, clock: StepClock, total: int, initial: int, main: bool) -> TrainingBar:
        """The run's bar (main process only); in a log file (not a terminal) refreshed every 30 s
        instead of many times a second."""
        terminal = sys.stderr.isatty()
        return cls(
            clock=clock,
            total=total,
            initial=initial,
            disable=not main,
            unit="step",
            dynamic_ncols=True,
            mininterval=0.2 if terminal else 30,
            live=terminal,
        )

    @property
    def format_dict(self) -> dict[str, Any]:
        """tqdm's public figures, with `elapsed` and `rate` (steps per second) from the clock."""
        figures = super().format_dict
        seconds = self.clock()
        done = figures["n"] - (figures.get("initial") or 0)
        figures["elapsed"] = seconds
        figures["rate"] = done / seconds if done > 0 and seconds > 0 else None
        return figures

    @contextlib.contextmanager
    def phase(self, label: str) -> Iterator[None]:
        """Show `label` instead of "training" while the work between two steps runs; the clock
        does not run, so it counts in neither the rate nor the ETA."""
        self.set_description_str(label, refresh=self.live)
        try:
            yield
        finally:
            self.set_description_str(self.training_desc, refresh=self.live)
