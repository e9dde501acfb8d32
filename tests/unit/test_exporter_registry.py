"""The `export:` section is the union of the registered exporters' sections, keyed on `format`
(safetensors when left out); `exporter_for` picks the exporter from the section and the flags,
and each exporter's refusals come from what it declares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import pytest

from peftkit.errors import RecipeError
from peftkit.exporters import Exporter, ExportRequest, ExportSection, exporter_for, registry
from peftkit.exporters.gguf import GgufExport
from peftkit.exporters.safetensors import SafetensorsExport
from peftkit.recipe.load import validate_recipe

BASE = {
    "model": {"name": "builtin:tiny-llama"},
    "adapter": {"method": "lora", "r": 4},
    "data": {"train": [{"path": "train.jsonl"}]},
}


def _recipe(**export):
    return validate_recipe({**BASE, **({"export": export} if export else {})})


@dataclass
class Run:  # what an exporter reads of a run (`RunView`)
    recipe: Any
    whole_model: bool = False
    mergeable: bool = True


def test_format_picks_the_section_and_safetensors_is_the_default():
    assert type(_recipe().export) is SafetensorsExport
    assert type(_recipe(dtype="float32").export) is SafetensorsExport
    spec = _recipe(format="gguf", quant="q4_k_m").export
    assert type(spec) is GgufExport and spec.quant == "q4_k_m"


def test_a_key_of_another_format_names_it():
    with pytest.raises(
        RecipeError, match=r"quant is a key of export format gguf.*set format: gguf"
    ):
        _recipe(quant="q8_0")
    with pytest.raises(RecipeError, match="dtype is a key of export format safetensors"):
        _recipe(format="gguf", dtype="float32")


def test_a_recipe_saved_with_every_format_s_keys_still_validates():
    """A run's recipe.yaml from before the sections split holds the flat section, every key at
    its default where its format did not use it."""
    flat = {**SafetensorsExport().model_dump(), "quant": "f16"}
    assert type(_recipe(**flat).export) is SafetensorsExport
    flat = {**GgufExport().model_dump(), "dtype": "bfloat16", "max_shard_size": "5GB"}
    assert _recipe(**flat).export == GgufExport()


@pytest.mark.parametrize(
    ("fmt", "adapter_only", "name"),
    [("safetensors", False, "merged"), ("safetensors", True, "adapter"),
     ("gguf", False, "gguf"), ("gguf", True, "gguf-adapter")],
)  # fmt: skip
def test_the_section_and_the_flags_pick_the_exporter(fmt, adapter_only, name):
    recipe = _recipe(format=fmt)
    exporter = exporter_for(Run(recipe), recipe.export, ExportRequest(adapter_only=adapter_only))
    assert exporter.name == name and exporter.spec is type(recipe.export)


def test_refusals_are_the_exporter_s():
    recipe = _recipe(format="gguf")
    gguf = registry.registered_exporters()["gguf"]
    assert gguf.refusal(Run(recipe), ExportRequest(target="vllm")) == (
        "GGUF holds a causal LM: no --target"
    )
    assert "cannot be merged" in gguf.refusal(Run(recipe, mergeable=False), ExportRequest())
    merged = registry.registered_exporters()["merged"]
    assert "--target checks adapter-only" in merged.refusal(
        Run(recipe), ExportRequest(target="vllm")
    )
    assert (
        registry.registered_exporters()["adapter"].refusal(Run(recipe), ExportRequest(True, "vllm"))
        is None
    )


class NpzExport(ExportSection):
    format: Literal["npz-test"] = "npz-test"
    compress: bool = True


class NpzExporter(Exporter):
    name = "npz-test"
    spec = NpzExport
    what = "a test format"


def test_a_registered_section_joins_the_recipe_and_leaves_with_it():
    with pytest.raises(RecipeError, match="npz-test"):
        _recipe(format="npz-test")
    registry.register(NpzExporter)
    try:
        spec = _recipe(format="npz-test", compress=False).export
        assert type(spec) is NpzExport and spec.compress is False
        assert "npz-test" in registry.format_names()
        with pytest.raises(ValueError, match="registered twice"):
            registry.register(NpzExporter)
    finally:
        registry.unregister("npz-test")
    with pytest.raises(RecipeError, match="npz-test"):
        _recipe(format="npz-test")


def test_one_format_has_one_section():
    class Other(ExportSection):
        format: Literal["gguf"] = "gguf"

    class Clash(Exporter):
        name = "clash-test"
        spec = Other
        what = "x"

    with pytest.raises(ValueError, match="export format 'gguf' has two sections"):
        registry.register(Clash)
    assert "clash-test" not in registry.registered_exporters()
