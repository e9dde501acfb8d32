"""The recipe: typed sections that everything downstream receives. Defaults live in the sections
and nowhere else; the `model:` section (`peftkit.models.spec`) and each method's `adapter:` spec
(`peftkit.methods`) are defined below the recipe, with what uses them, and composed here."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, StrictBool, field_validator, model_validator

from peftkit.methods import AdapterSpec
from peftkit.methods.registry import registered_methods
from peftkit.models.spec import DType as DType  # re-exported, with QuantizationSpec
from peftkit.models.spec import ModelSpec
from peftkit.models.spec import QuantizationSpec as QuantizationSpec
from peftkit.recipe.objective import ObjectiveSpec, SFTObjective, objective_from_shorthand
from peftkit.section import RESUMABLE, Section

ExportFormat = Literal["safetensors", "gguf"]
GgufQuant = Literal[
    "f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0",
    "q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "q3_k_m", "q2_k",
]  # fmt: skip
ExportDType = Literal["bfloat16", "float16", "float32"]
MergeBase = Literal["auto", "original", "dequantized"]


class DataSource(Section):
    """One dataset: a local file, a `datasets.save_to_disk` folder, or a hub dataset id."""

    path: str
    """.jsonl/.json/.csv/.parquet file, save_to_disk folder, or hub id. Relative paths: recipe folder first, then cwd."""
    format: Literal["auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text"] = "auto"
    """Row layout; auto detects it from the first row's keys."""
    split: str = "train"
    """Split to read from a hub dataset or a DatasetDict folder."""
    subset: str | None = None
    """Hub dataset configuration name."""
    revision: str | None = None
    limit: int | None = Field(default=None, gt=0)
    """Use only the first N rows."""
    task: str | None = Field(default=None, min_length=1)
    """Task name for multitask training and per-task metrics; null = the file name without its
    split suffix (`skill-sort-train.jsonl` -> `skill-sort`). Eval sources name train tasks."""
    weight: float | None = Field(default=None, gt=0)
    """Mixing weight of this source's task under `data.mixing.strategy: weights`."""

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    @property
    def task_name(self) -> str:
        """`task`, or the last path component without suffixes and a trailing split name."""
        if self.task is not None:
            return self.task
        name = self.path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
        for suffix in (".jsonl", ".json", ".csv", ".parquet"):
            name = name.removesuffix(suffix)
        return re.sub(r"[-_.](train|eval|valid|validation|val|test|dev)$", "", name) or name


class MixingSpec(Section):
    """How rows of several train tasks are mixed into the epochs (see peftkit/data/mixing.py)."""

    strategy: Literal["concat", "weights", "temperature"] = "concat"
    """concat = every row once per epoch (task shares follow the data sizes); weights = each
    task's share of drawn rows is weight / sum(weights); temperature = share proportional to
    n_task^(1/temperature) (1 = proportional, large = uniform over tasks)."""
    temperature: float = Field(default=1.0, gt=0)
    """Only for strategy temperature; T5 / multilingual mixing commonly uses 2-5."""


def _as_list(value: Any) -> Any:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


