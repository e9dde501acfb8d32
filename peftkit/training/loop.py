"""The training loop on accelerate: setup -> train -> finish, readable top to bottom.

One optimizer step is training/step.py's; what runs around the steps (the forgetting report,
generated answers, samples, trackers, the report page, the Python API's own hooks) is the run's
callbacks (training/callbacks.py), chosen once at setup; the loop calls their hooks in order.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from peftkit import _compat
from peftkit.data.mixing import step_plan
from peftkit.errors import TrainingStopped
from peftkit.io import atomic_write_json
from peftkit.kernels.apply import apply_kernels
from peftkit.methods.base import ApplyContext
from peftkit.metrics import MetricsLog
from peftkit.models.layers import frozen_experts
from peftkit.models.load import load_model, load_tokenizer
from peftkit.models.manifest import BaseIdentity
from peftkit.objectives import BuildContext, prepare_run_data
from peftkit.objectives.runtime import Objective
from peftkit.recipe.launch_rules import check_launch
from peftkit.recipe.schema import Recipe
from peftkit.training import advice, inputs, trackers, update
from peftkit.training import checkpoint as ckpt
from peftkit.training.callbacks import Callback, CallbackFactory, RunInputs, for_run
from peftkit.training.evaluation import EarlyStopping, Evaluations, Evaluator
from peftkit.training.method_context import method_context
from peftkit.training.optim import build_optimizer, build_scheduler, combined_scales
from peftkit.training.precision import resolve_precision, weights_dtype
from peftkit.training.progress import StepClock, TrainingBar
from peftkit.training.report import count_parameters, format_summary, run_metadata, run_summary
from peftkit.training.result import write_run_files
from peftkit.training.run_dir import RunDir
from peftkit.training.saves import Saves
from peftkit.training.signals import StopRequest
from peftkit.training.step import OptimizerStep
from peftkit.training.unfreeze import LayerSchedule

log = logging.getLogger(__name__)

StepCallback = Callable[[int, dict[str, Any]], None]
ReportWriter = Callable[[Path], Any]


class FineTuneRun:
    """One fine-tuning run of a recipe. `setup()` loads everything, `train()` runs, `finish()` saves."""

    def __init__(
        self,
        recipe: Recipe,
        resume: bool = False,
        on_step: StepCallback | None = None,
        refresh_report: ReportWriter | None = None,
        callbacks: Sequence[Callback | CallbackFactory] = (),
    ) -> None:
        """`refresh_report(run_dir)` is called on the main process after every evaluation and at
        the end (`peftkit.report.refresh_run_report`: report.html; the report package sits above
        training, so whoever trains hands it in). `callbacks`: run after the recipe's own
        (training/callbacks.py), each a `Callback` or a factory called with the `RunInputs`."""
        self.recipe = recipe
        self.resume = resume
        self.on_step = on_step
        self.refresh_report = refresh_report
        self.extra_callbacks = list(callbacks)
        self.bar: TrainingBar | None = None  # while train() runs
        self.run = RunDir(recipe.run_dir)
        self.recipe_dump = recipe.model_dump(mode="json")

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        r = self.recipe
        self.launch = check_launch(r)  # FSDP / DeepSpeed: refuse what cannot work, before loading
        self.precision = resolve_precision(r.train, torch.cuda.is_available())
        _compat.allow_new_mixed_precision()
        self.accelerator = Accelerator(
            mixed_precision={"fp32": "no"}.get(self.precision, self.precision),
            **_compat.accelerator_kwargs(),
            **trackers.accelerator_kwargs(r.output.report_to, self.run),
        )
        _compat.fsdp_on_cpu(self.accelerator)
        _compat.deepspeed_on_cpu(self.accelerator)
        self.engine = update.engine_name(self.accelerator)
        self.main = self.accelerator.is_main_process
        input_paths = [s.path for s in r.data.sources] + [r.model.name, r.model.tokenizer or ""]
        self.resume_changes = self.run.check_can_start(
            self.resume, r.output.overwrite, self.recipe_dump, input_paths
        )
        for key, (before, now) in self.resume_changes.items():
            self._print(f"resuming with {key} changed: {before} -> {now}")
        torch.manual_seed(r.train.seed)

        self.kind = r.objective_kind  # what the run optimises (peftkit.objectives)
        self.tokenizer = load_tokenizer(r.model, needs_eos=self.kind.needs_eos)
        self.seed = r.data_seed
        # The first process builds the data cache (if no earlier run did); the others map it.
        with self.accelerator.main_process_first():
            # classification: class id -> name
            self.data, self.class_names = prepare_run_data(r, self.tokenizer, self.seed)
        self.stop_ids = sorted(
            {self.tokenizer.convert_tokens_to_ids(t) for t in self.data.stop_tokens}
            | ({self.tokenizer.eos_token_id} - {None})
        )
        self.input_prints = inputs.fingerprints(
            r.data, self.tokenizer, self.data.chat_template.template
        )
        if self.resume:
            inputs.check_unchanged(self.run, self.input_prints)

        self.weights_dtype = weights_dtype(r.model, r.adapter, self.precision)
        head = self.kind.head_config(self.class_names, self.tokenizer.pad_token_id)
        # Placed once, here (a sharding engine places the weights it shards itself): what is
        # made from the model later (a frozen reference, PiSSA's SVD) is made on its device.
        model = load_model(
            r.model,
            self.weights_dtype,
            self.accelerator.device,
            head,
            place=not self.launch.shards_state,
        )
        # Before the method touches the model: the identity adapters are checked against later.
        self.base_identity = BaseIdentity.of(r.model.name, model, self.tokenizer)
        self.ctx = ApplyContext(
            tokenizer=self.tokenizer,
            tokenizer_path=r.model.tokenizer or str(model.name_or_path),
            gradient_checkpointing=r.train.gradient_checkpointing,
            quantized=r.model.quantization is not None,
            upcast_unquantized=r.model.quantization is not None
            and r.model.quantization.upcast_unquantized,
            work_dir=self.run.work,
            task_type=self.kind.peft_task_type,
            resuming=self.resume,
        )
        fresh = not self.run.path.exists()
        if self.main:
            self.run.begin(self.resume, r.output.overwrite, self.recipe_dump, self.resume_changes)
            if not self.resume:
                inputs.record(self.run, self.input_prints)
        self.accelerator.wait_for_everyone()
        try:
            self._setup_training(model)
        except BaseException:
            if fresh and self.main:  # leave no half-made run directory behind
                shutil.rmtree(self.run.path, ignore_errors=True)
            raise

    def _setup_training(self, model: torch.nn.Module) -> None:
        r = self.recipe
        # The run's first training batches, for initialisations that read activations (EVA, CorDA).
        self.ctx = method_context(
            self.ctx,
            self.data.train,
            r,
            self.accelerator.num_processes,
            self.tokenizer.pad_token_id,
        )
        model = r.adapter.apply(model, self.ctx)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.eos_token_id = self.stop_ids
        self.params = count_parameters(model)
        # What the run optimises, chosen once: collation, loss, metrics, audit (objective.py).
        self.objective: Objective = self.kind.build(
            BuildContext(
                r,
                self.data,
                model,
                self.tokenizer,
                self.precision,
                self.class_names,
                self.accelerator.device,
                self.accelerator.unwrap_model,
            )
        )
        self.kernels = apply_kernels(model, self.objective)  # fused paths (kernels/apply.py)
        for line in self.objective.audit_lines(self.data, self.tokenizer):
            self._print(line)
        if self.main:
            atomic_write_json(
                self.run.audit, self.objective.audit_record(self.data, self.tokenizer)
            )
        self._print(self.objective.describe())
        self._print(
            f"{r.adapter.method}: {self.params['trainable']:,} trainable of {self.params['total']:,} "
            f"parameters ({self.params['trainable'] / self.params['total']:.2%}); "
            f"weights {str(self.weights_dtype).removeprefix('torch.')}, precision {self.precision}"
        )
        frozen = frozen_experts(model)
        if frozen and self.accelerator.is_main_process:
            log.warning(
                f"the MoE experts ({', '.join(frozen)}) stay frozen: no adapter reaches these 3-D "
                "expert weights; set adapter.target_parameters: auto to adapt them"
            )

        self.plan = self.objective.step_plan(  # every row once per epoch, or tasks mixed
            step_plan(
                self.data.train,
                r.data,
                r.train.micro_batch_size,
                r.train.grad_accum,
                self.accelerator.num_processes,
                self.seed,
            )
        )
        self.total_steps = r.train.max_steps or math.ceil(
            r.train.epochs * self.plan.steps_per_epoch
        )
        r.adapter.set_run_length(model, self.total_steps)  # (AdaLoRA's rank schedule)
        # Gradual unfreezing / layer lr decay: the optimizer gets every parameter that will ever
        # train (before any is frozen for now), each layer group at its own lr.
        self.layers = LayerSchedule.for_run(
            r.adapter, model, self.plan.steps_per_epoch, self.accelerator.num_processes
        )
        scales = combined_scales(self.layers.lr_scales(), r.adapter.lr_scales(model, r.train.lr))
        optimizer = build_optimizer(r.train, model, scales)
        self.scheduler = build_scheduler(r.train, optimizer, self.total_steps)
        update.configure_deepspeed(self.accelerator, r.train)  # no-op unless DeepSpeed
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.update = update.for_accelerator(self.accelerator, self.model, self.optimizer)
        self.layers.set_step(0)
        if self.layers.enabled:
            self._print(self.layers.describe(self.total_steps))

        self.state, resumed_from = ckpt.TrainerState(), None
        if self.resume:  # (the checkpoint holds the weights trainable at its step: unfreeze first)
            self.state, resumed_from = ckpt.resume_latest(
                self.run,
                self.accelerator,
                self.model,
                self.optimizer,
                self.scheduler,
                self.layers.set_step,
                self._print,
            )
        self.metrics = MetricsLog(
            self.run.metrics,
            self.main,
            self.state.step if resumed_from else None,
            on_log=lambda record: [c.on_log(record) for c in self.callbacks],
        )
        self.evaluate = Evaluator(
            self.model,
            self.objective,
            self.data.eval,
            self.accelerator,
            r.train.micro_batch_size,
            self.launch.shards_state,
        )
        self.saves = Saves(
            r,
            self.recipe_dump,
            self.accelerator,
            self.model,
            self.optimizer,
            self.scheduler,
            self.state,
            self.run,
            self.ctx,
            self.tokenizer,
            self.base_identity,
            self.data,
            self._phase,
        )
        self.optimizer_step = OptimizerStep(
            r,
            self.accelerator,
            self.model,
            self.objective,
            self.update,
            self.scheduler,
            self.state,
            self.run,
        )
        # What runs around the steps, chosen once; each callback gets what it reads.
        inputs = RunInputs(
            r,
            self.recipe_dump,
            self.accelerator,
            self.model,
            self.tokenizer,
            self.stop_ids,
            self.data,
            self.run,
            self.metrics,
            self._phase,
            self.evaluate,
            self.objective.answer_rows(self.data.eval),
        )
        self.callbacks = for_run(
            inputs, resumed_from is not None, self.refresh_report, self.extra_callbacks
        )
        self.evals = Evaluations(
            self.evaluate,
            self.objective,
            self.accelerator,
            self.state,
            self.metrics,
            self.callbacks,
            EarlyStopping(r.train.early_stopping, self.state, self.accelerator),
            (lambda: self.saves.result(self.run.best)) if r.output.save_best else None,
            self._phase,
            self._print,
        )
        note = self.objective.before_training(
            self.model, self.data, r.train.micro_batch_size, self.accelerator, self.run
        )
        if note:
            self._print(note)
        for callback in self.callbacks:
            callback.before_training()

    # ------------------------------------------------------------------ train
    def train(self) -> None:
        r, acc = self.recipe, self.accelerator
        self.model.train()
        # Rate and ETA from the optimizer steps' own durations: evaluations, generated answers
        # and checkpoints between steps are phases of their own (self._phase), not slow steps.
        self.step_clock = StepClock()
        self.bar = bar = TrainingBar.for_run(
            self.step_clock, self.total_steps, self.state.step, self.main
        )
        order_epoch, order = -1, None
        self.stop_reason = "completed"
        self.optimizer_step.updated_uncounted = False
        rng_at_step_start = ckpt.rng_state()
        # The starting point of the eval curve and of the forgetting report (RNG-neutral: no dropout).
        if self.state.step == 0 and (
            any(c.wants_start_eval for c in self.callbacks)
            or (self.data.eval and r.train.eval_every is not None)
            or (self.data.eval and self.objective.evaluate_at_start)
        ):
            self.evals.log(self.evals.loss() if self.data.eval else None)
        with StopRequest() as stop:
            try:
                while self.state.step < self.total_steps:
                    epoch, step_in_epoch = divmod(self.state.step, self.plan.steps_per_epoch)
                    if epoch != order_epoch:
                        order, order_epoch = self.plan.epoch_order(epoch), epoch
                    rows = [
                        [self.data.train[i] for i in mb]
                        for mb in self.plan.micro_batches(
                            order,
                            step_in_epoch,
                            acc.process_index,
                            self.objective.lengths,
                            self.objective.budget,
                        )
                    ]
                    with self.step_clock:
                        record = self.optimizer_step(
                            rows, epoch + step_in_epoch / self.plan.steps_per_epoch
                        )
                    # training time only: evaluations and checkpoints do not dilute tokens/s
                    self.state.train_seconds += self.step_clock.last
                    self.state.step += 1
                    self.optimizer_step.updated_uncounted = False  # (counted)
                    self._unfreeze_for_next_step(record)
                    rng_at_step_start = (
                        ckpt.rng_state()
                    )  # the boundary a checkpoint would resume from
                    record["tokens_per_s"] = round(
                        self.state.tokens_seen / max(self.state.train_seconds, 1e-9), 1
                    )
                    if (
                        self.state.step % r.train.log_every == 0
                        or self.state.step == self.total_steps
                        or "unfrozen_groups" in record
                    ):
                        self.metrics.log(record)
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{record['loss']:.4f}",
                        lr=f"{record['lr']:.2e}",
                        tok_s=f"{record['tokens_per_s']:,.0f}",
                    )
                    if (
                        self._due(r.train.eval_every)
                        and self.data.eval
                        and self.evals.evaluate_and_check_stop()
                    ):
                        self.stop_reason = "early stopping"
                        break
                    if self._due(r.train.save_every):
                        self.saves.checkpoint(ckpt.rng_state())
                    for callback in self.callbacks:
                        callback.on_step_end(self.state.step, record)
                    if self.on_step is not None:
                        last = self.evals.last
                        extra = (
                            {"eval_loss": last[1]} if last and last[0] == self.state.step else {}
                        )
                        self.on_step(self.state.step, {**record, **extra})
                    if stop.requested(acc):  # a step boundary: the one place a signal acts
                        raise TrainingStopped(self.saves.stop_at_boundary(stop.signal_name))
            except KeyboardInterrupt:
                bar.close()
                if (
                    self.optimizer_step.updated_uncounted
                ):  # weights of step N+1, counters of step N: unsaveable
                    raise TrainingStopped(
                        f"interrupted inside step {self.state.step + 1}, after its update; no "
                        f"checkpoint saved. {advice.last_checkpoint_note(self.run)}"
                    ) from None
                if self.state.step > 0:
                    self.update.zero_grad()  # (the engine's buffers too, under DeepSpeed)
                    # A step cut short was not applied: save the state at the last step boundary.
                    path = self.saves.checkpoint(rng_at_step_start)
                    raise TrainingStopped(
                        f"interrupted at step {self.state.step}; checkpoint saved to {path}. "
                        "Continue with --resume."
                    ) from None
                raise
            finally:
                bar.close()
                self.bar = None

    def _unfreeze_for_next_step(self, record: dict[str, Any]) -> None:
        """Gradual unfreezing: at a stage boundary the next group(s) train from the next step on
        (set at the last step too, so the final checkpoint matches its step on an extension)."""
        unfrozen = self.layers.set_step(self.state.step)
        if unfrozen and self.state.step < self.total_steps:
            record["unfrozen_groups"] = self.layers.groups_at(self.state.step)
            self._print(
                f"step {self.state.step}: unfroze {', '.join(unfrozen)} "
                f"({record['unfrozen_groups']} of {len(self.layers.groups)} layer groups train)"
            )

    def _due(self, every: int | None) -> bool:
        return (
            every is not None
            and self.state.step % every == 0
            and self.state.step < self.total_steps
        )

    # ------------------------------------------------------------------ finish
    def finish(self) -> dict[str, Any]:
        """Final evaluation, final adapter, metadata, summary, plot, samples. Returns the summary."""
        r, run = self.recipe, self.run
        last_eval = self.metrics.eval_losses()[-1][0] if self.metrics.eval_losses() else None
        if self.data.eval and last_eval != self.state.step:
            self.evals.evaluate_and_check_stop()
        if any(c.wants_final_eval(self.state.step) for c in self.callbacks):
            self.evals.log(None)
        # After the final evaluation (and best/), so a resume from it neither redoes nor loses it;
        # lets a finished run be extended with --resume.
        if (
            r.train.save_every is not None
            and not (self.run.checkpoints / f"step-{self.state.step:07d}").exists()
        ):
            self.saves.checkpoint(ckpt.rng_state())
        final = run.final(r.adapter.final_dir_name)
        self.saves.result(final)
        summary = self._write_summary(final) if self.main else {}
        for callback in self.callbacks:  # answers.json, samples.json, report.html
            callback.after_training()
        return summary

    def _write_summary(self, final: Path) -> dict[str, Any]:
        """summary.json (what the callbacks add included), meta.json and the loss plot."""
        r, run = self.recipe, self.run
        summary = run_summary(
            recipe=r,
            state=self.state,
            metrics=self.metrics,
            objective=self.objective,
            data=self.data,
            plan=self.plan,
            params=self.params,
            layers=self.layers.summary(self.total_steps),
            stop_reason=self.stop_reason,
            processes=self.accelerator.num_processes,
            engine=self.engine,
            precision=self.precision,
            run_dir=run,
            final=final,
            kernels=self.kernels.report(self.accelerator.unwrap_model(self.model), self.objective),
        )
        for callback in self.callbacks:
            callback.on_summary(summary)
        atomic_write_json(run.summary, summary)
        metadata = run_metadata(
            recipe=r,
            data=self.data,
            params=self.params,
            precision=self.precision,
            weights_dtype=self.weights_dtype,
            processes=self.accelerator.num_processes,
            stop_ids=self.stop_ids,
            class_names=self.class_names,
            base_model_path=str(self.ctx.tokenizer_path),
            device=self.accelerator.device,
        )
        write_run_files(r, run, metadata, self.metrics, None, None, None)
        log.info(format_summary(summary, [], None, None))
        return summary

    # ------------------------------------------------------------------ helpers
    def _print(self, text: str) -> None:
        if self.accelerator.is_main_process:
            log.info(text)

    @contextlib.contextmanager
    def _phase(self, label: str) -> Iterator[None]:
        """Work between training steps (evaluation, generation, saving) as its own labelled phase:
        a log line, and the bar shows the label meanwhile; none of it counts in the bar's rate."""
        self._print(f"step {self.state.step}: {label} ...")
        with self.bar.phase(label) if self.bar is not None else contextlib.nullcontext():
            yield
