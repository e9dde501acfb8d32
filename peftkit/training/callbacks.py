"""What runs around the training steps, as callbacks: the forgetting report, generated answers,
before/after samples, the experiment trackers and the report page.

Each callback is handed exactly what it reads when it is made (its constructor's arguments) and
acts through hooks the loop calls in order; the loop never asks which callbacks exist. They are
chosen once, at setup, from the recipe (`for_run`); the Python API adds more
(`peftkit.api.train(..., callbacks=[...])`), each a `Callback` or a factory called with the
run's `RunInputs`.

Hooks, in the order a run calls them:

- `before_training()`: at the end of setup, the model and data ready, before step 0;
- `on_step_end(step, record)`: after each optimizer step (and its evaluation/checkpoint, if due);
- `on_eval(step, record)`: during an evaluation, to add measurements to its metrics record;
- `after_eval(step, record)`: once the evaluation's record is logged;
- `on_log(record)`: every record metrics.jsonl gets;
- `on_summary(summary)`: on the main process, to add to the run summary before it is written;
- `after_training()`: at the end, once summary.json and the run's files are written.

A callback that says `wants_start_eval` makes the run evaluate at step 0, and `wants_final_eval`
one more time at the end if the last evaluation was not at the last step.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from accelerate import Accelerator
from torch import nn
from transformers import PreTrainedTokenizerBase

from peftkit.io import RunLayout, atomic_write_json
from peftkit.metrics import MetricsLog
from peftkit.training import trackers
from peftkit.training.generated import AnswerEval, answer_summary
from peftkit.training.reference import forgetting_summary, reference_metrics
from peftkit.training.report import sample_lines
from peftkit.training.samples import generate_answers

if TYPE_CHECKING:
    from peftkit.data.pipeline import PreparedData
    from peftkit.recipe.schema import Recipe

log = logging.getLogger(__name__)

Phase = Callable[[str], ContextManager[None]]
"""`phase(label)`: a labelled stretch of work between steps (a log line, the progress bar's label)."""


class Callback:
    """A hook set the training loop calls; every hook does nothing unless overridden."""

    wants_start_eval: bool = False
    """Evaluate at step 0 (the starting point of what this callback measures)."""
    shown: dict[str, str] = {}
    """Record keys worth a word in the evaluation's printed line: {key: label}."""

    def before_training(self) -> None: ...

    def on_step_end(self, step: int, record: dict[str, Any]) -> None: ...

    def on_eval(self, step: int, record: dict[str, Any]) -> None: ...

    def after_eval(self, step: int, record: dict[str, Any]) -> None: ...

    def on_log(self, record: dict[str, Any]) -> None: ...

    def on_summary(self, summary: dict[str, Any]) -> None: ...

    def after_training(self) -> None: ...

    def wants_final_eval(self, step: int) -> bool:
        """Evaluate once more at the end (`step`: the last one) if no evaluation scored it yet."""
        return False


@dataclass
class RunInputs:
    """What a run offers its callbacks; each takes the parts it reads at construction."""

    recipe: Recipe
    recipe_dump: dict[str, Any]
    """The recipe as it was validated (what run dir's recipe.yaml holds), as JSON."""
    accelerator: Accelerator
    model: nn.Module
    """The prepared model (accelerator-wrapped; `accelerator.unwrap_model` for the module)."""
    tokenizer: PreTrainedTokenizerBase
    stop_ids: list[int]
    data: PreparedData
    run: RunLayout
    metrics: MetricsLog
    phase: Phase
    evaluate: Callable[[list[Any]], float]
    """Mean loss per unit of rows through the run's objective (sharded over processes)."""
    answer_rows: list[Any]
    """The eval rows generated answers are scored on (the objective's choice)."""


CallbackFactory = Callable[[RunInputs], Callback]


class Forgetting(Callback):
    """The forgetting report: the loss on `data.reference` at every evaluation (step 0: the base
    function; virtual tokens are not the identity, so their adapter is switched off then)."""

    wants_start_eval = True
    shown = {"reference_loss": "reference loss"}

    def __init__(
        self,
        rows: list[Any],
        evaluate: Callable[[list[Any]], float],
        base_function: Callable[[], ContextManager[Any]],
        metrics: MetricsLog,
        phase: Phase,
    ) -> None:
        self.rows, self.evaluate, self.base_function = rows, evaluate, base_function
        self.metrics, self.phase = metrics, phase

    def on_eval(self, step: int, record: dict[str, Any]) -> None:
        base = self.base_function() if step == 0 else contextlib.nullcontext()
        label = f"forgetting: loss on {len(self.rows)} reference rows"
        with base, self.phase(label):
            record |= reference_metrics(self.evaluate(self.rows))

    def on_summary(self, summary: dict[str, Any]) -> None:
        n_tokens = sum(row.n_supervised for row in self.rows)
        summary["forgetting"] = forgetting_summary(self.metrics, len(self.rows), n_tokens)

    def wants_final_eval(self, step: int) -> bool:
        scored = [s for s, _ in self.metrics.series("reference_loss")]
        return scored[-1:] != [step]


class GeneratedAnswers(Callback):
    """Answer held-out rows greedily and score them at every evaluation (main process), and
    write answers.json (each row's answer at step 0 and at the end)."""

    wants_start_eval = True

    def __init__(
        self,
        answers: AnswerEval,
        model: Callable[[], nn.Module],
        metric: str,
        main: bool,
        run: RunLayout,
        metrics: MetricsLog,
        phase: Phase,
    ) -> None:
        self.answers, self.model, self.metric, self.main = answers, model, metric, main
        self.run, self.metrics, self.phase = run, metrics, phase
        self.shown = {"answer_score": f"task metric ({metric})"}
        self.before: list[dict[str, Any]] | None = None

    def on_eval(self, step: int, record: dict[str, Any]) -> None:
        if not self.main:
            return
        with self.phase(f"answering {len(self.answers.items)} held-out rows"):
            record |= self.answers(self.model())
        if step == 0:
            self.before = self.answers.last_rows

    def on_summary(self, summary: dict[str, Any]) -> None:
        summary["answers"] = answer_summary(self.metrics, self.metric, len(self.answers.items))

    def after_training(self) -> None:
        if self.main:
            atomic_write_json(self.run.answers, self.answers.report(self.before))


class Samples(Callback):
    """Greedy answers to `output.sample_prompts` before and after training: samples.json and
    the summary's lines (main process; not taken again before training on a resume)."""

    def __init__(
        self,
        prompts: list[str],
        generate: Callable[[list[str]], list[str]],
        resumed: bool,
        main: bool,
        run: RunLayout,
        phase: Phase,
    ) -> None:
        self.prompts, self.generate, self.resumed, self.main = prompts, generate, resumed, main
        self.run, self.phase = run, phase
        self.before: list[str] | None = None

    def _answers(self) -> list[str]:
        n = len(self.prompts)
        with self.phase(f"answering {n} sample prompt{'s' * (n > 1)}"):
            return self.generate(self.prompts)

    def before_training(self) -> None:
        if self.main and not self.resumed:
            self.before = self._answers()

    def after_training(self) -> None:
        if not self.main:
            return
        after = self._answers()
        if self.before is None:
            return
        rows = zip(self.prompts, self.before, after)
        atomic_write_json(self.run.samples, [dict(prompt=p, before=b, after=a) for p, b, a in rows])
        log.info("\n".join(sample_lines(self.prompts, self.before, after)))


class Trackers(Callback):
    """The experiment trackers (`output.report_to`): opened before training, sent every metrics
    record and the summary (as `summary/<key>`)."""

    def __init__(
        self,
        accelerator: Accelerator,
        report_to: Sequence[str],
        run: RunLayout,
        name: str,
        recipe_dump: dict[str, Any],
    ) -> None:
        self.accelerator, self.report_to, self.run = accelerator, report_to, run
        self.name, self.recipe_dump = name, recipe_dump

    def before_training(self) -> None:
        trackers.start(self.accelerator, self.report_to, self.run, self.name, self.recipe_dump)

    def on_log(self, record: dict[str, Any]) -> None:
        trackers.log(self.accelerator, record)

    def on_summary(self, summary: dict[str, Any]) -> None:
        step = summary["steps"]  # the run's last step
        trackers.log(
            self.accelerator, {f"summary/{k}": v for k, v in summary.items()} | {"step": step}
        )


class ReportPage(Callback):
    """Rewrite the run's report page (report.html) after every evaluation and at the end."""

    def __init__(self, refresh: Callable[[Path], Any], run: RunLayout, main: bool) -> None:
        self.refresh, self.run, self.main = refresh, run, main

    def after_eval(self, step: int, record: dict[str, Any]) -> None:
        if self.main:
            self.refresh(self.run.path)

    def after_training(self) -> None:
        if self.main:
            self.refresh(self.run.path)


def for_run(
    inputs: RunInputs,
    resumed: bool,
    refresh_report: Callable[[Path], Any] | None,
    extra: Sequence[Callback | CallbackFactory] = (),
) -> list[Callback]:
    """The run's callbacks, in the order their hooks run: chosen from the recipe, then `extra`
    (instances as they are, factories called with `inputs`), the trackers and the report page last."""
    r, acc = inputs.recipe, inputs.accelerator
    main = acc.is_main_process
    unwrapped = lambda: acc.unwrap_model(inputs.model)  # noqa: E731
    out: list[Callback] = []
    if inputs.data.reference:
        virtual = bool(r.adapter.virtual_tokens)
        out.append(
            Forgetting(
                inputs.data.reference,
                inputs.evaluate,
                lambda: unwrapped().disable_adapter() if virtual else contextlib.nullcontext(),
                inputs.metrics,
                inputs.phase,
            )
        )
    answers = AnswerEval.for_run(r.eval, inputs.answer_rows, inputs.tokenizer, inputs.stop_ids)
    if answers is not None:
        out.append(
            GeneratedAnswers(
                answers, unwrapped, r.eval.metric, main, inputs.run, inputs.metrics, inputs.phase
            )
        )
    if r.output.sample_prompts:
        generate = lambda prompts: generate_answers(  # noqa: E731
            unwrapped(),
            inputs.tokenizer,
            prompts,
            inputs.stop_ids,
            r.output.sample_max_new_tokens,
            r.data.system_prompt,
        )
        out.append(
            Samples(r.output.sample_prompts, generate, resumed, main, inputs.run, inputs.phase)
        )
    out += [c if isinstance(c, Callback) else c(inputs) for c in extra]
    # after those that add to the summary, which it sends
    out.append(Trackers(acc, r.output.report_to, inputs.run, r.name, inputs.recipe_dump))
    if refresh_report is not None:
        out.append(ReportPage(refresh_report, inputs.run, main))
    return out
