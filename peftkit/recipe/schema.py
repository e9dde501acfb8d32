"""The recipe: typed sections that everything downstream receives. Defaults live in the sections
and nowhere else; the `model:` section (`peftkit.models.spec`) and each method's `adapter:` spec
(`peftkit.methods`) are defined below the recipe, with what uses them, and composed here; so is each objective's `objective:` section
(`peftkit.objectives`), with its cross-field rules."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, StrictBool, model_validator
from pydantic.fields import FieldInfo

from peftkit.data.spec import DataSource as DataSource  # re-exported, with MixingSpec, TaskSpec
from peftkit.data.spec import DataSpec, TaskSpec
from peftkit.data.spec import MixingSpec as MixingSpec
from peftkit.exporters import registry as export_registry
from peftkit.exporters.base import ExportSection as ExportSection  # re-exported, with the sections
from peftkit.exporters.base import FidelityThresholds as FidelityThresholds
from peftkit.exporters.base import MergeBase as MergeBase
from peftkit.exporters.gguf import GgufExport as GgufExport
from peftkit.exporters.gguf import GgufQuant as GgufQuant
from peftkit.exporters.safetensors import ExportDType as ExportDType
from peftkit.exporters.safetensors import SafetensorsExport
from peftkit.methods import AdapterSpec
from peftkit.models.spec import DType as DType  # re-exported, with QuantizationSpec
from peftkit.models.spec import ModelSpec
from peftkit.models.spec import QuantizationSpec as QuantizationSpec
from peftkit.objectives import registry as objective_registry
from peftkit.objectives.base import ObjectiveKind
from peftkit.objectives.sft import SFTObjective
from peftkit.section import RESUMABLE, Section

ExportFormat = str  # a registered exporter's section `format` (peftkit.exporters.registry)


class EarlyStoppingSpec(Section):
    patience: int = Field(default=3, ge=1)
    """Stop after this many evaluations without improvement."""
    min_delta: float = Field(default=0.0, ge=0.0)
    """The watched metric must beat the best by more than this to count as an improvement."""
    metric: str = "eval_loss"
    """Any metric logged at evaluations: eval_loss, eval_accuracy, eval_macro_f1 (task heads),
    eval_rewards/accuracies, eval_rewards/margins (preference), answer_score (eval.metric), ...
    It also picks the `best/` adapter."""
    mode: Literal["auto", "min", "max"] = "auto"
    """auto: higher is better for accuracies, F1, scores, margins, rewards and correlations."""

    @property
    def higher_is_better(self) -> bool:
        if self.mode != "auto":
            return self.mode == "max"
        return any(
            word in self.metric
            for word in ("accurac", "f1", "score", "margin", "rewards", "pearson", "exact")
        )


class TrainSpec(Section):
    """The optimisation: batch, schedule, precision, evaluation and checkpoints."""

    epochs: float = Field(default=1.0, gt=0, json_schema_extra=RESUMABLE)
    max_steps: int | None = Field(default=None, gt=0, json_schema_extra=RESUMABLE)
    """Optimizer steps; overrides epochs when set."""
    micro_batch_size: int = Field(default=4, gt=0)
    """Rows per forward pass per process (memory scales with it)."""
    grad_accum: int = Field(default=1, gt=0)
    """Micro-batches per optimizer step. Global batch = micro_batch_size x grad_accum x processes."""
    micro_batch_tokens: int | None = Field(default=None, gt=0, json_schema_extra=RESUMABLE)
    """Packed runs: cut each optimizer step's rows (still micro_batch_size x grad_accum per
    process) into as few forward passes as hold at most this many tokens each (a longer row goes
    alone). Bounds activation memory by tokens rather than rows; same loss per step. null = cut
    every micro_batch_size rows."""
    lr: float = Field(default=2e-4, gt=0, json_schema_extra=RESUMABLE)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = "adamw"
    """8-bit / paged variants come from bitsandbytes and save optimizer memory."""
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int | None = Field(default=None, ge=0, json_schema_extra=RESUMABLE)
    """Linear warmup steps (overrides warmup_ratio). As in transformers' schedulers, step k of
    the warmup runs at lr x k / warmup_steps: the first step at lr 0."""
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1, json_schema_extra=RESUMABLE)
    """Share of steps for linear warmup (ignored when warmup_steps is set)."""
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    """Floor of cosine/linear decay as a share of lr."""
    max_grad_norm: float | None = Field(default=1.0, gt=0, json_schema_extra=RESUMABLE)
    """Clip gradients to this global norm (null = no clipping)."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Mixed precision of the forward/backward. auto = bf16 where the hardware has it (GPUs with
    bf16; CPUs with AVX512-BF16 or AMX), fp16 on older GPUs, else fp32."""
    packing: bool | None = Field(default=None, json_schema_extra=RESUMABLE)
    """Padding-free packing: each micro-batch's rows are concatenated into one sequence whose
    position ids restart per row, so attention never crosses rows and no pad token is computed.
    Same loss as padding. null = on, except for methods with virtual tokens (prompt/prefix)."""
    group_by_length: bool = Field(default=True, json_schema_extra=RESUMABLE)
    """Without packing: sort each optimizer step's rows by length before cutting micro-batches,
    so rows of similar length are padded together. The step's rows (and its loss) are unchanged."""
    supervised_logits_only: bool = Field(default=True, json_schema_extra=RESUMABLE)
    """Project to the vocabulary only at positions that carry loss, and compute the fp32
    cross-entropy in checkpointed chunks, so full (tokens x vocab) fp32 logits never exist."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: ~30% slower, far less activation memory."""
    eval_every: int | None = Field(default=None, gt=0, json_schema_extra=RESUMABLE)
    """Evaluate every N steps (and always at the end when there is eval data)."""
    save_every: int | None = Field(default=None, gt=0, json_schema_extra=RESUMABLE)
    """Write a resumable checkpoint every N steps."""
    keep_last: int = Field(default=2, ge=1, json_schema_extra=RESUMABLE)
    """Checkpoints kept on disk (older ones are deleted)."""
    early_stopping: EarlyStoppingSpec | None = Field(default=None, json_schema_extra=RESUMABLE)
    log_every: int = Field(default=1, gt=0, json_schema_extra=RESUMABLE)
    seed: int = 42


