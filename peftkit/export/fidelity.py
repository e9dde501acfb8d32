"""How closely a candidate model reproduces the trained model on held-out rows, and the gate
every export passes (`gate_failures`, `enforce_gate`: causal LMs, GGUF files and task heads alike).

Per row, both models score the same tokens; over all positions we report the largest and mean
absolute logit error, the relative error ||Δ|| / ||trained|| (Frobenius, all rows together), and
the KL divergence KL(trained || candidate) per token; on the supervised positions, the perplexity
of each. Then both generate greedily from the row's prompt and we count the tokens they agree on.

The client check (`client_failures`): held-out prompts rendered the way an OpenAI client's request
is (its turns only, through the exported chat template) must be the very prompts training rendered
(with its system prompt), and the candidate's greedy answers to them must agree with the trained
model's answers to training's rendering as closely as the gate requires.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from peftkit.data.encode import IGNORE, EncodedRow
from peftkit.errors import FidelityGateFailed
from peftkit.models.greedy import greedy_generate
from peftkit.recipe.schema import FidelityThresholds


@dataclass
class Fidelity:
    samples: int
    tokens: int
    max_abs_error: float
    mean_abs_error: float
    relative_error: float
    mean_kl: float
    max_kl: float
    perplexity_trained: float
    perplexity_candidate: float
    greedy_agreement: float
    greedy_exact_rows: float

    def to_dict(self) -> dict:
        return asdict(self)

    def failures(self, limits: FidelityThresholds) -> list[str]:
        return gate_failures(limits, self.relative_error, self.greedy_agreement, self.mean_kl)


def gate_failures(
    limits: FidelityThresholds,
    relative_error: float,
    agreement: float,
    mean_kl: float | None = None,
    agreement_name: str = "greedy agreement",
) -> list[str]:
    """The thresholds a candidate misses, each as a line; [] = it passes. `agreement` is greedy
    token agreement for a causal LM, predicted-class agreement for a task head (which has no
    per-token distribution: `mean_kl` None)."""
    out = []
    if relative_error > limits.max_relative_error:
        out.append(f"relative error {relative_error:.3g} > {limits.max_relative_error:g}")
    if mean_kl is not None and mean_kl > limits.max_mean_kl:
        out.append(f"mean KL {mean_kl:.3g} > {limits.max_mean_kl:g}")
    if agreement < limits.min_greedy_agreement:
        out.append(f"{agreement_name} {agreement:.3f} < {limits.min_greedy_agreement:g}")
    return out


def enforce_gate(failures: list[str], allow_drift: bool) -> None:
    """Raise `FidelityGateFailed` when the candidate missed a threshold, unless `allow_drift`.
    Called inside the export's `atomic_dir`, so a failed export leaves nothing behind."""
    if failures and not allow_drift:
        raise FidelityGateFailed(
            f"the export differs from the trained model: {'; '.join(failures)}. Nothing was "
            "written. Inspect the figures above; pass --allow-drift to keep it anyway, or raise "
            "export.thresholds"
        )


def log_kept(failures: list[str], out: Path, log: Callable[[str], None]) -> None:
    """The last lines of a kept export; one that failed the gate (kept by allow_drift) says so."""
    if failures:
        log(f"warning: fidelity gate failed ({'; '.join(failures)}) but --allow-drift kept {out}")
    log(f"exported to {out}")


@dataclass
class ClientPrompt:
    """One held-out prompt as token ids, rendered two ways."""

    training: np.ndarray  # (tokens,) as training rendered it, system prompt included
    client: np.ndarray  # (tokens,) a request without a system turn, through the exported template


@dataclass
class Reference:
    """The trained model's outputs on the samples, computed once and compared with each candidate."""

    logits: list[torch.Tensor]  # per row: (seq, vocab) fp32
    generations: list[list[int]]
    client_generations: list[list[int]] = field(default_factory=list)
    """Greedy answers to each `ClientPrompt.training`."""


def sample_rows(rows: list[EncodedRow], n: int, max_tokens: int) -> list[EncodedRow]:
    """Up to n rows, each cut to max_tokens, that keep at least one supervised token."""
    picked = []
    for row in rows:
        cut = EncodedRow(row.input_ids[:max_tokens], row.labels[:max_tokens], row.origin)
        if cut.n_supervised:
            picked.append(cut)
        if len(picked) == n:
            break
    return picked


def _prompt(row: EncodedRow) -> np.ndarray:
    first = int(np.flatnonzero(row.labels != IGNORE)[0])
    return row.input_ids[: max(first, 1)]


