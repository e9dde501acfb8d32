"""Data preparation at scale: the in-memory encoder vs the Arrow data cache, each in its own process.

    .venv/bin/python benchmarks/prepare.py                       # 50,000 multi-turn chats
    .venv/bin/python benchmarks/prepare.py --rows 500 --out /tmp/prep-smoke   # a quick check

Builds a deterministic set of multi-turn chats (system prompt, 1-4 user/assistant turns of
varying length), then runs, each in a fresh Python process:

- `memory`: `data.cache: false`, the in-memory path: one process, every row held as numpy arrays;
- `cold`: `peftkit prepare` into an empty cache ($PEFTKIT_CACHE under --out): rows streamed into
  Arrow, encoded by `data.num_proc` processes (default: one per 2,000 rows, up to the CPUs);
- `cached`: the user's command itself, `peftkit prepare RECIPE` (`peftkit.cli.main`, what the
  console script runs), into the cache the cold run filled: found from the tokenizer's files
  and memory-mapped, without loading the tokenizer.

For each: wall time of the whole process (interpreter start, imports, tokenizer, data), the time
of the data preparation alone (for `cached`: the whole command, its imports included), and peak
RSS (the process itself; encoding workers separately). Writes `results.json` and a markdown
table to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = (
    "the model reads a question and writes an answer that is short and exact with numbers like "
    "two three seven and names such as Ada Paris Vienna Lisbon teapot order city day week"
).split()


def make_chats(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def words(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": "You are a helpful assistant."}]
        for _ in range(rng.randint(1, 4)):
            messages.append({"role": "user", "content": words(5, 40)})
            messages.append({"role": "assistant", "content": words(10, 80)})
        rows.append({"messages": messages})
    return rows


def write_inputs(out: Path, rows: int, model: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    data = out / "chats.jsonl"
    if not data.is_file() or sum(1 for _ in data.open()) != rows:
        tmp = data.with_suffix(".tmp")
        with tmp.open("w") as f:
            for row in make_chats(rows):
                f.write(json.dumps(row) + "\n")
        tmp.replace(data)
    recipe = out / "recipe.yaml"
    recipe.write_text(
        f"name: prepare-bench\nmodel: {{name: {model}}}\nadapter: {{method: lora}}\n"
        f"data: {{train: {data}, max_length: 2048}}\noutput: {{dir: {out / 'run'}}}\n"
    )
    return recipe


def child(mode: str, recipe: str) -> None:
    """One measured preparation; prints a JSON line."""
    if mode == "cached":
        cached_command(recipe)
        return
    t0 = time.perf_counter()
    # The libraries `from peftkit import api` imported when the "before" figure (132.0 s) was
    # taken: its clock started after them, and so does this one (like for like). `imports_s`
    # reports them; the process wall time includes everything.
    import peftkit.training.loop  # noqa: F401  (torch, transformers, datasets, peft, accelerate)
    from peftkit import api
    from peftkit.data.pipeline import prepare_data
    from peftkit.models.load import load_tokenizer

    r = api.validate(recipe, [] if mode != "memory" else ["data.cache=false"])
    t1 = time.perf_counter()
    if mode == "memory":
        tokenizer = load_tokenizer(r.model, needs_eos=True)
        data = prepare_data(r.data, tokenizer, r.train.seed)
    else:
        data = api.prepare(r)
    lengths = [len(data.train[i].input_ids) for i in (0, len(data.train) - 1)]  # rows readable
    t2 = time.perf_counter()
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "mode": mode,
                "rows": len(data.train),
                "tokens": data.audits[0].tokens,
                "prepare_s": round(t2 - t1, 2),
                "imports_s": round(t1 - t0, 2),
                "peak_rss_mib": round(own),
                "worker_peak_rss_mib": round(workers),
                "first_last_lengths": lengths,
                "folder": data.cache_dir,
            }
        )
    )


def cached_command(recipe: str) -> None:
    """`peftkit prepare RECIPE` as a user types it (the console script calls `cli.main`); its
    imports are part of the time. Prints a JSON line."""
    t0 = time.perf_counter()
    from peftkit.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["prepare", recipe])
    t1 = time.perf_counter()
    if code != 0:
        raise SystemExit(f"peftkit prepare failed ({code})")
    folder = Path(out.getvalue().strip().splitlines()[-1].removeprefix("encoded data: "))
    train = json.loads((folder / "meta.json").read_text())["audits"]["train"]
    heavy = ("torch", "transformers", "datasets", "peft", "accelerate")
    print(
        json.dumps(
            {
                "mode": "cached",
                "rows": train["rows_kept"],
                "tokens": train["tokens"],
                "prepare_s": round(t1 - t0, 2),
                "imports_s": None,
                "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                "worker_peak_rss_mib": 0,
                "imported": [m for m in heavy if m in sys.modules],
                "folder": str(folder),
            }
        )
    )


def run(mode: str, recipe: Path, cache: Path) -> dict:
    env = {**os.environ, "PEFTKIT_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(recipe)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "process_wall_s": round(wall, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--model", default="builtin:tiny-llama", help="whose tokenizer encodes")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prepare")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "RECIPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    recipe = write_inputs(args.out, args.rows, args.model)
    cache = args.out / "cache"
    data_cache = cache / "data"
    if data_cache.exists():  # a cold start needs an empty data cache (models stay cached)
        import shutil

        shutil.rmtree(data_cache)
    results = [run(mode, recipe, cache) for mode in ("memory", "cold", "cached")]
    assert len({r["rows"] for r in results}) == 1 and len({r["tokens"] for r in results}) == 1
    cold, cached = results[1], results[2]
    assert cached["folder"] == cold["folder"], "the cached start did not find the cold run's data"
    base = results[0]["prepare_s"]
    lines = [
        f"{args.rows:,} multi-turn chats, tokenizer of {args.model}, {os.cpu_count()} CPUs",
        "",
        "| path | process wall s | prepare s | × memory path | peak RSS MiB | workers' peak RSS MiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['mode']} | {r['process_wall_s']} | {r['prepare_s']} | "
            f"{base / max(r['prepare_s'], 1e-9):.1f} | {r['peak_rss_mib']:,} | "
            f"{r['worker_peak_rss_mib']:,} |"
        )
    lines.append(
        f"\n`cached` is `peftkit prepare RECIPE` (prepare s: the whole command, imports included); "
        f"it imported {', '.join(cached['imported']) or 'none of torch, transformers, datasets'}."
    )
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
