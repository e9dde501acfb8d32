"""Check `peftkit plan` against measured peaks: train each case in a fresh process, plan it in
another, compare. CPU peaks are peak RSS; on a GPU, torch.cuda.max_memory_allocated.

    python benchmarks/plan_check.py            # writes benchmarks/results/plan_check.{json,md}
    python benchmarks/plan_check.py --only smollm2   # the cases whose name contains a word
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
QUICK = str(ROOT / "recipes" / "tiny-llama" / "chat-skills.yaml")
SMOLLM2 = str(ROOT / "recipes" / "quickstart.yaml")
BENCH = HERE / "results" / "work" / "50m"

CASES = {
    "tiny-llama lora fp32 (quickstart)": (QUICK, ["train.max_steps=15"]),
    "tiny-llama lora bf16 (padded)": (
        QUICK,
        ["train.max_steps=15", "train.packing=false", "train.precision=bf16"],
    ),
    "tiny-llama full fp32": (
        QUICK,
        ["train.max_steps=15", "adapter={method: full}", "train.precision=fp32"],
    ),
    "tiny-llama qlora 4-bit fp32": (
        QUICK,
        ["train.max_steps=15", "adapter.method=qlora", "model.quantization={bits: 4}"],
    ),
    "smollm2-135m lora fp32 (quickstart, real weights)": (SMOLLM2, ["train.max_steps=4"]),
    "50m lora bf16 (benchmark defaults)": (None, []),
    "50m lora bf16 (padded, full logits)": (
        None,
        ["train.packing=false", "train.supervised_logits_only=false"],
    ),
    "50m lora bf16 + checkpointing": (None, ["train.gradient_checkpointing=true"]),
    "50m lora fp32": (None, ["train.precision=fp32"]),
}


def bench_recipe(path: Path) -> str:
    """The benchmark workload (benchmarks/run.py builds it) as a peftkit recipe."""
    import yaml

    recipe = {
        "name": "plan-check",
        "model": {"name": str(BENCH / "model")},
        "adapter": {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"train": str(BENCH / "train.jsonl"), "max_length": 512},
        "train": {"max_steps": 10, "micro_batch_size": 4, "grad_accum": 4, "lr": 1e-3},
        "output": {"dir": "runs/plan-check", "plot": False},
    }
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


TRAIN = (
    "s = api.train(sys.argv[1], sys.argv[2:]); "
    "out = {k: s[k] for k in ('peak_memory_bytes', 'largest_micro_batch_tokens')}"
)
PLAN = (
    "p = api.plan(sys.argv[1], sys.argv[2:]); "
    "out = {'total': p.estimate.total, 'tokens': p.workload.tokens, 'parts': p.estimate.parts}"
)


def _in_fresh_process(body: str, args: list[str]) -> dict | None:
    """Run `body` (which sets `out`) in a new Python process, so each peak is that step's own."""
    code = f"import json, sys; from peftkit import api; {body}; print('@@' + json.dumps(out))"
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT
    )
    if proc.returncode:
        print(proc.stderr[-1500:])
        return None
    return json.loads(proc.stdout.split("@@")[-1])


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    cases = {k: v for k, v in CASES.items() if parser.parse_args().only in k}
    if any(recipe is None for recipe, _ in cases.values()) and not (BENCH / "model").exists():
        subprocess.run(
            [sys.executable, str(HERE / "run.py"), "--configs", "peftkit", "--steps", "2"],
            check=True,
        )
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    rows = []
    for name, (recipe, overrides) in cases.items():
        recipe = recipe or bench_recipe(out / "plan-check.yaml")
        common = [
            recipe,
            *overrides,
            "output.overwrite=true",
            "output.dir=runs/plan-check",
            "output.plot=false",
        ]
        measured = _in_fresh_process(TRAIN, common)
        planned = measured and _in_fresh_process(PLAN, common)
        if not planned:
            print(f"{name}: failed")
            continue
        error = planned["total"] / measured["peak_memory_bytes"] - 1
        rows.append({"case": name, "measured": measured, "planned": planned, "error": error})
        print(f"{name}: planned {planned['total'] / 2**20:,.0f} MiB, measured "
              f"{measured['peak_memory_bytes'] / 2**20:,.0f} MiB ({error:+.1%}); largest micro-batch "
              f"{planned['tokens']} planned vs {measured['largest_micro_batch_tokens']} seen")  # fmt: skip
    lines = ["| case | planned MiB | measured peak MiB | error | largest micro-batch tokens (plan / run) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['planned']['total'] / 2**20:,.0f} | {r['measured']['peak_memory_bytes'] / 2**20:,.0f} "
            f"| {r['error']:+.1%} | {r['planned']['tokens']} / {r['measured']['largest_micro_batch_tokens']} |"
        )
    (out / "plan_check.md").write_text("\n".join(lines) + "\n")
    (out / "plan_check.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
