"""The adapter verbs of the command line (generate, chat, serve, combine): arguments in, api out."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from peftkit import api
from peftkit.adapters.adapter_set import default_name
from peftkit.errors import ServingError


def _named(items: list[str]) -> dict[str, str]:
    """NAME=PATH items (or PATH alone: named after its folder) as {name: path}."""
    named: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = default_name(item), item
        if name in named:
            raise ServingError(f"--adapter: the name {name!r} is given twice")
        named[name] = path
    return named


def _quantization(value: str) -> str | dict[str, Any] | None:
    return {"auto": "auto", "none": None}.get(
        value, {"bits": int(value)} if value.isdigit() else None
    )


def _load(args: argparse.Namespace):
    aset = api.load_adapters(
        _named(args.adapter),
        base=args.base,
        dtype=args.dtype,
        quantization=_quantization(args.quantize),
        allow_mismatch=args.allow_base_mismatch,
    )
    for warning in aset.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return aset


def _options(args: argparse.Namespace):
    from peftkit.adapters.generation import SamplingOptions

    return SamplingOptions(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
    )


def _default_adapter(aset, use: str | None) -> list[str]:
    if use:
        return [u.strip() for u in use.split(",") if u.strip()]
    if len(aset.names) == 1:
        return aset.names
    if not aset.names:
        return ["base"]
    raise ServingError(
        f"several adapters are loaded ({', '.join(aset.names)}): pick one with --use"
    )


def _read_prompts(args: argparse.Namespace) -> list[Any]:
    prompts: list[Any] = list(args.prompt)
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise ServingError(f"--prompts: no such file: {path}")
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            if path.suffix != ".jsonl":
                prompts.append(line)
                continue
            try:
                row = json.loads(line)
                prompts.append(row["messages"] if "messages" in row else row["prompt"])
            except (ValueError, KeyError, TypeError):
                raise ServingError(
                    f'{path}:{n}: expected a JSON object with "prompt" or "messages"'
                ) from None
    if not prompts:
        raise ServingError("nothing to answer: give --prompt TEXT or --prompts FILE")
    return prompts


def _as_chat(prompt: Any, system: str | None, raw: bool) -> Any:
    if raw or not isinstance(prompt, str):
        return prompt
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]


def generate(args: argparse.Namespace) -> int:
    aset = _load(args)
    use = _default_adapter(aset, args.use)
    prompts = [_as_chat(p, args.system, args.raw) for p in _read_prompts(args)]
    # every (prompt, adapter) pair in one batch: a mixed-adapter batch when several are used
    pairs = [(p, a) for p in prompts for a in use]
    completions = aset.generate(
        [p for p, _ in pairs], adapter=[a for _, a in pairs], options=_options(args), seed=args.seed
    )
    for (prompt, adapter), completion in zip(pairs, completions):
        shown = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        if args.json:
            print(
                json.dumps(
                    {
                        "adapter": adapter,
                        "prompt": shown,
                        "answer": completion.text,
                        "finish_reason": completion.finish_reason,
                    }
                )
            )
        else:
            print(f"[{adapter}] {shown}\n{completion.text}\n")
    return 0


def chat(args: argparse.Namespace) -> int:
    from peftkit.adapters.chat import chat_loop

    aset = _load(args)
    start = _default_adapter(aset, args.use)[0]
    aset.activate(start)
    chat_loop(aset, None if start == "base" else start, _options(args), args.system)
    return 0


def serve(args: argparse.Namespace) -> int:
    from peftkit.serving.app import ServeLimits

    limits = ServeLimits(
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        batch_wait_s=args.batch_wait_ms / 1000,
        max_body_bytes=args.max_body_bytes,
        max_prompt_tokens=args.max_prompt_tokens,
        max_new_tokens=args.max_new_tokens,
    )
    api.serve(
        args.adapters_dir,
        base=args.base,
        host=args.host,
        port=args.port,
        served_base_name=args.served_base_name,
        dtype=args.dtype,
        quantization=_quantization(args.quantize),
        allow_mismatch=args.allow_base_mismatch,
        limits=limits,
    )
    return 0


def combine(args: argparse.Namespace) -> int:
    weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    result = api.combine(
        _named(args.adapter),
        args.out,
        how=args.how,
        weights=weights,
        density=args.density,
        svd_rank=args.svd_rank,
        base=args.base,
        evaluate=not args.no_eval,
        overwrite=args.overwrite,
    )
    print(f"wrote {result.out} ({args.how} of {', '.join(_named(args.adapter))})")
    if not args.no_eval:
        print("eval loss per supervised token on each source's eval data:")
        print(result.table())
    return 0
