"""The kill/resume campaign: a run killed again and again (SIGKILL inside steps and checkpoint
writes, SIGTERM anywhere), resumed each time, ends bit for bit where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import chat_rows, write_jsonl, write_recipe

TRAIN = {"max_steps": 14, "micro_batch_size": 2, "grad_accum": 2, "lr": 1e-2}
TRAIN |= {"save_every": 1, "keep_last": 2}
ADAPTER = {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.1}  # dropout: the RNG matters


def _start(recipe: Path, resume: bool, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    argv = [
        sys.executable,
        "-m",
        "peftkit",
        "train",
        str(recipe),
        *(["--resume"] if resume else []),
    ]
    return subprocess.Popen(argv, env=env, stdout=log.open("a"), stderr=subprocess.STDOUT)


def _steps_logged(run: Path) -> int:
    try:
        return sum('"loss"' in line for line in (run / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def _strike(proc: subprocess.Popen, run: Path, how: str, after: int, deadline: float) -> None:
    """Wait until `after` more steps are logged (or, for 'checkpoint', a checkpoint is being
    written), then send the signal; gives up quietly when the process ends first."""
    start = _steps_logged(run)
    while proc.poll() is None and time.monotonic() < deadline:
        writing = any((run / "checkpoints").glob(".step-*.tmp"))
        if (how == "checkpoint" and writing) or _steps_logged(run) >= start + after:
            proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
            return
        time.sleep(0.002)


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.slow
def test_killed_and_resumed_again_and_again_ends_like_an_uninterrupted_run(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(10, seed=1))
    ref = write_recipe(tmp_path / "ref.yaml", tiny_model, data, adapter=ADAPTER, train=TRAIN)
    assert _start(ref, False, tmp_path / "ref.log").wait(timeout=300) == 0
    reference = tmp_path / "run"
    reference.rename(tmp_path / "reference")
    reference = tmp_path / "reference"

    recipe = write_recipe(
        tmp_path / "c.yaml",
        tiny_model,
        data,
        adapter=ADAPTER,
        train=TRAIN,
        output={"dir": str(tmp_path / "camp"), "plot": False, "overwrite": True},
    )
    run, rng, strikes, deadline = tmp_path / "camp", random.Random(0), [], time.monotonic() + 240
    interrupted: list[int] = []  # exit codes of the interrupted attempts
    for attempt in range(12):
        resume = any((run / "checkpoints").glob("step-*"))
        if run.exists() and not resume:
            shutil.rmtree(run)  # killed before its first checkpoint: start again
        proc = _start(recipe, resume, tmp_path / "camp.log")
        if attempt < 8:  # then let it finish
            how = rng.choice(["step", "checkpoint", "sigterm"])
            _strike(proc, run, how, rng.randint(1, 3), deadline)
            strikes.append(how)
        code = proc.wait(timeout=300)
        if code == 0:
            break
        interrupted.append(code)
        assert code in (2, -signal.SIGKILL), (tmp_path / "camp.log").read_text()[-3000:]
    else:
        pytest.fail(f"never finished; strikes {strikes}")
    assert len(interrupted) >= 4 and -signal.SIGKILL in interrupted and 2 in interrupted, strikes
    log = (tmp_path / "camp.log").read_text()
    assert "Traceback" not in log, log[-3000:]
    assert _losses(run) == _losses(reference), strikes
    a = load_file(run / "adapter" / "adapter_model.safetensors")
    b = load_file(reference / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), strikes
    assert not list((run / "checkpoints").glob(".*"))
