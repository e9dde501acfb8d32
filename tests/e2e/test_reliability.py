"""Nothing lost, nothing silent: outputs never replace inputs, non-finite steps are never committed,
signals act at step boundaries, resume refuses changed inputs and survives damaged checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from peftkit.cli import main
from tests.conftest import (
    PLAIN,
    RESUME_TRAIN,
    build_tokenizer,
    chat_rows,
    fingerprint,
    free_port,
    write_jsonl,
    write_recipe,
)


# ------------------------------------------------------------------ 1. outputs never replace inputs
@pytest.mark.parametrize(
    "where", ["the run", "inside the run", "the run's parent", "the data file", "the base model"]
)
def test_export_refuses_an_output_that_is_or_holds_an_input(
    finished_run, tiny_model, where, capsys
):
    out, culprit = {
        "the run": (finished_run, finished_run),
        "inside the run": (finished_run / "adapter" / "export", finished_run),
        "the run's parent": (finished_run.parent, finished_run),
        "the data file": (finished_run.parent / "train.jsonl", "train.jsonl"),
        "the base model": (tiny_model, tiny_model),
    }[where]
    before = fingerprint(finished_run.parent), fingerprint(tiny_model)
    assert main(["export", str(finished_run), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "would destroy the input" in err and str(culprit) in err, err
    assert (fingerprint(finished_run.parent), fingerprint(tiny_model)) == before


def test_export_overwrite_replaces_only_a_previous_export(finished_run, tmp_path, capsys):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    assert main(["export", str(finished_run), "--out", str(other), "--overwrite"]) == 2
    assert "is not a previous peftkit export (no fidelity.json" in capsys.readouterr().err
    assert (other / "todo.txt").read_text() == "mine"


def test_train_overwrite_refuses_a_folder_that_is_not_a_run(
    tmp_path, tiny_model, chat_file, capsys
):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    recipe = write_recipe(
        tmp_path / "r.yaml", tiny_model, chat_file, output={"dir": str(home), "overwrite": True}
    )
    assert main(["train", str(recipe)]) == 2
    assert "is not a previous peftkit run (no recipe.yaml" in capsys.readouterr().err
    assert (home / "thesis.tex").read_text() == "years of work"


def test_export_overwrite_replaces_a_previous_export(finished_run, tmp_path):
    out = tmp_path / "export"
    assert main(["export", str(finished_run), "--out", str(out)]) == 0
    assert main(["export", str(finished_run), "--out", str(out)]) == 2  # no --overwrite
    assert main(["export", str(finished_run), "--out", str(out), "--overwrite"]) == 0
    assert (out / "fidelity.json").is_file()


# ------------------------------------------------------------------ 2. non-finite steps never commit
class _InfiniteGradient(torch.autograd.Function):
    """Identity forward (the loss stays finite), infinite gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_non_finite_gradients_stop_before_the_step_and_resume_may_lower_the_lr(
    tmp_path, tiny_model, chat_file, monkeypatch, capsys
):
    from peftkit.objectives import causal_lm as objective

    real, calls = objective.causal_lm_loss_sum, []

    def exploding(model, batch, *args):  # step 3's gradients are infinite, its loss is not
        calls.append(1)
        loss = real(model, batch, *args)
        return _InfiniteGradient.apply(loss) if len(calls) == 3 else loss

    monkeypatch.setattr(objective, "causal_lm_loss_sum", exploding)
    train = {"max_steps": 5, "save_every": 1, "keep_last": 5, "scheduler": "constant"}
    train["warmup_steps"] = 0
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, chat_file, train=train)
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert (
        "gradients became non-finite (norm nan) at step 3" in err or "(norm inf) at step 3" in err
    )
    assert "last good checkpoint is" in err and "step-0000002" in err and "train.lr" in err
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert [c.name for c in checkpoints] == ["step-0000001", "step-0000002"]
    for c in checkpoints:
        assert all(torch.isfinite(t).all() for t in load_file(c / "trainable.safetensors").values())

    # What the advice says to change may change on resume, and is recorded in the run.
    monkeypatch.setattr(objective, "causal_lm_loss_sum", real)
    assert main(["train", str(recipe), "train.lr=5e-4", "train.max_grad_norm=0.5", "--resume"]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["lr"] for r in records if "loss" in r] == [1e-3, 1e-3, 5e-4, 5e-4, 5e-4]
    resumes = [json.loads(line) for line in (tmp_path / "run" / "resumes.jsonl").open()]
    assert resumes[-1]["changed"]["train.lr"] == [1e-3, 5e-4]
    assert resumes[-1]["changed"]["train.max_grad_norm"] == [1.0, 0.5]


