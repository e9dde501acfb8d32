"""`peftkit` command line: verbs map to functions in `peftkit.api`; this file parses and prints only."""

from __future__ import annotations

import argparse
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from peftkit import api  # after parsing, so --help is instant

    try:
        if args.verb == "validate":
            recipe = api.validate(args.recipe, args.overrides)
            print(api.resolved_yaml(recipe), end="")
            for note in api.environment_notes(recipe):
                print(f"# note: {note}", file=sys.stderr)
            print(f"# ok: {args.recipe} is valid", file=sys.stderr)
        elif args.verb == "train":
            api.train(args.recipe, args.overrides, resume=args.resume)
        elif args.verb == "plan":
            from peftkit.planner.plan import format_plan

            result = api.plan(args.recipe, args.overrides, gpu_memory=args.gpu_memory)
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
            )
    except FidelityGateFailed as e:
        print(f"peftkit {args.verb}: fidelity gate failed: {e}", file=sys.stderr)
        return 3
    except PeftkitError as e:
        print(f"peftkit {args.verb}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
