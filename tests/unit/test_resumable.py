"""Which recipe fields a resume may change is declared on the fields (`section.RESUMABLE`) and read
in one place: changing a marked field resumes, changing any other is refused naming it."""

from __future__ import annotations

import pytest
import yaml

from peftkit.errors import RunDirError
from peftkit.recipe.load import validate_recipe
from peftkit.recipe.schema import Recipe
from peftkit.section import resumable_paths
from peftkit.training.run_dir import RunDir

BASE = {
    "model": {"name": "builtin:tiny-llama"},
    "adapter": {"method": "lora", "r": 4},
    "data": {"train": [{"path": "train.jsonl"}]},
    "train": {"max_steps": 4, "lr": 1e-4},
}


def _run(tmp_path) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    dump = validate_recipe(BASE).model_dump(mode="json")
    run.recipe.write_text(yaml.safe_dump(dump, sort_keys=False))
    return run


def _changed(section: str, key: str, value) -> dict:
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}
    raw[section] = {**raw.get(section, {}), key: value}
    return validate_recipe(raw).model_dump(mode="json")


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [("train", "max_steps", 8), ("train", "save_every", 2), ("train", "lr", 5e-5),
     ("output", "sample_prompts", ["Hi"]), ("export", "dtype", "float32")],
)  # fmt: skip
def test_a_resumable_field_may_change(tmp_path, section, key, value):
    assert any(f"{section}.{key}".startswith(p) for p in resumable_paths(Recipe))
    changes = _run(tmp_path).check_can_start(True, False, _changed(section, key, value))
    assert list(changes) == [f"{section}.{key}"]  # recorded in resumes.jsonl with both values


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [("train", "seed", 7), ("train", "grad_accum", 2), ("adapter", "r", 8),
     ("data", "max_length", 64), ("model", "name", "builtin:tiny-llama-init")],
)  # fmt: skip
def test_any_other_field_refuses_the_resume_naming_it(tmp_path, section, key, value):
    path = f"{section}.{key}"
    assert not any(path == p or path.startswith(p + ".") for p in resumable_paths(Recipe))
    with pytest.raises(RunDirError, match=f"trained with in {path}; resuming would not"):
        _run(tmp_path).check_can_start(True, False, _changed(section, key, value))


def test_a_marked_section_covers_its_fields_and_nested_sections_are_read():
    paths = resumable_paths(Recipe)
    assert "export" in paths and not any(p.startswith("export.") for p in paths)
    assert "train.early_stopping" in paths  # an optional section, marked as a whole
    assert all(not p.startswith(("model", "adapter", "data", "objective")) for p in paths)