def test_a_non_finite_checkpoint_is_never_saved(
    tmp_path, tiny_model, chat_file, monkeypatch, capsys
):
    from peftkit.training import checkpoint as ckpt

    real = ckpt.non_finite_weights
    monkeypatch.setattr(
        ckpt, "non_finite_weights", lambda model: ["lora_A"] if len(saved) == 2 else real(model)
    )
    saved = []
    real_save = ckpt.save_checkpoint
    monkeypatch.setattr(ckpt, "save_checkpoint", lambda *a: saved.append(1) or real_save(*a))
    recipe = write_recipe(
        tmp_path / "r.yaml", tiny_model, chat_file, train={"max_steps": 4, "save_every": 1}
    )
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "the weights after step 3 hold NaN or inf (lora_A)" in err and "step-0000002" in err
    assert [c.name for c in (tmp_path / "run" / "checkpoints").glob("step-*")] == [
        "step-0000001",
        "step-0000002",
    ]


# ------------------------------------------------------------------ 4. resume checks the inputs
@pytest.mark.parametrize("change", ["data file", "chat template", "tokenizer"])
def test_resume_refuses_changed_inputs_and_names_them(tmp_path, tiny_model, change, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(24))
    recipe = write_recipe(tmp_path / "r.yaml", model, data, train={"max_steps": 2, "save_every": 1})
    assert main(["train", str(recipe)]) == 0
    assert main(["train", str(recipe), "train.max_steps=3", "--resume"]) == 0  # unchanged: fine
    if change == "data file":
        write_jsonl(data, chat_rows(24, seed=5))
    elif change == "chat template":
        build_tokenizer(model, PLAIN)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model)
        tokenizer.add_tokens(["<|new|>"])
        tokenizer.save_pretrained(model)
    run = tmp_path / "run"
    before = fingerprint(run)
    assert main(["train", str(recipe), "train.max_steps=4", "--resume"]) == 2
    err = capsys.readouterr().err
    culprit = {"data file": f"data file {data} has other contents"}.get(change, change)
    assert "has changed since" in err and culprit in err, err
    assert fingerprint(run) == before


# ------------------------------------------------------------------ 5. damaged checkpoints
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated weights": lambda c: _truncate(c / "step-0000006" / "trainable.safetensors"),
    "truncated optimizer": lambda c: _truncate(c / "step-0000006" / "optimizer.pt"),
    "garbage state.json": lambda c: (c / "step-0000006" / "state.json").write_text("{step: ]"),
    "missing scheduler": lambda c: (c / "step-0000006" / "scheduler.pt").unlink(),
}


@pytest.fixture(scope="module")
def reference_run(tiny_model, tmp_path_factory) -> Path:
    """8 uninterrupted steps, checkpoints at 2, 4, 6, 8 (all kept)."""
    root = tmp_path_factory.mktemp("reference")
    data = write_jsonl(root / "d.jsonl", chat_rows(10, seed=1))
    recipe = write_recipe(root / "r.yaml", tiny_model, data, train=RESUME_TRAIN)
    assert main(["train", str(recipe)]) == 0
    return root / "run"


