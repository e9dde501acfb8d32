"""A run directory's recipe is read by the strict loader; its trust_remote_code needs the flag."""

from __future__ import annotations

import pytest
import yaml

from peftkit.cli import _parser
from peftkit.errors import RecipeError, RemoteCodeNotTrusted
from peftkit.recipe.load import load_run_recipe

SAVED = {
    "model": {"name": "org/custom-model", "trust_remote_code": True},
    "adapter": {"method": "lora"},
    "data": {"train": "/data/train.jsonl"},
}


def test_a_run_that_trusts_remote_code_needs_the_flag(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(SAVED))
    with pytest.raises(RemoteCodeNotTrusted, match=r"Pass --trust-remote-code"):
        load_run_recipe(path)
    recipe = load_run_recipe(path, trust_remote_code=True)
    assert recipe.model.trust_remote_code is True
    assert recipe.data.train[0].path == "/data/train.jsonl"  # kept as written
    path.write_text(yaml.safe_dump({**SAVED, "model": {"name": "org/plain"}}))
    assert load_run_recipe(path).model.trust_remote_code is False


def test_a_run_recipe_is_read_as_strictly_as_a_users(tmp_path):
    path = tmp_path / "recipe.yaml"
    text = yaml.safe_dump(SAVED).replace("trust_remote_code: true", "trust_remote_code: on")
    path.write_text(text)  # PyYAML's safe_load reads `on` as True
    with pytest.raises(RecipeError, match=r"valid boolean \(got 'on'\)"):
        load_run_recipe(path, trust_remote_code=True)


@pytest.mark.parametrize("verb", ["export", "train"])
def test_the_commands_that_read_runs_take_the_flag(verb):
    argv = [verb, "run", *(["--out", "x"] if verb == "export" else ["--resume"])]
    assert _parser([verb]).parse_args(argv).trust_remote_code is False
    assert _parser([verb]).parse_args([*argv, "--trust-remote-code"]).trust_remote_code is True
