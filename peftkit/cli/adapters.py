"""The adapter verbs of the command line (generate, chat, serve, combine): arguments in, api out,
results printed."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from peftkit.cli.flags import add_flags, in_unit, model_params, signature_params
from peftkit.errors import ServingError

SAMPLING = ("max_new_tokens", "temperature", "top_p", "top_k")


def _loading_arguments(p: argparse.ArgumentParser, adapters: bool = True) -> None:
    from peftkit import api

    if adapters:
        p.add_argument(
            "--adapter",
            action="append",
            default=[],
            metavar="NAME=PATH",
            help="adapter to load (run dir or adapter folder); repeat for several",
        )
    p.add_argument("--base", help="base model (default: the one the adapters were trained on)")
    dtype, quantization = signature_params(api.load_adapters, ["dtype", "quantization"])
    add_flags(p, [dtype, replace(quantization, name="quantize")])
    p.add_argument(
        "--allow-base-mismatch",
        action="store_true",
        help="load adapters trained on another base model anyway (their outputs may be garbage)",
    )
    p.add_argument(
        "--no-default-system",
        dest="default_system",
        action="store_false",
        help="render chat prompts without a system turn as given (default: each adapter's "
        "training system prompt, data.system_prompt, is their system turn)",
    )


def _sampling_arguments(p: argparse.ArgumentParser) -> None:
    from peftkit.adapters.generation import SamplingOptions

    add_flags(p, model_params(SamplingOptions, SAMPLING))
    p.add_argument("--seed", type=int, help="sampling seed")


def generate_arguments(p: argparse.ArgumentParser) -> None:
    _loading_arguments(p)
    _sampling_arguments(p)
    p.add_argument("--use", help="adapter to answer with, 'base', or a comma list (each one)")
    p.add_argument("--prompt", action="append", default=[], help="repeat for several")
    p.add_argument(
        "--prompts", help='file: one prompt per line (.txt), or .jsonl with "prompt" or "messages"'
    )
    p.add_argument(
        "--system", help="system prompt (chat prompts; default: the adapter's training one)"
    )
    p.add_argument(
        "--raw", action="store_true", help="continue prompts as plain text (no chat template)"
    )
    p.add_argument("--json", action="store_true", help="print JSON lines")


def chat_arguments(p: argparse.ArgumentParser) -> None:
    _loading_arguments(p)
    _sampling_arguments(p)
    p.add_argument("--use", help="adapter to start with ('base' = none)")
    p.add_argument("--system", help="system prompt (default: the adapter's training one)")
    p.add_argument(
        "--tools",
        metavar="FILE.json",
        help="OpenAI tool definitions the model may call (a JSON list); you type each result",
    )


SERVE_LIMITS = ("max_queue", "max_batch", "max_prompt_tokens", "max_new_tokens", "max_body_bytes")
SERVE_SECURITY = (
    "api_key",
    "api_key_file",
    "insecure_no_auth",
    "docs",
    "special_tokens_in_content",
    "allowed_host",
)
MS = 1000  # --batch-wait-ms is ServeLimits.batch_wait_s in milliseconds


def serve_arguments(p: argparse.ArgumentParser) -> None:
    from peftkit import api
    from peftkit.serving.app import ServeLimits

    p.add_argument(
        "--adapters-dir",
        required=True,
        help=signature_params(api.serve, ["adapters_dir"])[0].help,
    )
    _loading_arguments(p, adapters=False)
    add_flags(p, signature_params(api.serve, ["host", "port", "served_base_name"]))
    add_flags(p, signature_params(api.serve, SERVE_SECURITY[:-1]))
    (allowed,) = signature_params(api.serve, ["allowed_host"])
    p.add_argument("--allowed-host", action="append", default=[], help=allowed.help)
    add_flags(p, model_params(ServeLimits, SERVE_LIMITS))
    (wait,) = model_params(ServeLimits, ["batch_wait_s"])
    add_flags(p, [in_unit(wait, "batch_wait_ms", MS, "milliseconds")])


def combine_arguments(p: argparse.ArgumentParser) -> None:
    from peftkit.adapters.combine import combine

    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH")
    p.add_argument("--out", required=True)
    add_flags(p, signature_params(combine, ["how"]))
    p.add_argument("--weights", type=_weights, help="comma list, one per adapter (default: equal)")
    add_flags(p, signature_params(combine, ["density", "svd_rank", "base"]))
    p.add_argument(
        "--no-eval",
        dest="evaluate",
        action="store_false",
        help="skip the evaluation table",
    )
    add_flags(p, signature_params(combine, ["overwrite"]))


def _weights(text: str) -> list[float]:
    """`0.7,0.3` as numbers (an argparse type: a bad item is named, exit 2)."""
    items = [w.strip() for w in text.split(",")]
    try:
        values = [float(w) for w in items]
    except ValueError:
        bad = next(w for w in items if not _is_number(w))
        raise argparse.ArgumentTypeError(
            f"{bad!r} is not a number (give one number per adapter, e.g. 0.7,0.3)"
        ) from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every weight must be a finite number")
    return values


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _named(items: list[str]) -> dict[str, str]:
    """NAME=PATH items (or PATH alone: named after its folder) as {name: path}."""
    from peftkit.adapters.adapter_set import default_name

    named: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = default_name(item), item
        if name in named:
            raise ServingError(f"--adapter: the name {name!r} is given twice")
        named[name] = path
    return named


def _load(args: argparse.Namespace):
    from peftkit import api

    aset = api.load_adapters(
        _named(args.adapter),
        base=args.base,
        dtype=args.dtype,
        quantization=args.quantize,
        allow_mismatch=args.allow_base_mismatch,
        default_system=args.default_system,
    )
    for warning in aset.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return aset


def _options(args: argparse.Namespace):
    from peftkit.adapters.generation import SamplingOptions

    return SamplingOptions(**{k: getattr(args, k) for k in SAMPLING})


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
    from peftkit.adapters.chat import HELP, ChatSession
    from peftkit.data.tool_calls import read_tools

    tools = read_tools(args.tools) if args.tools else None  # before the model loads
    aset = _load(args)
    start = _default_adapter(aset, args.use)[0]
    aset.activate(start)
    adapter = None if start == "base" else start
    session = ChatSession(aset, adapter, _options(args), args.system, tools)

    def write(text: str) -> None:
        print(text, end="", flush=True)

    write(f"{HELP}\n")
    while True:  # user turns until /quit or end of input; each answer streamed as generated
        try:
            line = input(session.prompt).strip()
        except EOFError:
            write("\n")
            return 0
        if not line:
            continue
        if line.startswith("/"):
            reply = session.command(line)
            if reply is None:
                return 0
            write(f"{reply}\n")
            continue
        try:
            session.answer(line, on_text=write)
        except ServingError as e:  # e.g. --tools with an adapter whose template has none
            write(f"error: {e}\n")
            continue
        write("\n")
        while session.calls:  # each call's result, typed by the user, then the answer goes on
            for call in list(session.calls):
                name, arguments = call["function"]["name"], call["function"]["arguments"]
                write(f"tool call: {name}({arguments})\n")
                try:
                    result = input(f"result of {name} > ")
                except EOFError:
                    write("\n")
                    return 0
                session.add_tool_result(call["id"], result)
            session.resume(on_text=write)
            write("\n")


def serve(args: argparse.Namespace) -> int:
    from peftkit import api
    from peftkit.serving.app import ServeLimits

    limits = ServeLimits(
        **{k: getattr(args, k) for k in SERVE_LIMITS}, batch_wait_s=args.batch_wait_ms / MS
    )
    api.serve(
        args.adapters_dir,
        base=args.base,
        host=args.host,
        port=args.port,
        served_base_name=args.served_base_name,
        dtype=args.dtype,
        quantization=args.quantize,
        allow_mismatch=args.allow_base_mismatch,
        limits=limits,
        **{k: getattr(args, k) for k in SERVE_SECURITY},
        default_system=args.default_system,
    )
    return 0


def combine(args: argparse.Namespace) -> int:
    from peftkit import api

    result = api.combine(
        _named(args.adapter),
        args.out,
        how=args.how,
        weights=args.weights,
        density=args.density,
        svd_rank=args.svd_rank,
        base=args.base,
        evaluate=args.evaluate,
        overwrite=args.overwrite,
    )
    print(f"wrote {result.out} ({args.how} of {', '.join(_named(args.adapter))})")
    if args.evaluate:
        print("eval loss per supervised token on each source's eval data:")
        print(result.table())
    return 0