class OutputSpec(Section):
    """Where the run directory goes and what it holds besides the adapter."""

    dir: str = Field(default="runs/{name}", json_schema_extra=RESUMABLE)
    """Run directory; `{name}` is replaced by the recipe name."""
    overwrite: StrictBool = Field(default=False, json_schema_extra=RESUMABLE)
    """Replace an existing run directory (a previous run only) instead of refusing to start.
    `true` or `false` only: what deletes is never turned on by a guess."""
    save_best: bool = Field(default=True, json_schema_extra=RESUMABLE)
    """Keep the adapter with the best eval loss in `best/` as well as the final one."""
    plot: bool = Field(default=True, json_schema_extra=RESUMABLE)
    """Write loss.png (train and eval loss) at the end."""
    sample_prompts: list[str] = Field(default=[], json_schema_extra=RESUMABLE)
    """User messages answered (greedy) before and after training, saved in samples.json."""
    sample_max_new_tokens: int = Field(default=48, gt=0, json_schema_extra=RESUMABLE)
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default=[], json_schema_extra=RESUMABLE
    )
    """Experiment trackers that also get the recipe (as hyper-parameters) and every metric, through
    accelerate's tracker integration; each needs its extra (`pip install 'peftkit[wandb]'`). All
    write under the run directory by default: W&B offline (unless WANDB_MODE is set), MLflow to a
    file store in RUN/mlruns (unless MLFLOW_TRACKING_URI is set), trackio to its local database."""


class EvalSpec(Section):
    """Generation-based evaluation: held-out rows (`data.eval`) answered greedily and scored, at
    step 0 (the base), at every evaluation and at the end; logged as `answer_*` in metrics.jsonl,
    plotted, and summarised before -> after. The answer of a row is its last assistant turn."""

    metric: Literal["none", "exact", "contains", "json_fields", "tool_call", "python"] = "none"
    """exact = equal text; contains = the reference occurs in the answer; json_fields = the
    answer's first JSON object has exactly the reference's keys and values (field accuracy is
    reported beside); tool_call = the answer's tool calls, parsed in the chat template's call
    format, have the reference's function names and exactly its arguments (name and field
    accuracy beside; only rows whose answer is a tool call are scored); python = `function`
    decides. none = loss only."""
    function: str | None = None
    """For metric python: `module:function` or `file.py:function` (relative to the recipe), called
    as `function(answer: str, reference: str) -> float` (1.0 = right)."""
    rows: int | None = Field(default=64, gt=0)
    """Score the first N held-out rows (null = all); generation costs far more than loss."""
    max_new_tokens: int = Field(default=64, gt=0)
    """Greedy tokens per answer; an answer still running then is cut (and usually wrong)."""
    batch_size: int = Field(default=16, gt=0)
    """Most prompts generated together (left-padded); fewer when their KV cache and
    last-position logits would pass 1 GiB (a large vocabulary or long prompts)."""

    @model_validator(mode="after")
    def _function_rules(self) -> EvalSpec:
        if self.metric == "python" and not self.function:
            raise ValueError("eval.metric python needs eval.function: module:function")
        if self.function and self.metric != "python":
            raise ValueError(
                f"eval.function is set but eval.metric is {self.metric}: set eval.metric: python"
            )
        return self


