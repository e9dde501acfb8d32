"""The manual cannot drift from the code: it builds strictly, its generated pages come from the
schema and the registries, every recipe fragment it shows validates, every `peftkit` command it
shows parses, and every repository path it names exists."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from peftkit.methods.registry import registered_methods
from peftkit.recipe.reference import fill, methods_table, recipe_reference
from peftkit.recipe.schema import Recipe

ROOT = Path(__file__).resolve().parents[2]
PAGES = [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
RECIPE_KEYS = set(Recipe.model_fields)


def _blocks(kinds: set[str]):
    for page in PAGES:
        for match in FENCE.finditer(page.read_text()):
            if match.group(1) in kinds:
                line = page.read_text()[: match.start()].count("\n") + 2
                yield f"{page.relative_to(ROOT)}:{line}", match.group(2)


def _base() -> dict:
    """The smallest valid recipe: what a fragment of the manual is laid over."""
    return {
        "model": {"name": "builtin:tiny-llama"},
        "adapter": {"method": "lora"},
        "data": {"train": "train.jsonl", "eval": "eval.jsonl"},
    }


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_manual_builds_strictly(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    page = (tmp_path / "site" / "reference" / "recipe" / "index.html").read_text()
    assert "train.micro_batch_size" in page and "<!-- peftkit:" not in page


def test_recipe_reference_is_the_schema():
    text = recipe_reference()
    train = Recipe.model_fields["train"].annotation
    for name, info in train.model_fields.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| `train.{name}` |"))
        if not info.is_required() and info.default is not None and not callable(info.default):
            shown = str(list(info.default) if isinstance(info.default, tuple) else info.default)
            assert f"`{shown.lower() if isinstance(info.default, bool) else shown}`" in row, row


def test_methods_table_is_the_registry():
    table = methods_table()
    for name, cls in registered_methods().items():
        row = next(line for line in table.splitlines() if line.startswith(f"| `{name}` |"))
        assert row.split(" | ")[1] == ("yes" if cls.mergeable else "—"), row


def test_generated_markers_are_filled():
    assert "<!-- peftkit:" not in fill("<!-- peftkit:methods-table -->")
    used = "".join(p.read_text() for p in PAGES)
    for marker in ("recipe-reference", "methods-table", "objectives-table", "exporters-table"):
        assert f"<!-- peftkit:{marker} -->" in used, marker


def _recipe_fragments():
    for where, text in _blocks({"yaml", "yml"}):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            pytest.fail(f"{where}: not YAML: {err}")
        if isinstance(data, dict) and data and set(data) <= RECIPE_KEYS:
            yield where, data


@pytest.mark.parametrize(
    ("where", "fragment"), list(_recipe_fragments()), ids=lambda v: str(v)[:60]
)
def test_recipe_fragments_in_the_manual_validate(where, fragment):
    """A fragment is laid over the smallest recipe, section by section, and validated."""
    recipe = _base()
    for key, value in fragment.items():
        if (
            isinstance(value, dict)
            and isinstance(recipe.get(key), dict)
            and key
            not in (
                "adapter",
                "objective",
            )
        ):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    if "data" in fragment:
        recipe["data"].setdefault("train", "x.jsonl")
    try:
        Recipe.model_validate(recipe)
    except Exception as err:
        pytest.fail(f"{where}: the recipe fragment does not validate:\n{err}")


def _commands():
    for where, text in _blocks({"bash", "sh", "console", "shell", ""}):
        joined = re.sub(r"\\\n\s*", " ", text)
        for line in joined.splitlines():
            line = line.strip().removeprefix("$ ")
            for cmd in re.split(r"\s*(?:&&|;|\|)\s*", line.split(" #")[0]):
                words = cmd.strip().split(" ", 1)
                if words[0] in ("peftkit", ".venv/bin/peftkit") and len(words) > 1:
                    yield where, words[1]


COMMANDS = list(_commands())


def test_the_manual_shows_commands():
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize(("where", "args"), COMMANDS, ids=[a[:50] for _, a in COMMANDS])
def test_commands_in_the_manual_parse(where, args):
    from peftkit.cli import _parser

    words = shlex.split(args)
    if any(w in ("...", "…") for w in words):
        words = [w for w in words if w not in ("...", "…")]
    try:
        _parser().parse_args(words)
    except SystemExit as err:
        if err.code:
            pytest.fail(f"{where}: `peftkit {args}` does not parse")


def test_paths_the_manual_names_exist():
    named = set()
    for page in PAGES:
        named |= set(
            re.findall(r"`((?:recipes|benchmarks|peftkit|tests|docs)/[\w./-]+)`", page.read_text())
        )
    outputs = ("benchmarks/results/",)  # what the benchmarks write, not part of the repository
    missing = sorted(
        p for p in named if "*" not in p and not p.startswith(outputs) and not (ROOT / p).exists()
    )
    assert not missing, missing
