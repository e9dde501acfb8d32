"""Adapters per task: switch latency vs adapters loaded, and mixed-adapter batches vs switching.

    .venv/bin/python benchmarks/adapters.py                  # ~3 minutes on 2 CPU cores
    .venv/bin/python benchmarks/adapters.py --layers 32      # an 8B-like depth (more LoRA layers)
    .venv/bin/python benchmarks/adapters.py --model builtin:smollm2-135m   # real weights (30 layers)
    .venv/bin/python benchmarks/adapters.py --model builtin:smollm2-135m --quantize 4  # QLoRA base

Model: a Llama-architecture config with random weights, `--layers` deep (16 = Llama-3.2-1B's
depth, so as many LoRA layers: 16 x 7 = 112) but narrow (hidden 256), with random LoRA adapters
(r 16, all linear layers, B not zero) saved with peftkit manifests and loaded through `AdapterSet`.
`--quantize 4` loads the base in NF4 (bitsandbytes), as QLoRA adapters are served.

1. Switch latency: median time to make another loaded adapter active, with 1, 2, 4, ... 32
   adapters loaded — peftkit's `AdapterSet.activate` vs peft's own `PeftModel.set_adapter`.
2. Throughput: `--requests` chat requests spread over `--serving-adapters` adapters, each prompt
   `--prompt-tokens` long, `--new-tokens` generated greedily (stop tokens off): one request at a
   time switching adapter per request, grouped by adapter (one batch per adapter), and one
   mixed-adapter batch per `--max-batch` requests (peft's `adapter_names` path).
Results: benchmarks/results/adapters.{md,json} (not committed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))


def build_base(out: Path, layers: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from workload import build_tokenizer

    build_tokenizer(out)
    config = LlamaConfig(
        vocab_size=32008,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(out))


def build_adapters(base_dir: Path, out: Path, n: int) -> list[Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.models.manifest import BaseIdentity, write_manifest

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    paths = []
    for i in range(n):
        torch.manual_seed(100 + i)
        base = AutoModelForCausalLM.from_pretrained(str(base_dir))
        identity = BaseIdentity.of(str(base_dir), base, tokenizer)
        config = LoraConfig(
            r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False
        )
        model = get_peft_model(base, config)
        path = out / f"task{i:02d}"
        model.save_pretrained(str(path))
        tokenizer.save_pretrained(str(path))
        write_manifest(
            path, identity, method="lora", chat_template=tokenizer.chat_template,
            stop_tokens=[], recipe=None,
        )  # fmt: skip
        paths.append(path)
    return paths


def _adapter_set(base_dir: Path, bits: int | None):
    from peftkit.adapters.adapter_set import AdapterSet

    quantization = {"bits": bits} if bits else None
    return AdapterSet(str(base_dir), dtype="float32", quantization=quantization)


def switch_latency(
    base_dir: Path, adapters: list[Path], counts: list[int], repeats: int, bits: int | None
):
    aset = _adapter_set(base_dir, bits)
    rows = []
    for i, path in enumerate(adapters[: max(counts)]):
        aset.add(f"task{i:02d}", path)
        n = i + 1
        if n not in counts:
            continue
        names = aset.names
        timings = {"peftkit": [], "peft": []}
        for r in range(repeats):
            target = names[r % n]
            t = time.perf_counter()
            aset.activate(target)
            timings["peftkit"].append(time.perf_counter() - t)
        for r in range(max(repeats // 10, 5)):  # peft's path is slow: fewer repeats
            target = names[r % n]
            t = time.perf_counter()
            aset.model.set_adapter(target)
            timings["peft"].append(time.perf_counter() - t)
        aset.activate(names[0])  # back to peftkit's bookkeeping
        rows.append(
            {
                "adapters_loaded": n,
                "peftkit_ms": statistics.median(timings["peftkit"]) * 1e3,
                "peft_set_adapter_ms": statistics.median(timings["peft"]) * 1e3,
            }
        )
        print(f"  {n:>2} adapters: activate {rows[-1]['peftkit_ms']:.3f} ms, "
              f"peft set_adapter {rows[-1]['peft_set_adapter_ms']:.3f} ms", flush=True)  # fmt: skip
    return rows


def throughput(base_dir: Path, adapters: list[Path], args) -> list[dict]:
    from peftkit.adapters.generation import Row, SamplingOptions

    aset = _adapter_set(base_dir, args.quantize)
    for i, path in enumerate(adapters[: args.serving_adapters]):
        aset.add(f"task{i:02d}", path)
    gen = torch.Generator().manual_seed(0)
    options = SamplingOptions(max_new_tokens=args.new_tokens)
    requests = [
        Row(
            torch.randint(10, 32000, (args.prompt_tokens,), generator=gen).tolist(),
            aset.names[i % len(aset.names)],
            options,
            set(),  # no stop tokens: every request generates exactly new_tokens
        )
        for i in range(args.requests)
    ]
    tokens = args.requests * args.new_tokens
    modes = {
        "switch per request (batch 1)": [[r] for r in requests],
        "grouped by adapter (one batch each)": [
            [r for r in requests if r.adapter == name] for name in aset.names
        ],
        "mixed-adapter batches": [
            requests[i : i + args.max_batch] for i in range(0, len(requests), args.max_batch)
        ],
    }
    aset.generate_rows(requests[:2])  # warm-up
    results = []
    for mode, batches in modes.items():
        t = time.perf_counter()
        for batch in batches:
            out = aset.generate_rows(batch)
            assert all(len(c.token_ids) == args.new_tokens for c in out)
        seconds = time.perf_counter() - t
        results.append({"mode": mode, "batches": len(batches), "seconds": seconds,
                        "tokens_per_s": tokens / seconds})  # fmt: skip
        print(f"  {mode}: {tokens / seconds:,.0f} tok/s ({seconds:.1f} s)", flush=True)
    base = results[0]["tokens_per_s"]
    for r in results:
        r["x_switching"] = r["tokens_per_s"] / base
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--model", help="a real base instead (any recipe model name)")
    parser.add_argument("--max-adapters", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--serving-adapters", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--quantize", type=int, choices=(4, 8), help="load the base in 4/8 bit")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    counts = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= args.max_adapters]
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            from peftkit.models.load import resolve_source

            base_dir = Path(resolve_source(args.model))
            args.layers = json.loads((base_dir / "config.json").read_text())["num_hidden_layers"]
        else:
            base_dir = Path(tmp) / "base"
            build_base(base_dir, args.layers)
        print(
            f"building {args.max_adapters} random LoRA adapters (r 16, all linear) ...", flush=True
        )
        adapters = build_adapters(base_dir, Path(tmp), args.max_adapters)
        print("switch latency (median):", flush=True)
        switching = switch_latency(base_dir, adapters, counts, args.repeats, args.quantize)
        print(f"throughput ({args.requests} requests over {args.serving_adapters} adapters):")
        serving = throughput(base_dir, adapters, args)
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    stem = "adapters" + (f"-{args.quantize}bit" if args.quantize else "")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    report = {
        "settings": vars(args),
        "device": device,
        "switching": switching,
        "throughput": serving,
    }
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"# Adapters per task ({device}, {args.model or 'random weights'}, {args.layers} layers"
        + (f", {args.quantize}-bit base)" if args.quantize else ")"),
        "",
        "| adapters loaded | peftkit activate (ms) | peft set_adapter (ms) |",
        "|---|---|---|",
    ]
    lines += [
        f"| {r['adapters_loaded']} | {r['peftkit_ms']:.3f} | {r['peft_set_adapter_ms']:.3f} |"
        for r in switching
    ]
    lines += [
        "",
        f"{args.requests} requests over {args.serving_adapters} adapters, "
        f"{args.prompt_tokens} prompt + {args.new_tokens} new tokens each:",
        "",
        "| mode | batches | tokens/s | × switching |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['mode']} | {r['batches']} | {r['tokens_per_s']:,.0f} | {r['x_switching']:.2f} |"
              for r in serving]  # fmt: skip
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