def _export_field() -> Any:
    return export_registry.export_union()


ExportSpec = _export_field()
"""The `export:` section: a union of the registered exporters' sections, keyed on `format`."""


def _objective_from_shorthand(value: Any) -> Any:
    """`objective: dpo` means `objective: {type: dpo}`."""
    return {"type": value} if isinstance(value, str) else value


def _objective_field() -> Any:
    return Annotated[
        objective_registry.objective_union(), BeforeValidator(_objective_from_shorthand)
    ]


ObjectiveField = _objective_field()


class Recipe(Section):
    """A whole fine-tuning run, validated before anything is loaded."""

    name: str = "run"
    """The run's name: the output folder's default (`runs/{name}`) and the report's title."""
    model: ModelSpec
    adapter: AdapterSpec  # a union keyed on `method`, one member per method module
    """The adapter method and its options: one section per method below, chosen by `method`."""
    data: DataSpec
    task: TaskSpec = TaskSpec()
    objective: ObjectiveField = SFTObjective()  # a union keyed on `type`, one per objective module
    """What the loss optimises: `sft` (default), a preference objective (dpo, kto, orpo, simpo)
    or rewards (grpo)."""
    train: TrainSpec = TrainSpec()
    output: OutputSpec = OutputSpec()
    eval: EvalSpec = EvalSpec()
    export: ExportSpec = Field(default=SafetensorsExport(), json_schema_extra=RESUMABLE)
    """How `peftkit export` writes deployable weights and what it checks before it keeps them: one
    section per format below, chosen by `format` (safetensors when left out)."""

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Recipe:
        problems = self.adapter.check_recipe(self)
        has_eval = bool(self.data.eval) or self.data.eval_fraction > 0
        if self.train.early_stopping is not None and not has_eval:
            problems.append(
                "train.early_stopping needs eval data: set data.eval or data.eval_fraction > 0"
            )
        if self.train.eval_every is not None and not has_eval:
            problems.append(
                "train.eval_every is set but there is no eval data: set data.eval or data.eval_fraction > 0"
            )
        if self.eval.metric != "none" and not has_eval:
            problems.append(
                f"eval.metric {self.eval.metric} scores answers to held-out rows: set data.eval "
                "or data.eval_fraction > 0"
            )
        if self.train.micro_batch_tokens is not None:
            problems += self._token_budget_rules()
        problems += self.objective_kind.rules(self)
        if self.train.precision == "fp16" and self.model.dtype == "bfloat16":
            problems.append(
                "train.precision fp16 with model.dtype bfloat16 mixes two half formats: pick one"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _token_budget_rules(self) -> list[str]:
        why = None
        if self.train.packing is False:
            why = "train.packing is false"
        elif (refusal := self.objective_kind.packing_refusal(self)) is not None:
            why = refusal
        elif self.adapter.virtual_tokens:
            why = f"adapter.method {self.adapter.method!r} (virtual tokens) does not pack rows"
        if why is None:
            return []
        return [f"train.micro_batch_tokens cuts packed micro-batches, but {why}: remove it"]

    @property
    def objective_kind(self) -> type[ObjectiveKind]:
        """The registered objective that runs this recipe (`peftkit.objectives.registry`)."""
        return objective_registry.objective_for(self)

    @property
    def data_seed(self) -> int:
        """Seed of the eval split and epoch shuffles: data.shuffle_seed, or train.seed when unset."""
        return self.data.shuffle_seed if self.data.shuffle_seed is not None else self.train.seed

    @property
    def run_dir(self) -> str:
        return self.output.dir.replace("{name}", self.name)


def _compose_objectives() -> None:
    """An objective registered after this module was imported (a plugin, a test) joins the
    `objective:` union: the field is rebuilt from the registry."""
    global ObjectiveField
    ObjectiveField = _objective_field()
    Recipe.model_fields["objective"] = FieldInfo.from_annotated_attribute(
        ObjectiveField, SFTObjective()
    )
    Recipe.model_rebuild(force=True)


objective_registry.on_change(_compose_objectives)


def _compose_exporters() -> None:
    """An exporter registered after this module was imported (a plugin, a test) with a section of
    its own joins the `export:` union: the field is rebuilt from the registry."""
    global ExportSpec
    ExportSpec = _export_field()
    described = Recipe.model_fields["export"].description
    Recipe.model_fields["export"] = FieldInfo.from_annotated_attribute(
        ExportSpec,
        Field(default=SafetensorsExport(), json_schema_extra=RESUMABLE, description=described),
    )
    Recipe.model_rebuild(force=True)


export_registry.on_change(_compose_exporters)
