"""Generation-based evaluation: answer held-out rows greedily and score the answers.

Loss says how likely the reference answer is; users judge a fine-tune by what it *says*. Each
held-out chat row is cut before its last supervised span (the last assistant turn, whose tokens
start right after the template's generation prompt), the model continues greedily until a stop
token training supervised, and the answer is scored against that span (`answer_metrics`).
Prompts are left-padded into batches; the cut is made on token ids, so the prompt is exactly the
one training conditioned on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn
from transformers import PreTrainedTokenizerBase

from peftkit.data.encode import IGNORE, EncodedRow
from peftkit.errors import DataError
from peftkit.models.greedy import greedy_generate
from peftkit.objectives.answer_metrics import Scorer

if TYPE_CHECKING:
    from peftkit.metrics import MetricsLog
    from peftkit.recipe.schema import EvalSpec


@dataclass
class HeldOutAnswer:
    prompt_ids: list[int]
    reference: str
    origin: str = ""
    """The data file and line of the row."""


def held_out_answers(
    rows: list[EncodedRow],
    tokenizer: PreTrainedTokenizerBase,
    applies: Callable[[str], bool] | None = None,
) -> list[HeldOutAnswer]:
    """Prompt (everything before the last supervised span) and reference text of each row that
    has a supervised span; rows without one (or whose span starts at token 0) are skipped.

    `applies` (a metric's test of a reference): the answer is the last supervised span whose
    reference it accepts instead, and rows with none are skipped. An agent chat (call, tool
    result, confirmation) is then scored on the turn that calls, its prompt the chat up to it."""
    out = []
    for row in rows:
        supervised = np.flatnonzero(row.labels != IGNORE)
        if supervised.size == 0:
            continue
        # contiguous runs of supervised positions, the last one first
        breaks = np.flatnonzero(np.diff(supervised) > 1)
        starts = [int(supervised[0]), *(int(supervised[b + 1]) for b in breaks)]
        ends = [*(int(supervised[b]) + 1 for b in breaks), int(supervised[-1]) + 1]
        for start, end in reversed(list(zip(starts, ends))):
            if start == 0:
                break
            ids = row.input_ids[start:end]
            reference = tokenizer.decode(ids, skip_special_tokens=True).strip()
            if applies is None or applies(reference):
                prompt = [int(t) for t in row.input_ids[:start]]
                out.append(HeldOutAnswer(prompt, reference, row.origin))
                break
    return out


GENERATION_BUDGET = 2**30
"""Bytes the transients of one generate call may take (`row_bytes` per row); batches shrink to fit."""


def row_bytes(
    *, vocab: int, layers: int, kv_width: int, hidden: int, intermediate: int,
    prompt_tokens: int, new_tokens: int, value_bytes: int,
) -> int:  # fmt: skip
    """Transient bytes one generated row costs: its KV cache (prompt + new tokens, every layer,
    keys and values of `kv_width`), one layer's prefill activations (fp32 bound) and its last
    position's logits (the head's output, an fp32 copy and the greedy pick's): `generate` asks
    for the last position's logits only (`logits_to_keep=1`)."""
    cache = (prompt_tokens + new_tokens) * layers * 2 * kv_width * value_bytes
    prefill = prompt_tokens * (4 * hidden + 2 * intermediate) * 4
    return cache + prefill + vocab * (value_bytes + 4 + 4)


def kv_width(config) -> int:
    """Width of one layer's keys (= values) per token: KV heads x head dimension."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return (getattr(config, "num_key_value_heads", None) or heads) * head_dim


def model_row_bytes(model: nn.Module, prompt_tokens: int, new_tokens: int) -> int:
    """`row_bytes` for this model's config and parameter dtype."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return row_bytes(
        vocab=text.vocab_size,
        layers=text.num_hidden_layers,
        kv_width=kv_width(text),
        hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        value_bytes=next(model.parameters()).element_size(),
    )


