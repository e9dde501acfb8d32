"""The recipe's `data:` and `task:` sections: what to train on and how rows become tokens. Defined
below the recipe (as `models.spec` holds the model section), with the data code that reads them;
the recipe composes them."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from peftkit.section import Section


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