@torch.no_grad()
def _logits(model: nn.Module, ids: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(ids).unsqueeze(0)
    out = model(input_ids=t, attention_mask=torch.ones_like(t), use_cache=False)
    return out.logits[
        0, -len(ids) :
    ].float()  # (seq, vocab); prompt tuning prepends virtual positions


def _greedy(
    model: nn.Module, ids: np.ndarray, n: int, stop_ids: list[int], pad_id: int
) -> list[int]:
    return greedy_generate(model, [ids.tolist()], pad_id, stop_ids, n, keep_stop=True)[0]


def reference_outputs(
    model: nn.Module,
    rows: list[EncodedRow],
    generate_tokens: int,
    stop_ids: list[int],
    pad_id: int,
    client: list[ClientPrompt] | None = None,
) -> Reference:
    def greedy(ids: np.ndarray) -> list[int]:
        return _greedy(model, ids, generate_tokens, stop_ids, pad_id)

    return Reference(
        logits=[_logits(model, r.input_ids) for r in rows],
        generations=[greedy(_prompt(r)) for r in rows],
        client_generations=[greedy(c.training) for c in client or []],
    )


def client_failures(
    reference: Reference,
    candidate: nn.Module,
    prompts: list[ClientPrompt],
    limits: FidelityThresholds,
    generate_tokens: int,
    stop_ids: list[int],
    pad_id: int,
) -> tuple[dict, list[str]]:
    """The client check (see the module docstring): its figures and the gate lines it fails."""
    differ = [i for i, c in enumerate(prompts) if not np.array_equal(c.training, c.client)]
    agree = compared = exact = 0
    for c, ref_gen in zip(prompts, reference.client_generations):
        gen = _greedy(candidate, c.client, generate_tokens, stop_ids, pad_id)
        agree += sum(a == b for a, b in zip(gen, ref_gen))
        compared += max(len(gen), len(ref_gen))
        exact += gen == ref_gen
    agreement = agree / max(compared, 1)
    figures = {
        "prompts": len(prompts),
        "prompts_rendered_differently": len(differ),
        "greedy_agreement": agreement,
        "greedy_exact_rows": exact / max(len(prompts), 1),
    }
    failures = []
    if differ:
        failures.append(
            f"{len(differ)} of {len(prompts)} held-out prompts sent as a client sends them (no "
            "system turn, through the exported chat template) render differently from training"
        )
    if prompts and agreement < limits.min_greedy_agreement:
        failures.append(
            f"greedy agreement on client-rendered prompts {agreement:.3f} < "
            f"{limits.min_greedy_agreement:g}"
        )
    return figures, failures


def compare(
    reference: Reference,
    candidate: nn.Module,
    rows: list[EncodedRow],
    generate_tokens: int,
    stop_ids: list[int],
    pad_id: int,
) -> Fidelity:
    max_abs = sum_abs = sq_diff = sq_ref = kl_sum = 0.0
    max_kl = 0.0
    nll = {"trained": 0.0, "candidate": 0.0}
    n_tokens = n_supervised = agree = compared = exact = 0
    for ref_logits, ref_gen, row in zip(reference.logits, reference.generations, rows):
        logits = _logits(candidate, row.input_ids)
        diff = logits - ref_logits
        max_abs = max(max_abs, diff.abs().max().item())
        sum_abs += diff.abs().sum().item()
        sq_diff += diff.pow(2).sum().item()
        sq_ref += ref_logits.pow(2).sum().item()
        ref_logp, cand_logp = F.log_softmax(ref_logits, -1), F.log_softmax(logits, -1)
        kl = (ref_logp.exp() * (ref_logp - cand_logp)).sum(-1)  # (seq,)
        kl_sum += kl.sum().item()
        max_kl = max(max_kl, kl.max().item())
        n_tokens += len(row.input_ids)
        targets = torch.from_numpy(row.labels[1:])
        mask = targets != IGNORE
        n_supervised += int(mask.sum())
        for key, logp in (("trained", ref_logp), ("candidate", cand_logp)):
            nll[key] -= logp[:-1][mask].gather(-1, targets[mask].unsqueeze(-1)).sum().item()
        gen = _greedy(candidate, _prompt(row), generate_tokens, stop_ids, pad_id)
        length = max(len(gen), len(ref_gen))
        agree += sum(a == b for a, b in zip(gen, ref_gen))
        compared += length
        exact += gen == ref_gen
    vocab = reference.logits[0].shape[-1]
    return Fidelity(
        samples=len(rows),
        tokens=n_tokens,
        max_abs_error=max_abs,
        mean_abs_error=sum_abs / (n_tokens * vocab),
        relative_error=math.sqrt(sq_diff / max(sq_ref, 1e-30)),
        mean_kl=kl_sum / n_tokens,
        max_kl=max_kl,
        perplexity_trained=math.exp(min(nll["trained"] / max(n_supervised, 1), 50)),
        perplexity_candidate=math.exp(min(nll["candidate"] / max(n_supervised, 1), 50)),
        greedy_agreement=agree / max(compared, 1),
        greedy_exact_rows=exact / len(rows),
    )
