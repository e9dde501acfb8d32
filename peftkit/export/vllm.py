"""Serving-target checks for adapter-only exports: what vLLM rejects, fixed where that is lossless.

vLLM's LoRA loader (vllm/lora/peft_helper.py) refuses adapters with `modules_to_save` or DoRA,
serves only LoRA (not IA3 or soft prompts), and serves MoE experts through its own fused-MoE
LoRA layers (`FusedMoEWithLoRA`; `FusedMoE3DWithLoRA` for fused 3-D experts since 0.12), whose
reading of peft's `target_parameters` layout (lora_A [E·r, in], lora_B [out, r·E] per expert
parameter) is not documented: such adapters are refused here. It caps the rank at
--max-lora-rank (default 16, at most 512), and older releases refuse rsLoRA. rsLoRA's scale alpha/sqrt(r) is rewritten
losslessly as plain LoRA with alpha' = alpha*sqrt(r), which every release reads the same way.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedTokenizerBase

VLLM_MAX_RANK = 512
VLLM_DEFAULT_RANK = 16


@dataclass
class ServingCheck:
    fixes: list[str] = field(default_factory=list)
    """Lossless changes made to the exported adapter."""
    problems: list[str] = field(default_factory=list)
    """What the target would reject, and what to change in the recipe."""
    notes: list[str] = field(default_factory=list)
    """Serving flags the adapter needs."""


def check_vllm(
    adapter_dir: Path, base_vocab_size: int, tokenizer: PreTrainedTokenizerBase
) -> ServingCheck:
    """Check (and losslessly fix, in place) the adapter in `adapter_dir` for vLLM."""
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    check = ServingCheck()
    if config.get("peft_type") != "LORA":
        check.problems.append(
            f"vLLM serves only LoRA adapters, this is {config.get('peft_type')}: use adapter.method lora/qlora, "
            "or export merged weights (peftkit export without --adapter-only)"
        )
        return check
    if config.get("target_parameters"):
        check.problems.append(
            f"the adapter trains parameters, not modules ({', '.join(sorted(config['target_parameters']))}: "
            "a MoE's 3-D expert weights); vLLM loads LoRA per module through its fused-MoE "
            "layers, and peftkit cannot check that it reads peft's per-parameter expert layout "
            "the way peft does: export merged weights (peftkit export without --adapter-only), or "
            "leave adapter.target_parameters unset"
        )
    if config.get("use_dora"):
        check.problems.append(
            "vLLM does not support DoRA: set adapter.use_dora: false and retrain, "
            "or export merged weights"
        )
    if config.get("modules_to_save"):
        check.problems.append(
            f"vLLM rejects modules_to_save ({', '.join(config['modules_to_save'])}): remove adapter.modules_to_save "
            "and retrain, or export merged weights"
        )
    if config.get("bias", "none") != "none":
        check.problems.append(
            "vLLM LoRA has no trained biases: set adapter.bias: none, or export merged weights"
        )
    if len(tokenizer) > base_vocab_size:
        check.problems.append(
            f"the tokenizer has {len(tokenizer) - base_vocab_size} tokens the base model lacks; vLLM cannot add "
            "vocabulary through a LoRA adapter: export merged weights"
        )
    ranks = [config["r"], *config.get("rank_pattern", {}).values()]
    if max(ranks) > VLLM_MAX_RANK:
        check.problems.append(
            f"rank {max(ranks)} exceeds vLLM's maximum {VLLM_MAX_RANK}: lower adapter.r"
        )
    elif max(ranks) > VLLM_DEFAULT_RANK:
        check.notes.append(
            f"serve with --max-lora-rank {_rank_flag(max(ranks))} (vLLM's default is 16)"
        )
    if config.get("use_rslora") and not check.problems:
        if config.get("alpha_pattern") or config.get("rank_pattern"):
            check.problems.append(
                "rsLoRA with per-module rank/alpha patterns cannot be rewritten: set use_rslora false"
            )
        else:
            config["lora_alpha"] = config["lora_alpha"] * math.sqrt(config["r"])
            config["use_rslora"] = False
            config_path.write_text(json.dumps(config, indent=2))
            check.fixes.append(
                f"rsLoRA scale alpha/sqrt(r) rewritten as plain LoRA alpha={config['lora_alpha']:.6g}"
            )
    return check


def _rank_flag(rank: int) -> int:
    return next(r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank)
