"""peftkit vs transformers.Trainer + peft vs TRL SFTTrainer, side by side, one command.

    python benchmarks/run.py --model builtin:smollm2-135m --steps 12 --grad-accum 2
                                                   # real weights: SmolLM2-135M-Instruct
    python benchmarks/run.py                       # CPU: ~52M random Llama, 20 steps each
    python benchmarks/run.py --size llama-3.2-1b   # GPU: a real architecture, random weights
    python benchmarks/run.py --configs hf-trainer,peftkit --steps 10

Each configuration trains in its own process, back to back; then one more process evaluates every
saved adapter the same way (fp32 base + adapter, eval rows, loss per supervised token). Results go
to benchmarks/results/latest.{json,md}. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing benchmarks/

from benchmarks import runners, workload  # noqa: E402

H100_BF16_FLOPS = 989e12  # dense bf16 peak of an H100/H200 SXM


def gemm_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 FLOP/s of a square matmul on this machine (CPU) with torch's threads: the
    ceiling a training step could reach if it were all large GEMMs."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def child(name: str, workdir: Path, out: Path, steps: int) -> None:
    import psutil
    import torch

    born = psutil.Process().create_time()
    from transformers import AutoTokenizer

    pad_id = AutoTokenizer.from_pretrained(str(workdir / "model")).pad_token_id
    clock = runners.Clock(pad_id)
    fn, kwargs = runners.CONFIGS[name]
    info = fn(workdir, out, steps, clock, **kwargs)
    (t1, tok1), (tn, tokn) = clock.steps[0], clock.steps[-1]
    result = {
        "config": name,
        "steps": len(clock.steps),
        "real_tokens": tokn,
        # steady state: steps 2..N (the first step pays one-off costs; see time_to_first_step_s)
        "tokens_per_s": (tokn - tok1) / (tn - t1),
        "train_s": tn - clock.train_start,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "last_train_loss": clock.losses[-1] if clock.losses else None,
        "threads": torch.get_num_threads(),
        **info,
    }
    # time.perf_counter() has no fixed epoch: convert the first step's end to wall time.
    result["time_to_first_step_s"] = (time.time() - (time.perf_counter() - t1)) - born
    n = json.loads((workdir / "workload.json").read_text())["parameters"]
    result["achieved_flops"] = result["tokens_per_s"] * 4 * n  # LoRA: ~4N FLOPs per token
    if torch.cuda.is_available():
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["peak_gpu_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
        result["mfu"] = result["tokens_per_s"] * 4 * n / H100_BF16_FLOPS  # LoRA: ~4N FLOPs/token
    (out / "result.json").write_text(json.dumps(result, indent=1))


def evaluate(workdir: Path, outs: list[Path]) -> None:
    """Eval loss of each saved adapter (and of the untrained base), computed identically."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.data.pipeline import prepare_data
    from peftkit.objectives.causal_lm import CausalLM
    from peftkit.recipe.schema import DataSpec
    from peftkit.training.evaluation import held_out_loss

    tokenizer = AutoTokenizer.from_pretrained(str(workdir / "model"))
    spec = DataSpec(train=[str(workdir / "eval.jsonl")], max_length=runners.HP["max_length"])
    rows = prepare_data(spec, tokenizer, 0).train
    device = "cuda" if torch.cuda.is_available() else "cpu"
    objective = CausalLM.padded(tokenizer.pad_token_id)

    def loss_of(model) -> float:
        return held_out_loss(model, rows, objective, batch_size=8, device=device)

    base = AutoModelForCausalLM.from_pretrained(str(workdir / "model"), dtype=torch.float32).to(
        device
    )
    losses = {"base": loss_of(base.eval())}
    for out in outs:
        model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
        losses[out.name] = loss_of(model)
        base = model.unload()
    (workdir / "eval_losses.json").write_text(json.dumps(losses, indent=1))