def rows_per_generate(requested: int, one_row: int, budget: int | None = None) -> int:
    """`requested` rows, fewer if their transients would pass `budget` (default
    GENERATION_BUDGET), at least one."""
    budget = GENERATION_BUDGET if budget is None else budget
    return max(1, min(requested, budget // max(one_row, 1)))


def score_answers(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: list[HeldOutAnswer],
    scorer: Scorer,
    stop_ids: list[int],
    max_new_tokens: int,
    batch_size: int = 16,
) -> tuple[dict[str, float], list[dict[str, str | float]]]:
    """Mean of each figure the scorer returns over `items`, and the per-row answers."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(items)), key=lambda i: len(items[i].prompt_ids))  # less padding
    if items:  # sized to memory: a 262k vocabulary or long prompts shrink the batch
        longest = max(len(item.prompt_ids) for item in items)
        one_row = model_row_bytes(model, longest, max_new_tokens)
        batch_size = rows_per_generate(batch_size, one_row)
    answers: dict[int, str] = {}
    try:
        for a in range(0, len(order), batch_size):
            chunk = order[a : a + batch_size]
            new = greedy_generate(
                model,
                [items[i].prompt_ids for i in chunk],
                tokenizer.pad_token_id,
                stop_ids,
                max_new_tokens,
            )
            for i, ids in zip(chunk, new):
                answers[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    rows, totals = [], {}
    for i, item in enumerate(items):
        figures = scorer(answers[i], item.reference)
        for k, v in figures.items():
            totals[k] = totals.get(k, 0.0) + v
        rows.append({"answer": answers[i], "reference": item.reference, **figures})
    return {k: v / max(len(items), 1) for k, v in totals.items()}, rows


class AnswerEval:
    """The recipe's `eval` metric over the first `eval.rows` held-out rows, ready to run on the
    model at any evaluation. Figures are logged as `answer_score` (the metric) and
    `answer_<figure>` (e.g. answer_field_accuracy); the last per-row answers are kept."""

    def __init__(
        self,
        spec: EvalSpec,
        rows: list[EncodedRow],
        tokenizer: PreTrainedTokenizerBase,
        stop_ids: list[int],
    ) -> None:
        from peftkit.objectives.answer_metrics import (
            BUILTIN,
            REFERENCE_CHECKS,
            ToolCallMetric,
            load_function,
        )

        self.spec = spec
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        tool_call = ToolCallMetric(tokenizer.chat_template) if spec.metric == "tool_call" else None
        # tool_call scores the turns that call a tool; other held-out rows are not scored
        self.items = held_out_answers(
            rows[: spec.rows], tokenizer, tool_call.applies if tool_call else None
        )
        if tool_call is not None and not self.items:
            raise DataError(
                f"eval.metric tool_call: none of the {min(len(rows), spec.rows)} held-out rows "
                "scored has an assistant turn that calls a tool; add such rows to the eval "
                "data, or set eval.metric to exact, contains or none"
            )
        check = REFERENCE_CHECKS.get(spec.metric)
        for item in self.items if check else []:  # before any training, not at its first eval
            problem = check(item.reference)
            if problem:
                raise DataError(
                    f"{item.origin}: eval.metric {spec.metric} cannot score this row's reference "
                    f"answer: {problem}. Fix the data, or set eval.metric to exact, contains or "
                    "none"
                )
        self.scorer = (
            load_function(spec.function)
            if spec.metric == "python"
            else tool_call or BUILTIN[spec.metric]
        )
        self.last_rows: list[dict[str, str | float]] = []

    @classmethod
    def for_run(cls, spec: EvalSpec, rows, tokenizer, stop_ids) -> AnswerEval | None:
        return None if spec.metric == "none" or not rows else cls(spec, rows, tokenizer, stop_ids)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        means, self.last_rows = score_answers(
            model,
            self.tokenizer,
            self.items,
            self.scorer,
            self.stop_ids,
            self.spec.max_new_tokens,
            self.spec.batch_size,
        )
        return {f"answer_{k}": v for k, v in means.items()}

    def report(self, before: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
        """answers.json: per held-out row, the prompt, the reference and the answers before
        (step 0; absent after a resume) and after training, with their scores."""
        out = []
        for i, (item, after) in enumerate(zip(self.items, self.last_rows)):
            row = {
                "prompt": self.tokenizer.decode(item.prompt_ids, skip_special_tokens=True),
                "reference": item.reference,
            }
            if before is not None:
                row |= {"before": before[i]["answer"], "score_before": before[i]["score"]}
            out.append(row | {"after": after["answer"], "score_after": after["score"]})
        return out


def answer_summary(metrics: MetricsLog, metric: str, rows: int) -> dict[str, Any] | None:
    """The task metric before (step 0) and after (last evaluation), with its other figures."""
    curve = metrics.series("answer_score")
    if not curve:
        return None
    first, last = metrics.record_at(curve[0][0]), metrics.record_at(curve[-1][0])
    figures = sorted(k.removeprefix("answer_") for k in last if k.startswith("answer_"))
    return {
        "metric": metric,
        "rows": rows,
        "from_step": curve[0][0],
        "to_step": curve[-1][0],
        **{f"{k}_before": first.get(f"answer_{k}") for k in figures},
        **{f"{k}_after": last.get(f"answer_{k}") for k in figures},
    }


def summary_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """The printed task-metric lines, when the run scored generated answers."""
    a = s.get("answers")
    if a is None:
        return []
    extra = [k.removesuffix("_after") for k in a if k.endswith("_after") and k != "score_after"]
    extra = [k for k in extra if a.get(k + "_before") is not None]
    line = f"{a['score_before']:.1%} -> {a['score_after']:.1%} on {a['rows']} held-out rows"
    line += "".join(
        f"; {k.replace('_', ' ')} {a[k + '_before']:.1%} -> {a[k + '_after']:.1%}" for k in extra
    )
    return [(f"task metric ({a['metric']})", line)]
