"""The training bar's rate and ETA count training steps only (peftkit/training/progress.py)."""

from __future__ import annotations

import io

from peftkit.training.progress import StepClock, TrainingBar


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _bar(clock: StepClock, **kwargs) -> tuple[TrainingBar, io.StringIO]:
    out = io.StringIO()
    bar = TrainingBar(clock=clock, unit="step", file=out, mininterval=0, ncols=100, **kwargs)
    return bar, out


def test_eta_after_the_first_step_ignores_the_evaluation_before_it():
    time = FakeTime()
    clock = StepClock(now=time)
    bar, out = _bar(clock, total=10)
    with bar.phase("answering 40 held-out rows"):  # the step-0 evaluation: 30 s
        assert bar.desc == "answering 40 held-out rows"
        time.now += 30.0
    assert bar.desc == "training"
    with clock:  # the first step: 3 s
        time.now += 3.0
    bar.update(1)
    figures = bar.format_dict
    assert figures["elapsed"] == 3.0 and figures["rate"] == 1 / 3
    line = bar.format_meter(**figures)
    assert "1/10 [00:03<00:27" in line and "3.00s/step" in line  # 9 steps x 3 s left
    assert out.getvalue().rstrip().endswith(line.rstrip())  # what the bar drew
    # a checkpoint between steps does not slow the next step down either
    with bar.phase("saving checkpoint step-0000001"):
        time.now += 60.0
    with clock:
        time.now += 1.0
    bar.update(1)
    assert bar.format_dict["rate"] == 2 / 4 and "2/10 [00:04<00:16" in str(bar)
    bar.close()


def test_a_resumed_bar_counts_this_sessions_steps_over_their_seconds():
    time = FakeTime()
    clock = StepClock(now=time)
    bar, _ = _bar(clock, total=20, initial=10)
    assert bar.format_dict["rate"] is None  # nothing measured yet
    for _ in range(2):
        with clock:
            time.now += 2.0
        bar.update(1)
    assert clock() == 4.0 and bar.format_dict["rate"] == 0.5
    assert "12/20 [00:04<00:16" in str(bar)
    bar.close()


def test_the_step_clock_runs_inside_steps_only():
    time = FakeTime()
    clock = StepClock(now=time)
    time.now += 100.0  # before any step
    with clock:
        time.now += 1.5
        assert clock() == 1.5  # the step in progress counts
    time.now += 50.0
    assert clock() == clock.seconds == clock.last == 1.5
