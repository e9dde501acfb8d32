"""What every objective declares: the kind of run it is, read before any model loads (its recipe
section and rules, its data, its model head, its summary lines, and what export, the planner,
serving and sharded launches support), and how it builds the runtime the training loop holds
(`peftkit.objectives.runtime.Objective`: collation, loss, metrics, audit lines).

The declarations import neither torch nor transformers: the recipe composes every registered
kind's section, and `peftkit validate` or a cached `peftkit prepare` load the recipe without
them. The runtimes need torch, so they live in their own modules, imported by `build`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from peftkit.data.chat import ChatTemplate
from peftkit.data.encode import EncodedRow
from peftkit.data.pipeline import PreparedData, mapped_data
from peftkit.metrics import ChartPanel
from peftkit.section import Section

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from peftkit.objectives.runtime import Objective


class RecipeView(Protocol):
    """What an objective reads of the recipe that composes it (`peftkit.recipe.schema.Recipe`, a
    layer up, passes itself; objectives never import it): its sections, by the names they have
    there."""

    model: Any
    adapter: Any
    data: Any
    task: Any
    objective: Any
    train: Any
    output: Any
    eval: Any

    @property
    def data_seed(self) -> int: ...


@dataclass(frozen=True)
class Support:
    """What the consumers of a run support for an objective: None = supported, else the refusal
    they give, with its reason (`peftkit plan`, `peftkit export --format gguf`, serving the
    adapter, and FSDP / DeepSpeed launches, whose models are split over processes)."""

    plan: str | None = None
    gguf: str | None = None
    serving: str | None = None
    sharded: str | None = None
    """Said after "under FSDP" / "under DeepSpeed"."""


@dataclass
class BuildContext:
    """What building an objective's runtime may use: the loaded (adapted, not yet wrapped) model
    and the run's data."""

    recipe: RecipeView
    data: PreparedData
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    precision: str
    class_names: list[str] | None
    device: torch.device
    unwrap: Callable[[nn.Module], nn.Module]


class ObjectiveKind:
    """One kind of run, as a class: class variables and class methods, asked by the recipe,
    `peftkit prepare`, the loop, export and the planner. Subclasses override what differs; each
    module registers its class once (`peftkit.objectives.registry.register`)."""

    name: ClassVar[str]
    """The registry's name for it (one row of the objectives table)."""
    spec: ClassVar[type[Section]]
    """The recipe's `objective:` section it runs (the member of the union with its `type`)."""
    precedence: ClassVar[int] = 0
    """Kinds that run the same section (sft: causal LM, multitask, task head) are asked to
    `selects` a recipe from the highest precedence down; the first that does runs."""
    head: ClassVar[str] = "causal_lm"
    """The model head it trains: causal_lm (the LM's own) or sequence_classification (a new head,
    `AutoModelForSequenceClassification`); export writes the model accordingly."""
    peft_task_type: ClassVar[str] = "CAUSAL_LM"
    """peft's task type for the adapter."""
    needs_eos: ClassVar[bool] = True
    """The tokenizer must have an EOS token (rows end with it)."""
    row_type: ClassVar[type] = EncodedRow
    """The class of its encoded rows (how the data cache maps them back)."""
    caches_rows: ClassVar[bool] = True
    """Its rows are kept in the data cache (`data.cache`); False: encoded (and checked) anew by
    every run and every `peftkit prepare`."""
    held_out_chats: ClassVar[bool] = True
    """Its held-out rows are chats export can render for the prompt check (not preference pairs)."""
    support: ClassVar[Support] = Support()
    charts: ClassVar[tuple[ChartPanel, ...]] = ()
    """Panels of the loss plot below the losses (`peftkit.metrics.plot_losses`): (draw, the series
    whose presence shows it)."""
    summary_line: ClassVar[str] = ""
    """What it optimises, in one line (the objectives table)."""

    @classmethod
    def selects(cls, recipe: RecipeView) -> bool:
        """Whether this kind runs `recipe` (whose `objective:` is this kind's `spec`)."""
        return True

    @classmethod
    def rules(cls, recipe: RecipeView) -> list[str]:
        """Cross-field problems of the recipe under this objective, each saying what to change."""
        return []

    @classmethod
    def packing_refusal(cls, recipe: RecipeView) -> str | None:
        """Why rows are never packed (so `train.micro_batch_tokens` cannot apply), or None."""
        return None

    @classmethod
    def data_key(cls, recipe: RecipeView) -> dict[str, Any] | None:
        """What of the recipe besides its `data:` section decides the encoded rows (part of the
        data cache's key); None = nothing."""
        return None

    @classmethod
    def prepare_data(
        cls, recipe: RecipeView, tokenizer: PreTrainedTokenizerBase, seed: int
    ) -> tuple[PreparedData, list[str] | None]:
        """Read, split and encode the recipe's rows: (data, class names or None)."""
        raise NotImplementedError

    @classmethod
    def mapped_data(cls, folder: Path, template: ChatTemplate) -> PreparedData:
        """Its rows as the data cache folder `folder` holds them (a start found by
        `peftkit.data.cache.starts`)."""
        return mapped_data(folder, template, cls.row_type)[0]

    @classmethod
    def scored_rows(
        cls, recipe: RecipeView, tokenizer: PreTrainedTokenizerBase, seed: int
    ) -> PreparedData:
        """The rows a causal LM trained by the recipe is scored on outside training (export's
        fidelity check, combine's evaluation), as supervised rows."""
        return cls.prepare_data(recipe, tokenizer, seed)[0]

    @classmethod
    def head_config(cls, class_names: list[str] | None, pad_id: int | None) -> dict | None:
        """The model's head settings (`peftkit.models.load.head_config`); None = the LM head."""
        return None

    @classmethod
    def build(cls, ctx: BuildContext) -> Objective:
        """The runtime the loop holds, with its batching chosen for this model."""
        raise NotImplementedError

    @classmethod
    def summary_rows(cls, summary: dict[str, Any]) -> list[tuple[str, str]]:
        """(label, text) lines of the printed summary from its `summary` entries."""
        return []