def table(
    results: list[dict], eval_losses: dict[str, float], baseline: dict, peak: float | None
) -> str:
    gpu = "peak_gpu_mib" in baseline
    mem_key = "peak_gpu_mib" if gpu else "peak_rss_mib"
    head = (
        "| config | precision | micro-batch | real tokens/s | × baseline | peak "
        + ("GPU" if gpu else "RSS")
        + " MiB | × baseline | first step s | eval loss | Δ vs baseline |"
        + (" MFU |" if gpu else " GFLOP/s (4N/token) | % of GEMM peak |")
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    base_eval = eval_losses[baseline["config"]]
    for r in results:
        ev = eval_losses[r["config"]]
        lines.append(
            f"| {r['config']} | {r['precision']} | {r.get('micro_batch', '4 rows')} "
            f"| {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / baseline['tokens_per_s']:.2f} "
            f"| {r[mem_key]:,.0f} | {r[mem_key] / baseline[mem_key]:.2f} "
            f"| {r['time_to_first_step_s']:.1f} | {ev:.4f} | {(ev - base_eval) / base_eval:+.2%} |"
            + (
                f" {r['mfu']:.1%} |"
                if gpu
                else f" {r['achieved_flops'] / 1e9:.1f} | {r['achieved_flops'] / peak:.0%} |"
            )
        )
    lines.append(f"\nUntrained base eval loss: {eval_losses['base']:.4f}")
    if peak:
        lines.append(
            f"fp32 GEMM peak (2048^3 matmul, {_threads()} threads): {peak / 1e9:.1f} GFLOP/s"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--configs", default=",".join(runners.CONFIGS))
    p.add_argument("--size", default="50m", choices=sorted(workload.SIZES))
    p.add_argument("--model", help="real weights: any recipe model name, e.g. builtin:smollm2-135m")
    p.add_argument("--micro-batch", type=int, default=runners.HP["micro_batch_size"])
    p.add_argument("--grad-accum", type=int, default=runners.HP["grad_accum"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--train-rows", type=int, default=800)
    p.add_argument("--eval-rows", type=int, default=64)
    p.add_argument("--workdir", type=Path, default=HERE / "results" / "work")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--evaluate", nargs="*", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    runners.HP.update(micro_batch_size=a.micro_batch, grad_accum=a.grad_accum)
    wd = a.workdir / (a.model.replace(":", "-").replace("/", "-") if a.model else a.size)
    if a.child:
        return child(a.child, wd, wd / a.child, a.steps)
    if a.evaluate is not None:
        return evaluate(wd, a.evaluate)

    if a.model:
        info = workload.build_real(wd, a.model, a.train_rows, a.eval_rows)
        (wd / "workload.json").write_text(json.dumps(info))
    else:
        info = workload.build(wd, a.size, a.train_rows, a.eval_rows)
    names = a.configs.split(",")
    unknown = set(names) - set(runners.CONFIGS)
    if unknown:
        p.error(f"unknown configs {sorted(unknown)}; choose from {', '.join(runners.CONFIGS)}")
    peak = None if torch_cuda() else gemm_peak_flops()
    print(f"workload: {a.model or a.size} ({info['parameters'] / 1e6:.1f}M parameters, vocab {info['vocab']}), "
          f"{a.steps} steps, LoRA r={runners.HP['r']} all-linear, global batch "
          f"{runners.HP['micro_batch_size'] * runners.HP['grad_accum']} rows")  # fmt: skip
    results = []
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    for name in names:
        out = wd / name
        subprocess.run(["rm", "-rf", str(out)], check=True)
        out.mkdir(parents=True)
        started = time.time()
        cmd = [sys.executable, __file__, "--child", name, "--steps", str(a.steps),
               "--workdir", str(a.workdir), *_workload_args(a)]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        (out / "log.txt").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            print(f"{name}: FAILED (see {out / 'log.txt'})\n{proc.stderr[-2000:]}")
            continue
        r = json.loads((out / "result.json").read_text())
        results.append(r)
        print(f"{name}: {r['tokens_per_s']:,.0f} tok/s, peak RSS {r['peak_rss_mib']:,.0f} MiB "
              f"({time.time() - started:.0f} s)")  # fmt: skip
    outs = [wd / r["config"] for r in results]
    subprocess.run([sys.executable, __file__, "--evaluate", *map(str, outs),
                    "--workdir", str(a.workdir), *_workload_args(a)], env=env, check=True)  # fmt: skip
    eval_losses = json.loads((wd / "eval_losses.json").read_text())
    baseline = next((r for r in results if r["config"] == runners.BASELINE), results[0])
    md = table(results, eval_losses, baseline, peak)
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:])
    report = {"command": command.strip(), "workload": info, "hyperparameters": runners.HP,
              "cpu": _cpu_name(), "gemm_peak_flops": peak,
              "steps": a.steps, "results": results, "eval_losses": eval_losses}  # fmt: skip
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "latest.json").write_text(json.dumps(report, indent=1))
    (HERE / "results" / "latest.md").write_text(f"`{command.strip()}`\n\n{md}\n")
    print(md)


def _workload_args(a: argparse.Namespace) -> list[str]:
    args = [
        "--size",
        a.size,
        "--micro-batch",
        str(a.micro_batch),
        "--grad-accum",
        str(a.grad_accum),
    ]
    return args + (["--model", a.model] if a.model else [])


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor()


if __name__ == "__main__":
    main()
