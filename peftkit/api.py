"""The public Python surface: each CLI verb is one function here, usable from a notebook too.

`export` and `combine` are the library functions themselves (their signatures are the options);
`peftkit.cli` derives its flags from these signatures and from the option classes they take.
Each function imports what it needs when called: `import peftkit.api` loads the recipe schema
and the data cache only, so `validate` and `prepare` on a cached start import neither torch nor
transformers nor peft.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import yaml
from annotated_types import Ge, Gt, Le

from peftkit.data.cache import starts
from peftkit.data.cache.prune import PruneReport, prune
from peftkit.data.pipeline import PreparedData
from peftkit.errors import RecipeError
from peftkit.io import RunLayout
from peftkit.launch import Launch
from peftkit.models.spec import Quantize
from peftkit.recipe.launch_rules import check_launch
from peftkit.recipe.load import load_recipe, load_run_recipe
from peftkit.recipe.schema import DType, Recipe
from peftkit.serving import SpecialTokens

if TYPE_CHECKING:
    from peftkit.adapters.adapter_set import AdapterSet
    from peftkit.adapters.combine import combine
    from peftkit.export.run import export
    from peftkit.planner.plan import Plan
    from peftkit.serving.app import ServeLimits
    from peftkit.serving.server import Server
    from peftkit.sweep import SweepResult
    from peftkit.training.callbacks import Callback, CallbackFactory
    from peftkit.training.loop import StepCallback

log = logging.getLogger("peftkit.serve")


def __getattr__(name: str) -> Any:
    """`api.export` and `api.combine`: the library functions, imported on first use."""
    if name == "export":
        from peftkit.export.run import export

        return export
    if name == "combine":
        from peftkit.adapters.combine import combine

        return combine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def validate(recipe: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load and validate a recipe (raises `RecipeError` naming every problem). Loads no model."""
    return load_recipe(recipe, overrides)


def environment_notes(recipe: Recipe) -> list[str]:
    """What this machine makes of the recipe (precision, missing packages, missing files)."""
    import torch

    from peftkit.training import trackers
    from peftkit.training.precision import resolve_precision

    notes = []
    try:
        precision = resolve_precision(recipe.train, torch.cuda.is_available())
        notes.append(f"train.precision resolves to {precision} on this machine")
    except RecipeError as e:
        notes.append(f"cannot train here as written: {e}")
    needs_bnb = recipe.model.quantization is not None or recipe.train.optimizer != "adamw"
    if needs_bnb and importlib.util.find_spec("bitsandbytes") is None:
        notes.append(
            "bitsandbytes is not installed but the recipe needs it (quantization / 8-bit optimizer)"
        )
    for name in recipe.output.report_to:
        if importlib.util.find_spec(trackers.PACKAGES[name]) is None:
            notes.append(
                f"output.report_to: {name} is not installed (pip install 'peftkit[{name}]')"
            )
    for source in [*recipe.data.train, *recipe.data.eval]:
        if (
            source.path.lower().endswith((".jsonl", ".json", ".csv", ".parquet"))
            and not Path(source.path).exists()
        ):
            notes.append(f"data file not found: {source.path}")
    return notes


def resolved_yaml(recipe: Recipe) -> str:
    """The recipe with every default filled in, as YAML."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def train(
    recipe: str | Path | Recipe,
    overrides: list[str] | None = None,
    resume: bool = False,
    on_step: StepCallback | None = None,
    trust_remote_code: bool = False,
    callbacks: Sequence[Callback | CallbackFactory] = (),
) -> dict[str, Any]:
    """Fine-tune as the recipe says; returns the run summary (also written to RUN_DIR/summary.json).

    Args:
        recipe: a recipe file or an already validated `Recipe`.
        overrides: dotted `section.key=value` overrides applied to a recipe file.
        resume: continue the run in the recipe's output.dir from its last checkpoint.
        on_step: called as on_step(step, metrics) after each optimizer step (main and other processes).
        trust_remote_code: with resume, continue a run whose saved recipe has
            model.trust_remote_code (its model's own Python code runs); refused without.
        callbacks: more hooks around the steps and evaluations, run after the recipe's own
            (`peftkit.training.callbacks`): each a `Callback`, or a factory called with the
            run's `RunInputs` once the model is ready.
    """
    from peftkit.report import refresh_run_report
    from peftkit.training.run import train as train_recipe

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    saved = RunLayout(recipe.output.dir).recipe
    if resume and saved.is_file():  # a run from elsewhere runs no code unasked
        load_run_recipe(saved, trust_remote_code)
    return train_recipe(recipe, resume, on_step, refresh_run_report, callbacks)


def prepare(recipe: str | Path | Recipe, overrides: list[str] | None = None) -> PreparedData:
    """Encode a recipe's data into peftkit's data cache ahead of training (as Axolotl's
    `preprocess` does), so that `train` and every `--resume` map it in seconds. Loads the
    tokenizer, no model; a second start finds the data from the tokenizer's files without
    loading it (`peftkit.data.cache.starts`). Returns the `PreparedData` (its `cache_dir` says where
    the rows are). The rows are those of the recipe's objective (`peftkit.objectives`: supervised
    rows, labelled rows of a task head, preference pairs, prompts), read and encoded as training
    reads them, so every bad row is reported before a run starts.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    kind = recipe.objective_kind
    if not recipe.data.cache and kind.caches_rows:
        raise RecipeError("data.cache is false: there is no cache to prepare (set it to true)")
    key = starts.key_of(recipe)  # hashes the tokenizer's and the data's files: once
    found = starts.find(recipe, key)
    if found is not None:
        return found
    from peftkit.models.load import load_tokenizer  # (transformers, torch)

    tokenizer = load_tokenizer(recipe.model, needs_eos=kind.needs_eos)
    data, _ = kind.prepare_data(recipe, tokenizer, recipe.data_seed)
    if data.cache_dir is None and kind.caches_rows:
        raise RecipeError(
            "this data cannot be cached: a hub dataset without data.train[...].revision may "
            "change under the same name; pin a revision"
        )
    starts.remember(key, data)
    return data


