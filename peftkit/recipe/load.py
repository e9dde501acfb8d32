"""Read a recipe: YAML + dotted command-line overrides -> a validated `Recipe`, or a `RecipeError`
that names the field path and suggests the closest valid key."""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from peftkit.errors import PeftkitError, RecipeError, RemoteCodeNotTrusted
from peftkit.exporters import registry as export_registry
from peftkit.recipe import yaml_strict
from peftkit.recipe.schema import Recipe
from peftkit.section import error_message, unknown_key_message

# Names users bring from transformers/peft/other toolkits, mapped to ours.
ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "num_epochs": "epochs",
    "batch_size": "micro_batch_size",
    "per_device_train_batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "lr_scheduler_type": "scheduler",
    "max_seq_length": "max_length",
    "sequence_len": "max_length",
    "output_dir": "dir",
    "model_name_or_path": "name",
    "base_model": "name",
    "load_in_4bit": "quantization",
    "bf16": "precision",
    "fp16": "precision",
    "torch_dtype": "dtype",
}


def read_yaml(path: Path, what: str, error: type[PeftkitError]) -> Any:
    """The parsed YAML file (`{}` if empty); a missing file or bad YAML raises `error`."""
    if not path.is_file():
        raise error(f"{what} file not found: {path}")
    try:
        return yaml_strict.load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {e}") from e


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Parse `path`, apply `key.sub=value` overrides, validate, and resolve relative data paths."""
    path = Path(path)
    raw = read_yaml(path, "recipe", RecipeError)
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections (model, adapter, data, ...)")
    for item in overrides or []:
        apply_override(raw, item)
    recipe = validate_recipe(raw, source=str(path))
    return resolve_paths(recipe, path.parent)


def load_run_recipe(path: str | Path, trust_remote_code: bool = False) -> Recipe:
    """The recipe a run directory holds (RUN/recipe.yaml), read as strictly as a user's (YAML 1.2
    booleans, no duplicate keys, every key validated). A run may come from someone else: one
    whose model.trust_remote_code is true is refused unless `trust_remote_code` is given (the
    command line's --trust-remote-code). Its paths are kept as written (absolute when peftkit
    wrote them)."""
    path = Path(path)
    raw = read_yaml(path, "recipe", RecipeError)
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections (model, adapter, data, ...)")
    recipe = validate_recipe(raw, source=str(path))
    check_remote_code(recipe, trust_remote_code, str(path))
    return recipe


def check_remote_code(recipe: Recipe, trusted: bool, source: str) -> None:
    """Refuse a recipe from elsewhere (a run directory, an adapter's manifest) that would run the
    model's own Python code, unless the command line trusted it."""
    if recipe.model.trust_remote_code and not trusted:
        raise RemoteCodeNotTrusted(
            f"{source}: model.trust_remote_code is true: reading this run would run the Python "
            f"code that comes with {recipe.model.name!r}. Pass --trust-remote-code if you trust "
            "that code (and whoever sent the run)"
        )


def validate_recipe(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate a recipe mapping, turning pydantic errors into one readable `RecipeError`."""
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        lines = [_describe(err, raw) for err in e.errors()]
        raise RecipeError(
            f"{source}: invalid recipe\n" + "\n".join(f"  - {line}" for line in lines)
        ) from None


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in the nested mapping; the value is parsed as YAML (`1e-4`, `true`, `[a, b]`)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise RecipeError(f"override {item!r} is not of the form section.key=value")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"override {item!r}: {part!r} is not a section")
        node = child
    try:
        node[leaf] = yaml_strict.load(value)
    except yaml.YAMLError as e:
        raise RecipeError(f"override {item!r}: value is not valid YAML: {e}") from e


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level with dotted keys, as overrides name them ({"train": {"lr": 1}} -> {"train.lr": 1})."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    """Make relative local paths absolute (data sources, a .gguf model file, a metric's or a
    reward's .py file): the recipe's folder first, then the cwd. Anything else (hub ids) stays as written."""
    for source in recipe.data.sources:
        source.path = _resolve_local(source.path, base)
    if recipe.model.name.lower().endswith(".gguf"):
        recipe.model.name = _resolve_local(recipe.model.name, base)
    if recipe.eval.function and ".py:" in recipe.eval.function:
        file, name = recipe.eval.function.rsplit(":", 1)
        recipe.eval.function = f"{_resolve_local(file, base)}:{name}"
    for reward in getattr(recipe.objective, "rewards", []):  # reinforcement-learning rewards
        if reward.function and ".py:" in reward.function:
            file, name = reward.function.rsplit(":", 1)
            reward.function = f"{_resolve_local(file, base)}:{name}"
    return recipe


def _resolve_local(value: str, base: Path) -> str:
    """`value` made absolute when it is a relative path that exists beside the recipe or in the
    cwd (in that order); otherwise unchanged."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return value
    for candidate in (base / p, Path.cwd() / p):
        if candidate.exists():
            return str(candidate.resolve())
    return value


def _describe(err: dict[str, Any], raw: dict[str, Any]) -> str:
    loc = _clean_loc(err["loc"], raw)
    where = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        valid = _fields_at(loc[:-1], raw)
        alias = ALIASES.get(str(loc[-1]))
        guess = (
            [alias]
            if alias in valid
            else difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        )
        dotted = ".".join(map(str, [*loc[:-1], guess[0]])) if guess else None
        return unknown_key_message(where, dotted, valid)
    if err["type"] == "missing":
        return f"{where}: required, missing"
    if err["type"] == "union_tag_invalid":
        key = str(err.get("ctx", {}).get("discriminator", "'method'")).strip("'")
        names = re.findall(r"'([^']+)'", str(err.get("ctx", {}).get("expected_tags", "")))
        got = err.get("input", {}).get(key) if isinstance(err.get("input"), dict) else None
        guess = difflib.get_close_matches(str(got), names, n=1)
        hint = f" Did you mean {guess[0]!r}?" if guess else ""
        what = key if key in ("method", "format") else where.rsplit(".", 1)[-1]
        return f"{where}.{key}: unknown {what} {got!r}.{hint} Available: {', '.join(names)}"
    message = error_message(err)
    if "input" in err and err["type"] != "value_error":
        return f"{where}: {message} (got {err['input']!r})"
    return f"{where}: {message}"


def _clean_loc(loc: tuple[Any, ...], raw: dict[str, Any]) -> list[Any]:
    """Drop the pydantic-internal parts of an error location (union tags, validator names)."""
    out: list[Any] = []
    node: Any = raw
    for part in loc:
        if (isinstance(node, dict) and part in node) or (
            isinstance(node, list) and isinstance(part, int) and part < len(node)
        ):
            out.append(part)
            node = node[part]
        elif isinstance(part, str) and (
            part.startswith("function-") or "[" in part or part == "str"
        ):
            continue  # validator wrappers such as function-before[...]
        elif isinstance(node, dict) and part in (node.get("method"), node.get("type")):
            continue  # discriminated-union tag
        elif isinstance(node, dict) and part == node.get("format", _default_format(part)):
            continue  # the `export:` union's tag (`format`, safetensors when left out)
        else:
            out.append(part)
            node = None
    return out


def _default_format(part: Any) -> str | None:
    """The default export format, where `part` is the name of a registered one (else None)."""
    return export_registry.DEFAULT_FORMAT if part in export_registry.format_names() else None


def _fields_at(loc: list[Any], raw: dict[str, Any]) -> list[str]:
    """Valid field names of the section at `loc` (following the adapter's method)."""
    model: type[BaseModel] | None = Recipe
    node: Any = raw
    for part in loc:
        if isinstance(part, int):
            node = node[part] if isinstance(node, list) else None
            continue
        if model is None:
            return []
        field = model.model_fields.get(str(part))
        node = node.get(part) if isinstance(node, dict) else None
        model = _section_type(field.annotation if field else None, node)
    return sorted(model.model_fields) if model else []


def _section_type(annotation: Any, node: Any) -> type[BaseModel] | None:
    """The BaseModel class a field holds (unwrapping Optional/list/Annotated/union by `method` or
    `type`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_type(arg, node)
        if found is None:
            continue
        for tag in ("method", "type", "format"):
            tag_field = found.model_fields.get(tag)
            if tag_field is not None and isinstance(node, dict):
                break
        else:
            return found
        value = node.get(tag, tag_field.default) if tag == "format" else node.get(tag)
        if value in typing.get_args(tag_field.annotation):
            return found
    return None
