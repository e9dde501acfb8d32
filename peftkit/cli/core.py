"""The recipe and run verbs of the command line (train, validate, prepare, plan, export, report,
sweep): arguments in, api out, results printed."""

from __future__ import annotations

import argparse
import sys

from peftkit.cli.flags import add_flags, model_params, signature_params


def recipe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 adapter.r=8")


def train_arguments(p: argparse.ArgumentParser) -> None:
    from peftkit import api

    recipe_arguments(p)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in output.dir from its last checkpoint",
    )
    add_flags(p, signature_params(api.train, ["trust_remote_code"]))


def train(args: argparse.Namespace) -> int:
    from peftkit import api
    from peftkit.launch import end_process_group

    api.train(
        args.recipe, args.overrides, resume=args.resume, trust_remote_code=args.trust_remote_code
    )
    end_process_group()
    return 0


def validate(args: argparse.Namespace) -> int:
    from peftkit import api

    recipe = api.validate(args.recipe, args.overrides)
    print(api.resolved_yaml(recipe), end="")
    for note in api.environment_notes(recipe):
        print(f"# note: {note}", file=sys.stderr)
    print(f"# ok: {args.recipe} is valid", file=sys.stderr)
    return 0


PRUNE_OPTIONS = ("max_gb", "unused_days", "dry_run")


def prepare_arguments(p: argparse.ArgumentParser) -> None:
    from peftkit import api

    p.add_argument("recipe", nargs="?", help="recipe YAML file (optional with --prune)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.max_length=2048")
    p.add_argument(
        "--prune",
        action="store_true",
        help="then remove data cache entries unused for --unused-days days, and the least "
        "recently used ones beyond --max-gb (builds in progress and entries used within the "
        "last hour are kept)",
    )
    add_flags(
        p, signature_params(api.prune_data_cache, PRUNE_OPTIONS), help_suffix=" (with --prune)"
    )


def prepare(args: argparse.Namespace) -> int:
    from peftkit import api

    if args.recipe is None and not args.prune:
        print("peftkit prepare: error: give a recipe, or --prune", file=sys.stderr)
        return 2
    if args.recipe is not None:
        data = api.prepare(args.recipe, args.overrides)
        for audit in data.audits:
            print("\n".join(audit.lines()))
        if data.cache_dir is None:
            print(
                "encoded and checked (this objective's data is not cached yet: training "
                "encodes it again)"
            )
        else:
            print(f"encoded data: {data.cache_dir}")
    if args.prune:
        report = api.prune_data_cache(**{k: getattr(args, k) for k in PRUNE_OPTIONS})
        print("\n".join(report.lines()))
    return 0


def plan_arguments(p: argparse.ArgumentParser) -> None:
    from peftkit import api

    recipe_arguments(p)
    add_flags(p, signature_params(api.plan, ("gpu_memory", "launch")))


def plan(args: argparse.Namespace) -> int:
    from peftkit import api
    from peftkit.planner.plan import format_plan

    result = api.plan(args.recipe, args.overrides, gpu_memory=args.gpu_memory, launch=args.launch)
    print(format_plan(result))
    return 4 if result.fits is False else 0


# export's flags: the recipe's export section (given: overrides it) and export's own options
EXPORT_RECIPE_KEYS = ("dtype", "max_shard_size", "merge_base", "format", "quant")
EXPORT_OPTIONS = ("allow_drift", "adapter_only", "target", "overwrite", "trust_remote_code")


def _export_params() -> list:
    """The flags of EXPORT_RECIPE_KEYS, from the registered exporters' `export:` sections: each key
    from the first section that has it (`--format` choosing among them all)."""
    from typing import Literal

    from peftkit.cli.flags import Param
    from peftkit.exporters.registry import (
        DEFAULT_FORMAT,
        format_names,
        section_classes,
        section_for,
    )

    params = []
    for key in EXPORT_RECIPE_KEYS:
        if key == "format":
            info = section_for(DEFAULT_FORMAT).model_fields["format"]
            choices = Literal[tuple(format_names())]  # type: ignore[valid-type]
            params.append(Param("format", choices, DEFAULT_FORMAT, info.description))
            continue
        owners = [cls for cls in section_classes() if key in cls.model_fields]
        (param,) = model_params(owners[0], [key])
        if len(owners) < len(section_classes()):
            formats = " / ".join(
                cls.model_fields["format"].annotation.__args__[0] for cls in owners
            )
            param.help = f"{param.help or ''} (format {formats})".strip()
        params.append(param)
    return params


def export_arguments(p: argparse.ArgumentParser) -> None:
    from peftkit.export.run import export

    p.add_argument(
        "run", help="run directory, or a result folder inside one (RUN/adapter, RUN/best)"
    )
    p.add_argument(
        "--out", required=True, help="folder to write (must not exist unless --overwrite)"
    )
    add_flags(
        p,
        _export_params(),
        optional=True,
        help_suffix=" (default: the recipe's export section)",
    )
    add_flags(p, signature_params(export, EXPORT_OPTIONS))


def export(args: argparse.Namespace) -> int:
    from peftkit import api

    options = {k: getattr(args, k) for k in (*EXPORT_RECIPE_KEYS, *EXPORT_OPTIONS)}
    api.export(args.run, args.out, **options)
    return 0


def report_arguments(p: argparse.ArgumentParser) -> None:
    from peftkit import api

    p.add_argument("runs", nargs="+", help="run directories, or folders of them (a sweep)")
    add_flags(p, signature_params(api.report, ("out",)))


def report(args: argparse.Namespace) -> int:
    from peftkit import api

    print(f"wrote {api.report(args.runs, args.out)}")
    return 0


def sweep_arguments(p: argparse.ArgumentParser) -> None:
    from peftkit import api

    recipe, overrides = signature_params(api.sweep, ("recipe", "overrides"))
    p.add_argument("recipe", help=recipe.help)
    p.add_argument("overrides", nargs="*", help=overrides.help)
    add_flags(p, signature_params(api.sweep, ("space", "trials", "out", "storage", "overwrite")))


def sweep(args: argparse.Namespace) -> int:
    from peftkit import api

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
    return 0