def prune_data_cache(
    max_gb: Annotated[float, Ge(0)] | None = None,
    unused_days: Annotated[float, Ge(0)] | None = 30.0,
    dry_run: bool = False,
) -> PruneReport:
    """Remove data cache entries unused for a while, then the least recently used ones beyond a
    size (`peftkit.data.cache.prune`). Builds in progress and entries used within the last hour are
    always kept. Returns what was removed and what is left.

    Args:
        max_gb: then remove the least recently used entries until the cache holds at most this
            many GiB.
        unused_days: remove entries not built or used for this many days.
        dry_run: only report what would be removed.
    """
    return prune(
        max_bytes=None if max_gb is None else int(max_gb * 2**30),
        unused_days=unused_days,
        dry_run=dry_run,
    )


def plan(
    recipe: str | Path | Recipe,
    overrides: list[str] | None = None,
    gpu_memory: str | None = None,
    launch: str | Path | None = None,
) -> Plan:
    """Predict peak training memory of a recipe (loads no weights); see `peftkit.planner.plan`.

    Args:
        gpu_memory: plan for a GPU of this size ("24GB"); default: this machine.
        launch: the accelerate config file the run will be launched with, e.g.
            recipes/accelerate/fsdp2.yaml (processes, FSDP or DeepSpeed sharding): the
            prediction is then per process.
    """
    from peftkit.planner.plan import make_plan, parse_size

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    how = check_launch(recipe, Launch.from_accelerate_config(launch)) if launch else None
    return make_plan(recipe, parse_size(gpu_memory) if gpu_memory else None, how)


def report(runs: list[str | Path], out: str | Path | None = None) -> Path:
    """Write an HTML page of runs; returns its path.

    One run without `out`: (re)writes RUN/report.html. Several runs, or a folder of runs (a
    sweep's): one page comparing them (their key figures and overlaid curves).

    Args:
        runs: run directories, or folders of them (a sweep).
        out: the page to write (default: RUN/report.html for one run, report.html inside a
            folder of runs, ./runs-compared.html for several).
    """
    from peftkit.report import compare_runs, write_run_report
    from peftkit.report.compare import find_runs

    paths = [Path(r) for r in runs]
    if out is None and len(paths) == 1 and RunLayout(paths[0]).recipe.is_file():
        return write_run_report(paths[0])
    if out is None:
        out = paths[0] / "report.html" if len(paths) == 1 else Path("runs-compared.html")
    find_runs(paths)  # a bad path fails before anything is written
    return compare_runs(paths, out)


def load_adapters(
    adapters: dict[str, str | Path] | list[str | Path],
    base: str | None = None,
    dtype: DType = "auto",
    quantization: Quantize | dict[str, Any] | None = "auto",
    allow_mismatch: bool = False,
    default_system: bool = True,
) -> AdapterSet:
    """Load a base model once and attach adapters to it; returns an `AdapterSet`.

    Args:
        adapters: {name: run dir or adapter folder}, or a list of them (named after their folder;
            a run directory's name, not "adapter").
        base: the base model; default: the one the adapters' manifests name.
        dtype: dtype of the base weights (auto: bf16 on a GPU that has it, else fp32).
        quantization: load the base in 4/8 bit; auto = as the adapters were trained (QLoRA:
            4-bit), none = unquantized (from Python also None, or a section such as {"bits": 4}).
        allow_mismatch: load adapters trained on another base (warn instead of refusing).
        default_system: give chat prompts without a system turn their adapter's training system
            prompt (the recipe's data.system_prompt, recorded in its manifest); False renders
            them as given.
    """
    from peftkit.adapters.adapter_set import AdapterSet, default_name

    if not isinstance(adapters, dict):
        adapters = {default_name(p): p for p in adapters}
    return AdapterSet.from_adapters(
        adapters, base, dtype, quantization, allow_mismatch, default_system
    )


