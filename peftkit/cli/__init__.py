"""`peftkit` command line: a table from verb to (arguments, function); it parses and prints only.

Each verb's flags are declared by its `arguments` function, mostly derived from the library's
signatures and option classes (`peftkit.cli.flags`), and its `run` function calls `peftkit.api`
and prints. Adding a verb is one `VERBS` entry. A verb's arguments (and the library they come
from) are only loaded when that verb runs, so `peftkit --help` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass

from peftkit.errors import FidelityGateFailed, PeftkitError


@dataclass(frozen=True)
class Verb:
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _verbs() -> dict[str, Verb]:
    from peftkit.cli import adapters, core

    return {
        "train": Verb("fine-tune as a recipe says", core.train_arguments, core.train),
        "validate": Verb(
            "check a recipe and print it with every default resolved",
            core.recipe_arguments,
            core.validate,
        ),
        "prepare": Verb(
            "encode a recipe's data into the data cache ahead of training (--prune: bound it)",
            core.prepare_arguments,
            core.prepare,
        ),
        "plan": Verb(
            "predict a recipe's peak training memory and whether it fits",
            core.plan_arguments,
            core.plan,
        ),
        "export": Verb(
            "merge a run's result into deployable weights and verify them",
            core.export_arguments,
            core.export,
        ),
        "report": Verb(
            "write a run's report.html, or one page comparing runs (or a sweep's)",
            core.report_arguments,
            core.report,
        ),
        "sweep": Verb(
            "search a recipe's hyperparameters with Optuna, pruning on eval loss",
            core.sweep_arguments,
            core.sweep,
        ),
        "generate": Verb(
            "answer prompts with a base model and its adapters",
            adapters.generate_arguments,
            adapters.generate,
        ),
        "chat": Verb(
            "talk to a base model and its adapters, switching with /use",
            adapters.chat_arguments,
            adapters.chat,
        ),
        "serve": Verb(
            "OpenAI-compatible HTTP API over a base and its adapters",
            adapters.serve_arguments,
            adapters.serve,
        ),
        "combine": Verb(
            "make one adapter from several and evaluate it on each one's task",
            adapters.combine_arguments,
            adapters.combine,
        ),
    }


VERBS = _verbs()


def _parser(verbs: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The parser, with the arguments of `verbs` (default: all); the others show their help line."""
    parser = argparse.ArgumentParser(
        prog="peftkit", description="Fine-tune causal LMs from a YAML recipe."
    )
    sub = parser.add_subparsers(dest="verb", required=True)
    for name, spec in VERBS.items():
        p = sub.add_parser(name, help=spec.help)
        if verbs is None or name in verbs:
            spec.arguments(p)
    return parser


class _Console(logging.Handler):
    """The library's log on the terminal: information to stdout (above any progress bar), warnings
    and errors to stderr; with `progress`, everything to stderr. The streams are looked up per
    line, so redirection is honoured (main() may run many times in one process)."""

    def __init__(self, progress: bool = False) -> None:
        super().__init__()
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)
        if self.progress or record.levelno >= logging.WARNING:
            print(text, file=sys.stderr, flush=True)
        else:
            from tqdm import tqdm

            tqdm.write(text, file=sys.stdout)
            sys.stdout.flush()  # a server's 'listening on' line reaches a pipe at once


def _show_library_log() -> None:
    """The library logs its progress and results (logger `peftkit`); the CLI shows them. Long
    one-off work while loading a model (e.g. materialising a GGUF base) or encoding data into
    the cache goes to stderr."""
    logger = logging.getLogger("peftkit")
    if not any(isinstance(h, _Console) for h in logger.handlers):
        handler = _Console()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    for name in ("peftkit.models", "peftkit.data"):
        progress = logging.getLogger(name)
        if not progress.handlers:
            handler = _Console(progress=True)
            handler.setFormatter(logging.Formatter("%(message)s"))
            progress.addHandler(handler)
            progress.propagate = False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # only the verb that runs loads its arguments (and the library they are derived from)
    args = _parser(argv[:1] if argv and argv[0] in VERBS else ()).parse_args(argv)
    _show_library_log()
    try:
        return VERBS[args.verb].run(args)
    except FidelityGateFailed as e:
        print(f"peftkit {args.verb}: fidelity gate failed: {e}", file=sys.stderr)
        return 3
    except PeftkitError as e:
        print(f"peftkit {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
