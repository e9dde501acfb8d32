"""`peftkit` command line: verbs map to functions in `peftkit.api`; this file parses and prints only."""

from __future__ import annotations

import argparse
import logging
import sys

from peftkit.errors import FidelityGateFailed, PeftkitError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftkit", description="Fine-tune causal LMs from a YAML recipe."
    )
    sub = parser.add_subparsers(dest="verb", required=True)
    train = sub.add_parser("train", help="fine-tune as a recipe says")
    train.add_argument("recipe", help="recipe YAML file")
    train.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 adapter.r=8"
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in output.dir from its last checkpoint",
    )
    prepare = sub.add_parser(
        "prepare", help="encode a recipe's data into the data cache ahead of training"
    )
    prepare.add_argument("recipe")
    prepare.add_argument("overrides", nargs="*")
    validate = sub.add_parser(
        "validate", help="check a recipe and print it with every default resolved"
    )
    validate.add_argument("recipe")
    validate.add_argument("overrides", nargs="*")
    plan = sub.add_parser(
        "plan", help="predict a recipe's peak training memory and whether it fits"
    )
    plan.add_argument("recipe")
    plan.add_argument("overrides", nargs="*")
    plan.add_argument(
        "--gpu-memory",
        help="plan for a GPU with this much memory, e.g. 24GB (default: this machine)",
    )
    plan.add_argument(
        "--launch", help="accelerate config the run will use, e.g. recipes/accelerate/fsdp2.yaml"
    )
    export = sub.add_parser(
        "export", help="merge a run's result into deployable weights and verify them"
    )
    export.add_argument(
        "run", help="run directory, or a result folder inside one (RUN/adapter, RUN/best)"
    )
    export.add_argument(
        "--out", required=True, help="folder to write (must not exist unless --overwrite)"
    )
    export.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        help="weights dtype (recipe export.dtype)",
    )
    export.add_argument("--max-shard-size", help="e.g. 2GB (recipe export.max_shard_size)")
    export.add_argument(
        "--merge-base", choices=["auto", "original", "dequantized"], help="QLoRA merge base"
    )
    export.add_argument(
        "--allow-drift", action="store_true", help="keep the export even if the fidelity gate fails"
    )
    export.add_argument(
        "--adapter-only", action="store_true", help="write the adapter, not merged weights"
    )
    export.add_argument(
        "--target", choices=["vllm"], help="check (and losslessly fix) the adapter for a server"
    )
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    export.add_argument(
        "--format",
        choices=["safetensors", "gguf"],
        help="merged safetensors, or one GGUF file for llama.cpp/Ollama (recipe export.format)",
    )
    export.add_argument(
        "--quant",
        choices=["f32", "f16", "bf16", "q8_0"],
        help="GGUF weight type (recipe export.quant)",
    )
    report = sub.add_parser(
        "report", help="write a run's report.html, or one page comparing runs (or a sweep's)"
    )
    report.add_argument("runs", nargs="+", help="run directories, or folders of them (a sweep)")
    report.add_argument(
        "--out",
        help="the page to write (default: RUN/report.html for one run, report.html inside a "
        "folder of runs, ./runs-compared.html for several)",
    )
    sweep = sub.add_parser(
        "sweep", help="search a recipe's hyperparameters with Optuna, pruning on eval loss"
    )
    sweep.add_argument("recipe", help="recipe YAML file every trial starts from")
    sweep.add_argument(
        "overrides", nargs="*", help="dotted overrides for every trial, e.g. train.max_steps=200"
    )
    sweep.add_argument(
        "--space", required=True, help="search space YAML (params, objective, pruner, seed)"
    )
    sweep.add_argument(
        "--trials",
        type=POSITIVE,
        required=True,
        help="trials in the sweep (with --storage: in total)",
    )
    sweep.add_argument("--out", help="sweep folder (default: the recipe's output.dir + '-sweep')")
    sweep.add_argument(
        "--storage", help="sqlite file that keeps the study: rerun the command to continue it"
    )
    sweep.add_argument(
        "--overwrite", action="store_true", help="replace a sweep folder that holds another sweep"
    )
    _add_adapter_verbs(sub)
    return parser


def _add_loading(p: argparse.ArgumentParser, adapters: bool = True) -> None:
    if adapters:
        p.add_argument(
            "--adapter",
            action="append",
            default=[],
            metavar="NAME=PATH",
            help="adapter to load (run dir or adapter folder); repeat for several",
        )
    p.add_argument("--base", help="base model (default: the one the adapters were trained on)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument(
        "--quantize",
        default="auto",
        choices=["auto", "none", "4", "8"],
        help="load the base in 4/8 bit; auto = as the adapters were trained",
    )
    p.add_argument(
        "--allow-base-mismatch",
        action="store_true",
        help="load adapters trained on another base model anyway (their outputs may be garbage)",
    )