class DataSpec(Section):
    """What to train on, how rows become tokens, and which tokens carry loss."""

    train: Annotated[list[DataSource], Field(min_length=1)]
    """One source or a list of them (concatenated)."""
    eval: list[DataSource] = []
    """Held-out sources; if empty, `eval_fraction` of train is held out instead."""
    eval_fraction: float = Field(default=0.0, ge=0.0, lt=0.5)
    max_eval_rows: int | None = Field(default=None, gt=0)
    """Cap the eval set (evaluation cost grows with it)."""
    chat_template: str = "auto"
    """auto (tokenizer's own, else fallback) | tokenizer | fallback | path to a .jinja file."""
    system_prompt: str | None = None
    """Added as the system turn of chats that have none; recorded in the adapter's manifest, it
    is also the default system turn when the adapter is served and of exported chat templates."""
    max_length: int = Field(default=1024, gt=1)
    """Tokens per row after formatting; longer rows are truncated (or dropped, see truncation)."""
    truncation: Literal["right", "drop"] = "right"
    loss_on: Literal["completion", "all"] = "completion"
    """completion = assistant turns / completions only (+ their EOS); all = every token."""
    shuffle_seed: int | None = None
    """Seed of the eval split and epoch shuffles; null = train.seed."""
    mixing: MixingSpec = MixingSpec()
    """How several train tasks are mixed; the default concatenates them."""
    reference: list[DataSource] = []
    """General-text rows scored (loss on every token) before training, at every evaluation and
    at the end, to report forgetting; empty = no forgetting report."""
    max_reference_rows: int | None = Field(default=None, gt=0)
    """Cap the reference set (its evaluation cost grows with it)."""
    cache: bool = True
    """Encode into memory-mapped Arrow files in peftkit's cache ($PEFTKIT_CACHE/data), keyed by
    the data files' contents, tokenizer, chat template and this section, so a second run or a
    resume starts in seconds (`peftkit prepare`); false = encode in memory, in one process."""
    num_proc: int | None = Field(default=None, gt=0)
    """Processes that encode a cached data set; null = one per 2,000 rows, up to the CPUs."""
    # Agent data (tool calls, tool results, reasoning): see docs/data.md, "Tools and reasoning".
    tools: list[dict[str, Any]] | None = None
    """Functions every chat may call, for rows without their own `tools` (JSON schema, OpenAI
    shape: {type: function, function: {name, description, parameters}}); passed to the chat
    template, and a tool call naming another function is a data error."""
    reasoning: Literal["template", "train", "mask", "drop"] = "template"
    """Assistant reasoning (`reasoning_content`, or `<think>...</think>` before the answer):
    template = supervised where the chat template writes it (Qwen3-style templates drop it
    before the last user turn); train = supervised in every turn (an error where the template
    drops it); mask = written, no loss; drop = removed. Templates without a reasoning field get
    it inline as <think>...</think>."""
    chat_template_kwargs: dict[str, Any] = {}
    """Extra variables for the chat template, e.g. {enable_thinking: false} for Qwen3."""

    _coerce = field_validator("train", "eval", "reference", mode="before")(
        lambda cls, v: _as_list(v)
    )

    @property
    def sources(self) -> list[DataSource]:
        """Every source the run reads: train, eval and reference."""
        return [*self.train, *self.eval, *self.reference]

    @property
    def train_tasks(self) -> list[str]:
        """Task names of the train sources, in first-seen order."""
        return list(dict.fromkeys(s.task_name for s in self.train))

    def eval_task(self, source: DataSource) -> str:
        """The task of an eval source: its `task`, else its derived name when that is a train
        task, else the only train task, else the derived name (a group of its own)."""
        tasks = self.train_tasks
        if source.task is not None or source.task_name in tasks or len(tasks) > 1:
            return source.task_name
        return tasks[0]

    @model_validator(mode="after")
    def _mixing_rules(self) -> DataSpec:
        problems = []
        strategy = self.mixing.strategy
        weighted = [i for i, s in enumerate(self.train) if s.weight is not None]
        if strategy != "weights" and weighted:
            problems.append(
                f"data.train.{weighted[0]}.weight is set but data.mixing.strategy is {strategy}: "
                "set data.mixing.strategy: weights, or remove the weight"
            )
        if strategy == "weights":
            task_weight: dict[str, tuple[int, float]] = {}
            for i, s in enumerate(self.train):
                if s.weight is None:
                    problems.append(
                        f"data.train.{i}.weight is missing: data.mixing.strategy weights needs a "
                        "weight on every train source"
                    )
                elif s.task_name in task_weight and task_weight[s.task_name][1] != s.weight:
                    j, w = task_weight[s.task_name]
                    problems.append(
                        f"data.train.{i}.weight {s.weight} differs from data.train.{j}.weight {w} "
                        f"of the same task {s.task_name!r}: sources of one task share its weight"
                    )
                else:
                    task_weight.setdefault(s.task_name, (i, s.weight))
        if strategy != "concat" and len(self.train_tasks) < 2:
            problems.append(
                f"data.mixing.strategy {strategy} needs at least two train tasks (found "
                f"{', '.join(self.train_tasks)}): add sources, give them distinct data.train.N.task "
                "names, or use strategy concat"
            )
        # (a resolved recipe dump carries the default 1.0: only another value is a mistake)
        if strategy != "temperature" and self.mixing.temperature != 1.0:
            problems.append(
                f"data.mixing.temperature is set but data.mixing.strategy is {strategy}: "
                "set strategy: temperature, or remove the temperature"
            )
        for i, s in enumerate(self.eval):
            if s.task is not None and s.task not in self.train_tasks:
                problems.append(
                    f"data.eval.{i}.task {s.task!r} is not a train task "
                    f"({', '.join(self.train_tasks)}): name one of them"
                )
            if s.weight is not None:
                problems.append(f"data.eval.{i}.weight: only train sources are mixed; remove it")
        for i, s in enumerate(self.reference):
            if s.task is not None or s.weight is not None:
                problems.append(
                    f"data.reference.{i}: task and weight do not apply to the reference set; "
                    "remove them"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self


class TaskSpec(Section):
    """What the model learns: the next tokens (causal_lm), a class per text, or a number per text.

    classification / regression put a new head on the model (`AutoModelForSequenceClassification`:
    the last non-pad token's state for decoder LMs, [CLS] for BERT-style encoders) and read rows
    like {"text": "...", "label": "positive"} (or `text_pair_field` for sentence pairs).
    """

    type: Literal["causal_lm", "classification", "regression"] = "causal_lm"
    labels: list[str] | None = None
    """Classification: the class names, in class-id order; null = the distinct labels of the
    training data, sorted (numbers numerically). Rows may give a name or a class id."""
    text_field: str = "text"
    text_pair_field: str | None = None
    """Second text of a pair (entailment, similarity): encoded as the tokenizer's pair input."""
    label_field: str = "label"

    @property
    def has_head(self) -> bool:
        return self.type != "causal_lm"


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


class FidelityThresholds(Section):
    """Limits the exported model must meet against the trained model, or the export fails."""

    max_relative_error: float = Field(default=0.02, gt=0)
    """||logits_export - logits_trained|| / ||logits_trained|| over the samples."""
    max_mean_kl: float = Field(default=1e-3, gt=0)
    """Mean KL(trained || exported) per token, in nats."""
    min_greedy_agreement: float = Field(default=0.9, ge=0, le=1)
    """Share of greedily generated tokens on which both models agree."""


class ExportSpec(Section):
    """How `peftkit export` writes deployable weights and what it checks before it keeps them."""

    format: ExportFormat = "safetensors"
    """safetensors = merged transformers weights (+ tokenizer); gguf = one file with weights,
    tokenizer and chat template for llama.cpp, Ollama and LM Studio (+ an Ollama Modelfile)."""
    quant: GgufQuant = "f16"
    """GGUF only: the type of the 2-D weights (norms and biases stay f32)."""
    dtype: ExportDType = "bfloat16"
    """safetensors only: the dtype of the weights."""
    max_shard_size: str = "5GB"
    """Largest weights file, a number and a unit: 500MB, 5GB, 2GiB."""

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, value: str) -> str:
        if not re.fullmatch(r"\d+\s*[KMG]i?B", value.strip()):
            raise ValueError(f"{value!r} is not a size such as 500MB, 5GB or 2GiB")
        return value.strip()

    merge_base: MergeBase = "auto"
    """For QLoRA: merge into the original 16-bit weights, into the dequantized NF4 weights training
    saw, or measure both and keep the closer (auto)."""
    samples: int = Field(default=16, gt=0)
    """Held-out rows compared between the trained and the exported model."""
    max_sample_tokens: int = Field(default=256, gt=1)
    generate_tokens: int = Field(default=16, gt=0)
    """Greedy tokens generated per sample for the agreement check."""
    thresholds: FidelityThresholds = FidelityThresholds()
    q8_0_thresholds: FidelityThresholds = FidelityThresholds(
        max_relative_error=0.05, max_mean_kl=5e-3, min_greedy_agreement=0.8
    )
    """The gate of GGUF q8_0 exports (8-bit weights, blocks of 32 with one f16 scale), looser than
    `thresholds` for 16-bit exports. Measured on the quickstart run: relative error 2.6e-3, mean KL
    2.0e-5, greedy agreement 0.98 (f16: 7.6e-5, 1.3e-8, 1.0); README "GGUF for llama.cpp"."""
    q5_thresholds: FidelityThresholds = FidelityThresholds(
        max_relative_error=0.35, max_mean_kl=0.3, min_greedy_agreement=0.25
    )
    """The gate of GGUF q5_0 / q5_1 exports (5-bit weights in blocks of 32). Round-to-nearest 5 bits
    cost small models much: measured on Gemma 3 270M (q5_0) relative error 0.17, mean KL 0.034,
    greedy agreement 0.38; on SmolLM2-135M (q5_0 / q5_1) 0.18 / 0.32, 0.18 / 0.24, 0.38 / 0.27. The
    gate catches a broken file (relative error ~1, KL of nats), not that loss."""
    q4_thresholds: FidelityThresholds = FidelityThresholds(
        max_relative_error=0.5, max_mean_kl=1.0, min_greedy_agreement=0.1
    )
    """The gate of GGUF q4_0 / q4_1 exports (4-bit weights in blocks of 32). Measured (q4_0) on
    Gemma 3 270M: relative error 0.24, mean KL 0.39, greedy agreement 0.27; on SmolLM2-135M: 0.47,
    0.72, 0.11. Like q5's, this gate catches a broken file, not the loss 4 bits cost."""


