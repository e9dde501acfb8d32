"""GRPO side by side: peftkit vs TRL's GRPOTrainer on the same model, prompts, rewards and settings.

    python benchmarks/grpo.py                      # SmolLM2-135M-Instruct, the orders task
    python benchmarks/grpo.py --steps 6 --configs peftkit
    python benchmarks/grpo.py --fixed-length       # every completion exactly 48 tokens: equal work

Both sides: LoRA r16 / alpha 32 on all linear layers, dropout 0, fp32, lr 1e-3 constant, 2 prompts
x 4 completions per step (TRL: per_device_train_batch_size 8, num_generations 4; peftkit:
micro_batch_size 2, grad_accum 1), at most 48 new tokens, temperature 1.0, loss dapo, beta 0, the
rewards of recipes/smollm2-135m/grpo_rewards.py on the rows of recipes/data/orders-train.jsonl
with the quickstart's system prompt. Each configuration runs in its own process, one after the
other; the figures are seconds per step (after the first), completions per second, tokens per
second and the mean reward of the last steps. Results go to benchmarks/results/grpo.{json,md}.

Tokens are counted as TRL's `num_tokens` counts them, on both sides: every completion's prompt
and completion tokens (G x (P + T) per prompt), whatever the forward runs (peftkit runs each
prompt once per group: P + G x T). Generated lengths differ between the two sides (their sampling
RNGs differ) and dominate the time; `--fixed-length` makes both generate exactly 48 tokens (TRL:
generation_kwargs min_new_tokens, peftkit: objective.min_completion_length), so s/step compares
equal work. Peak RSS is the process's high-water mark (getrusage ru_maxrss).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

SYSTEM = (
    "Extract the order as one JSON object with the keys name, item, quantity (a number), city "
    "and day. Answer with the JSON only."
)
REWARDS = ["facts_mentioned", "is_json_object", "field_accuracy"]
WEIGHTS = [0.5, 0.5, 1.0]
PROMPTS, GENERATIONS, MAX_NEW, LR = 2, 4, 48, 1e-3
MODEL = "builtin:smollm2-135m"  # --model: a tiny folder for a smoke run of the harness


def _rows(n: int) -> list[dict]:
    rows = []
    for line in (ROOT / "recipes" / "data" / "orders-train.jsonl").read_text().splitlines()[:n]:
        turns = json.loads(line)["messages"]
        prompt = [{"role": "system", "content": SYSTEM}, *turns[:-1]]
        rows.append({"prompt": prompt, "answer": turns[-1]["content"]})
    return rows


def _peftkit(out: Path, steps: int, fixed: bool) -> list[dict]:
    import yaml

    from peftkit import api

    data = out / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(PROMPTS * steps)))
    recipe = {
        "name": "bench-grpo",
        "model": {"name": MODEL},
        "adapter": {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
        "objective": {
            "type": "grpo",
            "rewards": [
                {"function": f"{ROOT}/recipes/smollm2-135m/grpo_rewards.py:{f}", "weight": w}
                for f, w in zip(REWARDS, WEIGHTS)
            ],
            "num_generations": GENERATIONS,
            "max_completion_length": MAX_NEW,
            "temperature": 1.0,
            "loss_type": "dapo",
            "beta": 0.0,
            **({"min_completion_length": MAX_NEW} if fixed else {}),
        },
        "data": {"train": str(data), "max_length": 256, "cache": False},
        "train": {
            "max_steps": steps,
            "micro_batch_size": PROMPTS,
            "lr": LR,
            "scheduler": "constant",
            "warmup_steps": 0,
            "precision": "fp32",
            "max_grad_norm": None,
            "seed": 0,
        },
        "output": {"dir": str(out / "run"), "plot": False, "overwrite": True},
    }
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    stamps: list[float] = []
    api.train(str(path), on_step=lambda step, record: stamps.append(time.perf_counter()))
    records = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    steps_ = [r for r in records if "loss" in r]
    return [
        {
            "t": t,
            "reward": r["reward"],
            "tokens": r["tokens"],
            "length": r["completions/mean_length"],
        }
        for t, r in zip(stamps, steps_)
    ]


def _trl(out: Path, steps: int, fixed: bool) -> list[dict]:
    import importlib.util

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from peftkit.models.load import resolve_source

    spec = importlib.util.spec_from_file_location(
        "grpo_rewards", ROOT / "recipes" / "smollm2-135m" / "grpo_rewards.py"
    )
    rewards = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rewards)
    folder = resolve_source(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    log: list[dict] = []

    class Stamp(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                seen = logs["num_tokens"]  # cumulative
                done = sum(x["tokens"] for x in log)
                log.append(
                    {
                        "t": time.perf_counter(),
                        "reward": logs["reward"],
                        "tokens": seen - done,
                        "length": logs["completions/mean_length"],
                    }
                )

    args = GRPOConfig(
        output_dir=str(out / "trl"),
        per_device_train_batch_size=PROMPTS * GENERATIONS,
        num_generations=GENERATIONS,
        max_completion_length=MAX_NEW,
        temperature=1.0,
        loss_type="dapo",
        beta=0.0,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=0.0,
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        reward_weights=WEIGHTS,
        generation_kwargs={"min_new_tokens": MAX_NEW} if fixed else None,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[getattr(rewards, f) for f in REWARDS],
        args=args,
        train_dataset=Dataset.from_list(_rows(PROMPTS * steps)),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"),
        callbacks=[Stamp()],
    )
    trainer.train()
    return log


CONFIGS = {"peftkit": _peftkit, "trl": _trl}


def _child(name: str, out: Path, steps: int, fixed: bool) -> None:
    log = CONFIGS[name](out, steps, fixed)
    per_step = [b["t"] - a["t"] for a, b in itertools.pairwise(log)]
    timed = log[1:]  # the steps whose duration is known (a step's stamp closes it)
    last = log[-min(len(log), 5) :]
    result = {
        "config": name,
        "steps": len(log),
        "s_per_step": sum(per_step) / max(len(per_step), 1),
        "completions_per_s": PROMPTS * GENERATIONS * len(per_step) / max(sum(per_step), 1e-9),
        "reward_first": log[0]["reward"],
        "reward_last5": sum(r["reward"] for r in last) / len(last),
        "tokens_per_s": sum(r["tokens"] for r in timed) / max(sum(per_step), 1e-9),
        "mean_completion_length": sum(r["length"] for r in timed) / max(len(timed), 1),
        "fixed_length": fixed,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
    }
    (out / "result.json").write_text(json.dumps(result))


def main() -> None:
    global MODEL
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--configs", default="peftkit,trl")
    p.add_argument("--out", type=Path, default=HERE / "results" / "grpo")
    p.add_argument(
        "--fixed-length",
        action="store_true",
        help=f"both sides generate exactly {MAX_NEW} tokens per completion (equal work)",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument(
        "--model", default=MODEL, help="the model both sides train (default %(default)s)"
    )
    a = p.parse_args()
    MODEL = a.model
    if a.child:
        _child(a.child, a.out, a.steps, a.fixed_length)
        return
    results = []
    for name in a.configs.split(","):
        out = a.out / name
        out.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            __file__,
            "--child",
            name,
            "--out",
            str(out),
            "--steps",
            str(a.steps),
            "--model",
            a.model,
            *(["--fixed-length"] if a.fixed_length else []),
        ]
        subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        results.append(json.loads((out / "result.json").read_text()))
    lines = [
        "| config | s / step | completions / s | tokens / s | mean completion length | "
        "reward, first step | reward, last 5 steps | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['config']} | {r['s_per_step']:.2f} | {r['completions_per_s']:.2f} | "
            f"{r['tokens_per_s']:,.0f} | {r['mean_completion_length']:.1f} | "
            f"{r['reward_first']:.3f} | {r['reward_last5']:.3f} | {r['peak_rss_mib']:,.0f} |"
        )
    if {"peftkit", "trl"} <= {r["config"] for r in results}:
        ours, theirs = (next(r for r in results if r["config"] == c) for c in ("peftkit", "trl"))
        lines.append(f"\npeftkit steps/s = {theirs['s_per_step'] / ours['s_per_step']:.2f}x TRL's")
    (a.out / "grpo.md").write_text("\n".join(lines) + "\n")
    (a.out / "grpo.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