def _number(kind: type, low: float, inclusive: bool = True, high: float | None = None):
    """An argparse type: a `kind` number >= low (> low unless inclusive), <= high if given."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        too_low = value < low if inclusive else value <= low
        if too_low or (high is not None and value > high) or value != value:  # NaN
            bound = f"{'>=' if inclusive else '>'} {low}" + (f" and <= {high}" if high else "")
            raise argparse.ArgumentTypeError(f"must be {bound} (got {text})")
        return value

    return parse


POSITIVE = _number(int, 1)
NON_NEGATIVE = _number(int, 0)


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=POSITIVE, default=128)
    p.add_argument("--temperature", type=_number(float, 0.0), default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=_number(float, 0.0, False, 1.0), default=1.0)
    p.add_argument("--top-k", type=NON_NEGATIVE, default=0)
    p.add_argument("--seed", type=int)


def _add_adapter_verbs(sub) -> None:
    generate = sub.add_parser("generate", help="answer prompts with a base model and its adapters")
    _add_loading(generate)
    _add_sampling(generate)
    generate.add_argument(
        "--use", help="adapter to answer with, 'base', or a comma list (each one)"
    )
    generate.add_argument("--prompt", action="append", default=[], help="repeat for several")
    generate.add_argument(
        "--prompts", help='file: one prompt per line (.txt), or .jsonl with "prompt" or "messages"'
    )
    generate.add_argument("--system", help="system prompt (chat prompts)")
    generate.add_argument(
        "--raw", action="store_true", help="continue prompts as plain text (no chat template)"
    )
    generate.add_argument("--json", action="store_true", help="print JSON lines")
    chat = sub.add_parser("chat", help="talk to a base model and its adapters, switching with /use")
    _add_loading(chat)
    _add_sampling(chat)
    chat.add_argument("--use", help="adapter to start with ('base' = none)")
    chat.add_argument("--system", help="system prompt")
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP API over a base and its adapters")
    serve.add_argument(
        "--adapters-dir",
        required=True,
        help="one sub-folder per adapter (run dir or adapter folder); its name is the model name",
    )
    _add_loading(serve, adapters=False)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument(
        "--port", type=_number(int, 0, True, 65535), default=8000, help="0 = any free port"
    )
    serve.add_argument("--served-base-name", help="model name of the base (default: --base)")
    serve.add_argument("--max-queue", type=POSITIVE, default=64, help="waiting requests before 503")
    serve.add_argument("--max-batch", type=POSITIVE, default=16)
    serve.add_argument("--batch-wait-ms", type=_number(float, 0.0), default=20)
    serve.add_argument("--max-prompt-tokens", type=POSITIVE, default=4096)
    serve.add_argument("--max-new-tokens", type=POSITIVE, default=1024, help="largest max_tokens")
    serve.add_argument("--max-body-bytes", type=POSITIVE, default=1_000_000)
    combine = sub.add_parser(
        "combine", help="make one adapter from several and evaluate it on each one's task"
    )
    combine.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH")
    combine.add_argument("--out", required=True)
    combine.add_argument("--how", default="ties", help="linear, cat, svd, ties, dare_ties, ... ")
    combine.add_argument("--weights", help="comma list, one per adapter (default: equal)")
    combine.add_argument(
        "--density",
        type=_number(float, 0.0, False, 1.0),
        default=0.5,
        help="kept fraction (ties/dare)",
    )
    combine.add_argument("--svd-rank", type=POSITIVE)
    combine.add_argument("--base")
    combine.add_argument("--no-eval", action="store_true", help="skip the evaluation table")
    combine.add_argument("--overwrite", action="store_true")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record comes (main() may run many times in one
    process, each time with its stderr redirected elsewhere)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _show_library_progress() -> None:
    """The library logs long one-off work (e.g. materialising a GGUF base) at INFO; show it."""
    for name in ("peftkit.models", "peftkit.data"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = _StderrHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _show_library_progress()
    from peftkit import api  # after parsing, so --help is instant

    try:
        if args.verb == "validate":
            recipe = api.validate(args.recipe, args.overrides)
            print(api.resolved_yaml(recipe), end="")
            for note in api.environment_notes(recipe):
                print(f"# note: {note}", file=sys.stderr)
            print(f"# ok: {args.recipe} is valid", file=sys.stderr)
        elif args.verb == "prepare":
            data = api.prepare(args.recipe, args.overrides)
            for audit in data.audits:
                print("\n".join(audit.lines()))
            print(f"encoded data: {data.cache_dir}")
        elif args.verb == "train":
            api.train(args.recipe, args.overrides, resume=args.resume)
        elif args.verb == "plan":
            from peftkit.planner.plan import format_plan

            result = api.plan(
                args.recipe, args.overrides, gpu_memory=args.gpu_memory, launch=args.launch
            )
            print(format_plan(result))
            if result.fits is False:
                return 4
        elif args.verb == "export":
            api.export(
                args.run,
                args.out,
                dtype=args.dtype,
                max_shard_size=args.max_shard_size,
                merge_base=args.merge_base,
                allow_drift=args.allow_drift,
                adapter_only=args.adapter_only,
                target=args.target,
                overwrite=args.overwrite,
                format=args.format,
                quant=args.quant,
            )
        elif args.verb == "report":
            print(f"wrote {api.report(args.runs, args.out)}")
        elif args.verb == "sweep":
            result = api.sweep(
                args.recipe,
                args.space,
                args.trials,
                args.overrides,
                out=args.out,
                storage=args.storage,
                overwrite=args.overwrite,
            )
            print(result.table)
            if result.best_recipe is None:
                print(f"peftkit sweep: no trial completed; see {result.results}", file=sys.stderr)
                return 2
            print(
                f"results: {result.results}\nbest recipe: {result.best_recipe} "
                f"(train it: peftkit train {result.best_recipe})"
            )
        elif args.verb in ("generate", "chat", "serve", "combine"):
            from peftkit import cli_adapters

            return getattr(cli_adapters, args.verb)(args)
    except FidelityGateFailed as e:
        print(f"peftkit {args.verb}: fidelity gate failed: {e}", file=sys.stderr)
        return 3
    except PeftkitError as e:
        print(f"peftkit {args.verb}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
