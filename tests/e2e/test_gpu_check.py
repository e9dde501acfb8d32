"""benchmarks/gpu/check.py, the GPU check, in its CPU smoke mode: every step of the script runs
(train LoRA, QLoRA where bitsandbytes runs, DPO with full; load_adapters, generate, combine,
export; the speed harness on a tiny model), so the script cannot rot between GPU runs. It checks
the script, not the GPU behaviour."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow(reason="the whole check on builtin:tiny-llama: 4 trainings, export, 2 processes")
def test_gpu_check_runs_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu" / "check.py"), "--cpu-smoke"]
    proc = subprocess.run(
        [*cmd, "--workdir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((ROOT / "benchmarks" / "results" / "gpu-check-smoke.json").read_text())
    names = " ".join(c["check"] for c in result["checks"])
    for step in ("LoRA", "DPO full", "served base on cpu", "generate", "combine", "export"):
        assert step in names
    assert all(c["ok"] for c in result["checks"])
    [speed] = result["speed"]
    [peftkit] = speed["results"]
    assert peftkit["config"] == "peftkit" and peftkit["tokens_per_s"] > 0