def _crashed_after_step_6(reference_run: Path, tmp_path: Path) -> Path:
    """A copy of the reference run as a kill right after step 6's checkpoint would leave it."""
    crashed = tmp_path / "run"
    shutil.copytree(reference_run, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step-0000008")
    shutil.rmtree(crashed / "adapter")
    (crashed / "summary.json").unlink()
    lines = (crashed / "metrics.jsonl").read_text().splitlines(keepends=True)
    (crashed / "metrics.jsonl").write_text("".join(lines[:6]) + lines[6][:20])  # torn 7th line
    return crashed


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.parametrize("damage", [None, *DAMAGE])
def test_resume_names_a_damaged_checkpoint_and_falls_back_to_the_newest_intact_one(
    reference_run, tmp_path, damage, capsys
):
    crashed = _crashed_after_step_6(reference_run, tmp_path)
    if damage:
        DAMAGE[damage](crashed / "checkpoints")
    recipe = reference_run.parent / "r.yaml"
    assert main(["train", str(recipe), f"output.dir={crashed}", "--resume"]) == 0
    out = capsys.readouterr().out
    if damage:
        assert f"checkpoint {crashed / 'checkpoints' / 'step-0000006'} is damaged" in out, out
        assert "resuming from" in out and "step-0000004 (step 4)" in out
        assert (crashed / "checkpoints" / "damaged-step-0000006").is_dir()
    else:
        assert "step-0000006 (step 6)" in out
    assert _losses(crashed) == _losses(reference_run)
    a = load_file(crashed / "adapter" / "adapter_model.safetensors")
    b = load_file(reference_run / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)


AGREE = """
import json, sys
from pathlib import Path
from accelerate import Accelerator
from peftkit.training import checkpoint as ckpt

accelerator = Accelerator(cpu=True)
saved, damaged = ckpt.newest_intact(Path(sys.argv[1]), accelerator)
Path(sys.argv[2], f"rank-{accelerator.process_index}.json").write_text(
    json.dumps({"chosen": saved.path.name, "damaged": [str(d) for d in damaged]})
)
from peftkit.launch import end_process_group
end_process_group()  # as `peftkit train` does: no gloo threads left at interpreter exit
"""


def test_every_process_resumes_from_the_same_checkpoint(reference_run, tmp_path):
    """The newest checkpoint is damaged for process 1 only (its RNG file): both processes fall
    back to the one before, and the reason names the process."""
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(reference_run / "checkpoints", checkpoints)
    (checkpoints / "step-0000008" / "rng-1.pt").write_bytes(b"garbage")
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    command = [sys.executable, str(script), str(checkpoints), str(tmp_path)]
    ranks = [  # what torchrun would start, without its own process
        subprocess.Popen(
            command,
            env={**env, "RANK": str(i), "LOCAL_RANK": str(i), "LOCAL_WORLD_SIZE": "2"},
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (0, 1)
    ]
    for rank in ranks:
        assert rank.wait(300) == 0, rank.stderr.read()[-3000:]
    answers = [json.loads((tmp_path / f"rank-{i}.json").read_text()) for i in (0, 1)]
    assert [a["chosen"] for a in answers] == ["step-0000006", "step-0000006"]
    for a in answers:
        assert a["damaged"] == [
            f"checkpoint {checkpoints / 'step-0000008'} is damaged: process 1: rng-1.pt cannot be "
            "read (UnpicklingError)"
        ]


def test_pruning_is_atomic_and_its_leftovers_are_cleaned(
    tmp_path, tiny_model, chat_file, monkeypatch
):
    from peftkit.training import checkpoint as ckpt

    real_rmtree, killed = shutil.rmtree, []

    def killed_while_pruning(path, *args, **kwargs):  # deletes one file, then the process "dies"
        path = Path(path)
        whole = (path / "trainable.safetensors").exists() and (path / "state.json").exists()
        if not killed and whole and "tmp" not in path.name:
            killed.append(path.name)
            (path / "trainable.safetensors").unlink()
            raise SystemExit("killed")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_while_pruning)
    recipe = write_recipe(
        tmp_path / "r.yaml", tiny_model, chat_file, train={"max_steps": 4, "save_every": 1}
    )
    with pytest.raises(SystemExit):
        main(["train", str(recipe)])
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    checkpoints = tmp_path / "run" / "checkpoints"
    for path in ckpt.complete_checkpoints(checkpoints):
        ckpt.read_checkpoint(path)  # every visible checkpoint is whole
    assert main(["train", str(recipe), "--resume"]) == 0
    assert not list(checkpoints.glob(".*")), list(checkpoints.iterdir())


def test_a_full_disk_while_checkpointing_is_a_named_error_leaving_no_tmp(
    tmp_path, tiny_model, chat_file, monkeypatch, capsys
):
    from peftkit.training import checkpoint as ckpt

    real_save, calls = ckpt.torch.save, []

    def disk_full(obj, path, *args, **kwargs):  # the 2nd checkpoint's optimizer state hits ENOSPC
        calls.append(str(path))
        if "step-0000002" in str(path) and str(path).endswith("optimizer.pt"):
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    recipe = write_recipe(
        tmp_path / "r.yaml", tiny_model, chat_file, train={"max_steps": 4, "save_every": 1}
    )
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "could not write the checkpoint of step 2" in err and "Traceback" not in err, err
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000001"]


def test_a_resumed_run_reports_what_the_whole_run_did(reference_run, tmp_path):
    """summary.json after a resume covers the steps before it too; a result folder a kill left
    half-written (.best.tmp) is cleaned away."""
    crashed = _crashed_after_step_6(reference_run, tmp_path)
    (crashed / ".best.tmp").mkdir()
    recipe = reference_run.parent / "r.yaml"
    assert main(["train", str(recipe), f"output.dir={crashed}", "--resume"]) == 0
    summary = json.loads((crashed / "summary.json").read_text())
    expected = json.loads((reference_run / "summary.json").read_text())
    for key in ("largest_micro_batch_tokens", "tokens", "steps", "final_train_loss"):
        assert summary[key] == expected[key], key
    assert not (crashed / ".best.tmp").exists()


# ------------------------------------------------------------------ 6. results written atomically
class _Killed(BaseException):
    """Stands for SIGKILL: nothing catches it and no cleanup of the write in progress runs."""


BEST_TRAIN = {**RESUME_TRAIN, "max_steps": 5, "eval_every": 2}  # evaluations at 2, 4 and 5


@pytest.fixture(scope="module")
def best_reference(tiny_model, tmp_path_factory):
    """An uninterrupted run whose final evaluation (step 5) is its best, and how many times it
    moved a new best/ into place."""
    root = tmp_path_factory.mktemp("best")
    data = write_jsonl(root / "d.jsonl", chat_rows(10, seed=1))
    write_jsonl(root / "e.jsonl", chat_rows(6, seed=2))
    recipe = write_recipe(
        root / "r.yaml",
        tiny_model,
        data,
        data={"train": str(data), "eval": str(root / "e.jsonl"), "max_length": 128},
        train=BEST_TRAIN,
    )
    real, moves = os.replace, []

    def counting(src, dst, *args, **kwargs):
        moves.append(Path(src).name)
        return real(src, dst, *args, **kwargs)

    os.replace = counting
    try:
        assert main(["train", str(recipe)]) == 0
    finally:
        os.replace = real
    summary = json.loads((root / "run" / "summary.json").read_text())
    assert summary["best_step"] == 5, summary  # else the kill below is not in the final one
    return recipe, root / "run", moves.count(".best.tmp")


def test_a_kill_while_best_is_replaced_keeps_the_previous_best_and_resume_completes_it(
    best_reference, tmp_path, monkeypatch
):
    """Killed between moving the previous best/ aside and moving the new one into place, during
    the final evaluation: the resumed run ends with the best/ and summary of an uninterrupted one."""
    recipe, reference, best_moves = best_reference
    real, seen = os.replace, []

    def killed_on_last_best(src, dst, *args, **kwargs):
        if Path(src).name == ".best.tmp":
            seen.append(1)
            if len(seen) == best_moves:
                raise _Killed
        return real(src, dst, *args, **kwargs)

    run = tmp_path / "run"
    monkeypatch.setattr(os, "replace", killed_on_last_best)
    with pytest.raises(_Killed):
        main(["train", str(recipe), f"output.dir={run}"])
    monkeypatch.setattr(os, "replace", real)
    assert not (run / "best").exists() and (run / ".best.old").is_dir()  # where the kill struck

    assert main(["train", str(recipe), f"output.dir={run}", "--resume"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    expected = json.loads((reference / "summary.json").read_text())
    assert (summary["best_eval_loss"], summary["best_step"]) == (
        expected["best_eval_loss"],
        expected["best_step"],
    )
    a = load_file(run / "best" / "adapter_model.safetensors")
    b = load_file(reference / "best" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    assert _losses(run) == _losses(reference)
    assert not list(run.glob(".best*"))
