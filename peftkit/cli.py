"""`peftkit` command line: verbs map to functions in `peftkit.api`; this file parses and prints only."""

from __future__ import annotations

import argparse
import sys

from peftkit.errors import PeftkitError


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
    except PeftkitError as e:
        print(f"peftkit {args.verb}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
