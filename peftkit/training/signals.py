"""SIGTERM and SIGINT as requests to stop at the next step boundary, never inside a step.

A signal that interrupted `optimizer.step()` half-way (or landed between the step and the step
counter's increment) would leave weights of step N+1 labelled step N. The handler therefore only
records the signal; the loop asks `requested` after each completed step and checkpoints there.
A second Ctrl-C while a stop is pending raises `KeyboardInterrupt` at once (the user insists).
"""

from __future__ import annotations

import signal
from types import FrameType

import torch
from accelerate import Accelerator

HANDLED = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Context manager: while inside, SIGTERM/SIGINT set `signal_name` instead of raising."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        for sig in HANDLED:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot reach this loop anyway
                break
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def requested(self, accelerator: Accelerator) -> bool:
        """Whether any process was asked to stop (all processes agree, so all stop together)."""
        asked = self.signal_name is not None
        if accelerator.num_processes == 1:
            return asked
        flag = torch.tensor([float(asked)], device=accelerator.device)
        return bool(accelerator.reduce(flag, "sum").item() > 0)