def serve(
    adapters_dir: str | Path,
    base: str | None = None,
    host: str = "127.0.0.1",
    port: Annotated[int, Ge(0), Le(65535)] = 8000,
    served_base_name: str | None = None,
    dtype: DType = "auto",
    quantization: Quantize | dict[str, Any] | None = "auto",
    allow_mismatch: bool = False,
    limits: ServeLimits | None = None,
    block: bool = True,
    api_key: str | None = None,
    api_key_file: str | Path | None = None,
    insecure_no_auth: bool = False,
    allowed_host: list[str] | None = None,
    docs: bool = False,
    special_tokens_in_content: SpecialTokens = "escape",
    default_system: bool = True,
) -> Server:
    """Serve the base model and every adapter in `adapters_dir` over an OpenAI-compatible API.

    What the server promises (API key, Host and content-type checks, no error details to
    clients) is `peftkit.serving.security`'s; a non-loopback `host` needs a key.

    Args:
        adapters_dir: one sub-folder per adapter (run dir or adapter folder); its name is the model name.
        base: the base model (default: the one the adapters were trained on).
        host: address to listen on; anything but a loopback address needs an API key.
        port: 0 = any free port.
        served_base_name: model name of the base (default: base).
        limits: a `peftkit.serving.app.ServeLimits` (queue, batch and request size limits).
        block: serve until SIGINT/SIGTERM (True), or start in a background thread and return the
            `Server` (call `.stop()`; its `.url` says where it listens).
        api_key: clients must send 'Authorization: Bearer KEY' (every route but /health);
            default: the PEFTKIT_API_KEY environment variable.
        api_key_file: read the API key from the first line of this file.
        insecure_no_auth: serve a non-loopback address without an API key (anyone who can
            reach it can use it).
        allowed_host: also accept this Host header name on a loopback bind (a reverse proxy's
            name); repeat for several.
        docs: serve the interactive API docs (/docs, /redoc, /openapi.json).
        special_tokens_in_content: the chat template's special tokens inside message content:
            tokenized as plain text (escape), refused with a 400 (refuse), or read as the real
            tokens (allow: a client can then forge turns).
        default_system: give chat requests without a system turn their adapter's training
            system prompt (a request opts out with `"default_system": false`).
    """
    from peftkit.serving.app import ServeLimits
    from peftkit.serving.security import read_api_key, security_for
    from peftkit.serving.server import Server, load_for_serving

    security = security_for(  # before the model loads: a refused bind fails at once
        host,
        read_api_key(api_key, api_key_file),
        insecure_no_auth,
        tuple(allowed_host or ()),
        docs,
        special_tokens_in_content,
    )
    aset = load_for_serving(adapters_dir, base, dtype, quantization, allow_mismatch, default_system)
    server = Server(
        aset, limits or ServeLimits(), host, port, served_base_name or aset.spec.name, security
    )
    if not block:
        return server.start()
    log.info(f"peftkit serve: {aset.spec.name} + adapters {', '.join(aset.names)}")
    log.info(f"peftkit serve: listening on {server.url}/v1 (Ctrl-C stops)")
    server.run()
    return server


def sweep(
    recipe: str | Path,
    space: str | Path,
    trials: Annotated[int, Gt(0)],
    overrides: list[str] | None = None,
    out: str | Path | None = None,
    storage: str | Path | None = None,
    overwrite: bool = False,
) -> SweepResult:
    """Search a recipe's hyperparameters with Optuna; see `peftkit.sweep.run.sweep`.

    Returns a `SweepResult`: trials best first, results.md, best_recipe.yaml.

    Args:
        recipe: recipe YAML file every trial starts from.
        space: search space YAML (params, objective, pruner, seed).
        trials: trials in the sweep (with --storage: in total).
        overrides: dotted overrides for every trial, e.g. train.max_steps=200.
        out: sweep folder (default: the recipe's output.dir + '-sweep').
        storage: sqlite file that keeps the study: rerun the command to continue it.
        overwrite: replace a sweep folder that holds another sweep.
    """
    from peftkit.sweep import sweep as run_sweep

    return run_sweep(
        recipe, space, trials, overrides, out_dir=out, storage=storage, overwrite=overwrite
    )


__all__ = [
    "combine",
    "environment_notes",
    "export",
    "load_adapters",
    "plan",
    "prepare",
    "prune_data_cache",
    "resolved_yaml",
    "serve",
    "sweep",
    "train",
    "validate",
]