class Recipe(Section):
    """A whole fine-tuning run, validated before anything is loaded."""

    name: str = "run"
    """The run's name: the output folder's default (`runs/{name}`) and the report's title."""
    model: ModelSpec
    adapter: AdapterSpec  # a union keyed on `method`, one member per method module
    """The adapter method and its options: one section per method below, chosen by `method`."""
    data: DataSpec
    task: TaskSpec = TaskSpec()
    objective: Annotated[ObjectiveSpec, BeforeValidator(objective_from_shorthand)] = SFTObjective()
    """What the loss optimises: `sft` (default), a preference objective (dpo, kto, orpo, simpo)
    or rewards (grpo)."""
    train: TrainSpec = TrainSpec()
    output: OutputSpec = OutputSpec()
    eval: EvalSpec = EvalSpec()
    export: ExportSpec = Field(default=ExportSpec(), json_schema_extra=RESUMABLE)

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
        if self.task.has_head:
            problems += self._head_rules()
        if self.objective.preference:
            problems += self._preference_rules()
        if self.objective.type == "grpo":
            problems += self._grpo_rules()
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
        elif self.task.has_head:
            why = f"a task.type {self.task.type!r} model reads one row at a time"
        elif self.objective.preference or self.objective.type == "grpo":
            why = f"objective {self.objective.type} scores each answer as its own sequence"
        elif self.adapter.virtual_tokens:
            why = f"adapter.method {self.adapter.method!r} (virtual tokens) does not pack rows"
        if why is None:
            return []
        return [f"train.micro_batch_tokens cuts packed micro-batches, but {why}: remove it"]

    def _head_rules(self) -> list[str]:
        problems = []
        kind = f"task.type {self.task.type!r}"
        if self.output.sample_prompts:
            problems.append(f"output.sample_prompts: a {kind} model does not generate; remove them")
        if self.train.packing:
            problems.append(f"train.packing: a {kind} model reads one row at a time; remove it")
        if not self.adapter.task_heads:
            able = [name for name, spec in registered_methods().items() if spec.task_heads]
            problems.append(
                f"adapter.method {self.adapter.method!r} cannot train a {kind} head: use one of "
                + ", ".join(able)
            )
        if self.data.reference:
            problems.append(
                f"data.reference: the forgetting report scores a causal LM, not a {kind} head"
            )
        if self.eval.metric != "none":
            problems.append(
                f"eval.metric: a {kind} model does not generate; its metrics are built in"
            )
        if self.data.mixing.strategy != "concat":
            problems.append(
                f"data.mixing: multitask mixing is for causal-LM data, not a {kind} head yet"
            )
        if self.task.type == "regression" and self.task.labels:
            problems.append("task.labels names classes: a regression task has none")
        if self.task.labels is not None and len(self.task.labels) < 2:
            problems.append("task.labels: a classifier needs at least two labels")
        return problems

    def _preference_rules(self) -> list[str]:
        kind = f"objective {self.objective.type}"
        problems = []
        if self.task.has_head:
            problems.append(f"{kind} tunes a causal LM's answers; task.type must be causal_lm")
        if self.train.packing:
            problems.append(
                f"train.packing: {kind} scores each answer as its own sequence; remove it"
            )
        if self.data.reference:
            problems.append(
                f"data.reference: the forgetting report is for sft runs, not {kind} yet; remove it"
            )
        if self.data.mixing.strategy != "concat":
            problems.append(f"data.mixing: {kind} reads one preference set; remove data.mixing")
        if self.data.loss_on != "completion":
            problems.append(f"data.loss_on: {kind} always scores the answers only; remove it")
        precomputed = getattr(self.objective, "precompute_ref", False)
        if (
            self.objective.needs_reference
            and not precomputed
            and not self.adapter.full_weights
            and not self.adapter.off_is_start
        ):
            fix = (
                "set objective.precompute_ref: true"
                if self.objective.type == "dpo"
                else "use lora/dora/ia3 with their default init"
            )
            problems.append(
                f"{kind}: the reference is the model as training starts, and adapter.method "
                f"{self.adapter.method!r} (this init) does not start as the base, so switching the "
                f"adapter off would score against another model: {fix}"
            )
        return problems

    def _grpo_rules(self) -> list[str]:
        kind = "objective grpo"
        problems = []
        if self.task.has_head:
            problems.append(f"{kind} trains a causal LM's completions; task.type must be causal_lm")
        if self.train.packing:
            problems.append(f"train.packing: {kind} rolls out padded batches; remove it")
        if self.data.reference:
            problems.append(
                f"data.reference: the forgetting report is for sft runs, not {kind} yet; remove it"
            )
        if self.data.mixing.strategy != "concat":
            problems.append(f"data.mixing: {kind} reads one prompt set; remove data.mixing")
        spg, accum = self.objective.steps_per_generation, self.train.grad_accum
        if spg is not None and spg % accum:
            problems.append(
                f"objective.steps_per_generation {spg}: one generation fills whole optimizer "
                f"steps here, so it must be a multiple of train.grad_accum ({accum}): set "
                f"{max(accum, spg - spg % accum)} or {spg - spg % accum + accum}"
            )
        if self.objective.min_completion_length > self.objective.max_completion_length:
            problems.append(
                "objective.min_completion_length: above max_completion_length "
                f"({self.objective.max_completion_length}); lower it"
            )
        if self.output.sample_prompts:
            problems.append(
                f"output.sample_prompts: {kind} reports its held-out reward and keeps sampled "
                "completions (completions.jsonl); remove output.sample_prompts"
            )
        if (
            self.objective.beta != 0
            and not self.adapter.full_weights
            and not self.adapter.off_is_start
        ):
            problems.append(
                f"{kind} with beta {self.objective.beta}: the reference is the adapter switched "
                f"off, and adapter.method {self.adapter.method!r} (this init) does not start as "
                "the base: set objective.beta: 0 or use lora/dora/ia3 with their default init"
            )
        return problems

    @property
    def data_seed(self) -> int:
        """Seed of the eval split and epoch shuffles: data.shuffle_seed, or train.seed when unset."""
        return self.data.shuffle_seed if self.data.shuffle_seed is not None else self.train.seed

    @property
    def run_dir(self) -> str:
        return self.output.dir.replace("{name}", self.name)
