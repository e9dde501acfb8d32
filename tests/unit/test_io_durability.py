"""Durable writes (fsync of files and folders around each rename), published modes, and a data
cache that holds no pickle, only this user's."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from safetensors.torch import save_file

from peftkit import io


@pytest.fixture
def synced(monkeypatch):
    """The log of fsyncs (the path synced) and renames (source, target), in order."""
    events: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(a, b):
        events.append(("rename", str(a), str(b)))
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def _synced_before(events, path: Path, rename_target: Path) -> bool:
    at = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(rename_target))
    return ("fsync", str(path)) in events[:at]


def test_atomic_dir_syncs_every_file_before_the_rename_and_the_folder_after(tmp_path, synced):
    target = tmp_path / "export"
    with io.atomic_dir(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "config.json").write_text("{}")
        save_file({"w": torch.zeros(2)}, str(tmp / "sub" / "model.safetensors"))
    hidden = tmp_path / ".export.tmp"
    for inside in ("config.json", "sub/model.safetensors", "sub", ""):
        assert _synced_before(synced, hidden / inside if inside else hidden, target), inside
    last_rename = max(i for i, e in enumerate(synced) if e[0] == "rename")
    assert ("fsync", str(tmp_path)) in synced[last_rename:]
    assert (target / "sub" / "model.safetensors").is_file()


def test_atomic_file_writes_sync_the_file_then_the_folder(tmp_path, synced):
    path = tmp_path / "summary.json"
    io.atomic_write_json(path, {"a": 1})
    hidden = tmp_path / f".summary.json.tmp-{os.getpid()}"
    assert _synced_before(synced, hidden, path)
    assert synced[-1] == ("fsync", str(tmp_path))
    assert json.loads(path.read_text()) == {"a": 1}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_published_files_are_readable_as_a_plain_open_leaves_them(tmp_path):
    old = os.umask(0o022)
    try:
        target = tmp_path / "export"
        with io.atomic_dir(target) as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))  # written 0600
        assert _mode(target / "model.safetensors") == 0o644
        assert _mode(target) == 0o755
        single = tmp_path / "ref.safetensors"
        io.atomic_write_with(single, lambda t: save_file({"w": torch.zeros(1)}, str(t)))
        assert _mode(single) == 0o644
        os.umask(0o027)  # a stricter umask is honoured
        with io.atomic_dir(target) as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
        assert _mode(target / "model.safetensors") == 0o640
        with io.atomic_dir(tmp_path / "mine", private=True) as tmp:
            (tmp / "rows.json").write_text("[]")
        assert _mode(tmp_path / "mine") == 0o700 and _mode(tmp_path / "mine" / "rows.json") == 0o600
    finally:
        os.umask(old)


def test_checkpoints_are_synced_before_they_are_renamed_into_place(tmp_path, synced):
    from accelerate import Accelerator

    from peftkit.training import checkpoint as ckpt

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = ckpt.TrainerState(step=3)
    target = ckpt.save_checkpoint(
        tmp_path, Accelerator(cpu=True), model, optimizer, scheduler, state, {}, keep_last=2
    )
    hidden = tmp_path / ".step-0000003.tmp"
    for name in ("trainable.safetensors", "optimizer.pt", "state.json", ""):
        path = hidden / name if name else hidden
        assert _synced_before(synced, path, target), name
    assert ("fsync", str(tmp_path)) in synced[-3:]


def test_the_data_cache_stores_rows_as_json_in_folders_only_its_user_can_enter(
    tmp_path, monkeypatch
):
    """Rows of a parquet source reach the encoding processes as JSON, never as pickles."""
    import pandas as pd
    from transformers import PreTrainedTokenizerFast

    from peftkit.data.cache import build
    from peftkit.data.pipeline import prepare_data
    from peftkit.recipe.schema import DataSpec

    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    rows = [{"prompt": f"Q: {i}?\nA:", "completion": f" {i}", "n": i} for i in range(6)]
    pd.DataFrame(rows).to_parquet(tmp_path / "rows.parquet")
    raws: list[bytes] = []
    real = build._write_raw

    def write_raw(spec, path):
        counts = real(spec, path)
        with pa.memory_map(str(path)) as source:
            raws.extend(pa.ipc.open_stream(source).read_all().column("raw").to_pylist())
        return counts

    monkeypatch.setattr(build, "_write_raw", write_raw)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(
        str(Path(__file__).parents[2] / "peftkit" / "assets" / "tiny-llama")
    )
    spec = DataSpec(train=str(tmp_path / "rows.parquet"), eval_fraction=0, num_proc=1)
    data = prepare_data(spec, tokenizer, 0)
    assert [json.loads(r) for r in raws] == rows
    folder = Path(data.cache_dir)
    assert _mode(folder) == 0o700 and _mode(folder.parent) == 0o700
    assert len(data.train) == 6
