"""Preference tuning in peftkit's own loop: bad rows are named by file and line, a resumed run
equals the uninterrupted one (precomputed reference log-probs kept with the run), two processes
equal one, early stopping watches preference accuracy, and the adapter goes through export,
adapter serving and combine like any other."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftkit import api
from peftkit.adapters.adapter_set import AdapterSet
from peftkit.adapters.generation import SamplingOptions
from peftkit.cli import main
from tests.conftest import train_in_two_processes, write_jsonl, write_recipe
from tests.e2e.conftest import alone_greedy

LORA = {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0}


def _turns(a: int, b: int, answer: str) -> list[dict]:
    return [
        {"role": "user", "content": f"What is {a} + {b}?"},
        {"role": "assistant", "content": answer},
    ]


def pairs(n: int, seed: int = 0) -> list[dict]:
    """Arithmetic questions: a direct answer is chosen, an evasive one rejected (whole
    conversations, UltraFeedback style)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        rows.append(
            {
                "chosen": _turns(a, b, f"{a} + {b} = {a + b}."),
                "rejected": _turns(a, b, f"I am not sure what {a} + {b} is."),
            }
        )
    return rows


def _recipe(tmp_path: Path, model, data: Path, out: str, objective: dict, **train) -> Path:
    return write_recipe(
        tmp_path / f"{out}.yaml",
        model,
        data,
        objective=objective,
        adapter=LORA,
        train={"max_steps": 8, "micro_batch_size": 2, "grad_accum": 2, "lr": 1e-2, **train},
        output={"dir": str(tmp_path / out), "plot": False},
    )


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


# ------------------------------------------------------------------ bad rows
GOOD = {"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3"}
CONVERSATION = pairs(1)[0]
BAD_ROWS = {
    "missing rejected": (
        "dpo",
        {"prompt": "What is 2 + 2?", "chosen": "4"},
        r"prefs\.jsonl line 2: missing 'rejected'",
    ),
    "identical answers": (
        "dpo",
        {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "4"},
        r"prefs\.jsonl line 2: 'chosen' and 'rejected' are identical",
    ),
    "prompt mismatch": (
        "dpo",
        {
            "chosen": CONVERSATION["chosen"],
            "rejected": [
                {"role": "user", "content": "Something else?"},
                *CONVERSATION["rejected"][1:],
            ],
        },
        r"prefs\.jsonl line 2: prompt mismatch: .* differ at turn 0",
    ),
    "answer not by the assistant": (
        "dpo",
        {
            "prompt": [{"role": "user", "content": "Hi"}],
            "chosen": [{"role": "user", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
        },
        r"prefs\.jsonl line 2: the 'chosen' answer must end with an assistant turn",
    ),
    "KTO label not a boolean": (
        "kto",
        {"prompt": "What is 2 + 2?", "completion": "4", "label": "yes"},
        r"prefs\.jsonl line 2: 'label' must be true or false, got 'yes'",
    ),
    "KTO row in a paired objective": (
        "dpo",
        {"prompt": "What is 2 + 2?", "completion": "4", "label": True},
        r"prefs\.jsonl line 2: a KTO row .* in a paired objective",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_preference_rows_are_named_by_file_and_line(tmp_path, tiny_model, capsys, case):
    objective, bad, message = BAD_ROWS[case]
    first = (
        GOOD
        if objective == "dpo"
        else {"prompt": "What is 1 + 1?", "completion": "2", "label": True}
    )
    data = write_jsonl(tmp_path / "prefs.jsonl", [first, bad, first])
    recipe = _recipe(tmp_path, tiny_model, data, "run", {"type": objective})
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "run").exists()  # nothing half-made is left behind


def test_a_reference_that_is_not_the_start_is_refused(tmp_path, tiny_model, capsys):
    data = write_jsonl(tmp_path / "prefs.jsonl", pairs(8))
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_model,
        data,
        objective={"type": "dpo"},
        adapter={**LORA, "init": "pissa"},
    )
    assert main(["validate", str(recipe)]) == 2
    assert "set objective.precompute_ref: true" in capsys.readouterr().err


# ------------------------------------------------------------------ exactness
def test_resume_is_exact_and_reuses_the_precomputed_reference(tmp_path, tiny_model, capsys):
    data = write_jsonl(tmp_path / "prefs.jsonl", pairs(10, seed=1))
    objective = {"type": "dpo", "precompute_ref": True}
    full = _recipe(tmp_path, tiny_model, data, "full", objective, save_every=2, keep_last=10)
    assert main(["train", str(full)]) == 0
    reference = _losses(tmp_path / "full")
    assert len(reference) == 8
    cached = tmp_path / "full" / "reference_logps.safetensors"
    assert load_file(str(cached))["train"].shape == (10, 2)

    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "full", crashed)
    for name in ("step-0000006", "step-0000008"):
        shutil.rmtree(crashed / "checkpoints" / name)
    shutil.rmtree(crashed / "adapter")
    lines = (crashed / "metrics.jsonl").read_text().splitlines()
    (crashed / "metrics.jsonl").write_text("\n".join(lines[:4]) + "\n")
    stamp = (crashed / "reference_logps.safetensors").stat().st_mtime_ns
    capsys.readouterr()

    resumed = _recipe(tmp_path, tiny_model, data, "crashed", objective, save_every=2, keep_last=10)
    assert main(["train", str(resumed), "--resume"]) == 0
    said = capsys.readouterr()
    assert "read reference log-probs of 10 rows" in said.out + said.err
    assert (crashed / "reference_logps.safetensors").stat().st_mtime_ns == stamp
    again = _losses(crashed)
    assert all(again[s] == reference[s] for s in range(5, 9)), (again, reference)
    a, b = _adapter(tmp_path / "full"), _adapter(crashed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_precomputed_reference_gives_the_same_run_as_the_live_one(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "prefs.jsonl", pairs(8, seed=2))
    live = _recipe(tmp_path, tiny_model, data, "live", {"type": "dpo"}, max_steps=3)
    pre = _recipe(
        tmp_path, tiny_model, data, "pre", {"type": "dpo", "precompute_ref": True}, max_steps=3
    )
    assert main(["train", str(live)]) == 0 and main(["train", str(pre)]) == 0
    a, b = _losses(tmp_path / "live"), _losses(tmp_path / "pre")
    assert a.keys() == b.keys() and all(abs(a[s] - b[s]) < 1e-6 for s in a)


def test_two_processes_match_one_process(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "prefs.jsonl", pairs(16, seed=7))
    single = _recipe(tmp_path, tiny_model, data, "single", {"type": "dpo"}, max_steps=3)
    assert main(["train", str(single)]) == 0
    double = _recipe(
        tmp_path, tiny_model, data, "double", {"type": "dpo"}, max_steps=3, grad_accum=1
    )
    train_in_two_processes(double)
    a, b = _losses(tmp_path / "single"), _losses(tmp_path / "double")
    assert a.keys() == b.keys() and all(abs(a[s] - b[s]) < 1e-5 for s in a), (a, b)
    records = [
        json.loads(x) for x in (tmp_path / "double" / "metrics.jsonl").read_text().splitlines()
    ]
    single_records = [
        json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()
    ]
    for x, y in zip(records, single_records):
        if "rewards/margins" in x:  # metrics gathered over both processes
            assert x["rewards/margins"] == pytest.approx(y["rewards/margins"], abs=1e-5)
    wa, wb = _adapter(tmp_path / "single"), _adapter(tmp_path / "double")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-5, msg=k)


# ------------------------------------------------------------------ one run, downstream
@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory) -> Path:
    """DPO on builtin:tiny-llama, evaluated, early stopping watching preference accuracy."""
    root = tmp_path_factory.mktemp("dpo")
    data = write_jsonl(root / "prefs.jsonl", pairs(40, seed=3))
    recipe = write_recipe(
        root / "dpo.yaml",
        "builtin:tiny-llama",
        data,
        objective={"type": "dpo", "beta": 0.1},
        adapter=LORA,
        data={"train": str(data), "eval_fraction": 0.2, "max_length": 128},
        train={
            "max_steps": 10,
            "micro_batch_size": 4,
            "lr": 5e-3,
            "eval_every": 5,
            "early_stopping": {"metric": "eval_rewards/accuracies", "patience": 5},
        },
        output={"dir": str(root / "run"), "plot": True},
        export={"samples": 4, "generate_tokens": 4},
    )
    assert main(["train", str(recipe)]) == 0
    return root / "run"


def test_metrics_summary_and_plot_of_a_preference_run(dpo_run):
    records = [json.loads(x) for x in (dpo_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert len(steps) == 10 and all("rewards/accuracies" in r for r in steps)
    assert [r["step"] for r in evals] == [0, 5, 10]
    for r in evals:
        assert r["eval_rewards/margins"] == pytest.approx(
            r["eval_rewards/chosen"] - r["eval_rewards/rejected"], abs=1e-6
        )
    assert evals[0]["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy = reference
    summary = json.loads((dpo_run / "summary.json").read_text())
    assert summary["loss_unit"] == "pairs" and summary["best_metric"] == "eval_rewards/accuracies"
    assert summary["preference"]["eval_accuracies_after"] == evals[-1]["eval_rewards/accuracies"]
    assert (
        summary["preference"]["eval_margins_after"] > summary["preference"]["eval_margins_before"]
    )
    assert (dpo_run / "loss.png").stat().st_size > 10_000
    assert (dpo_run / "best").is_dir()


def test_export_of_a_preference_adapter_is_verified(dpo_run, tmp_path):
    out = tmp_path / "merged"
    report = api.export(dpo_run, out)
    assert report["passed"]
    assert report["samples_from"] == "eval data"
    assert (out / "model.safetensors").exists() or list(out.glob("model-*.safetensors"))


def test_served_preference_adapter_answers_as_loaded_alone(dpo_run):
    aset = AdapterSet("builtin:tiny-llama")
    aset.add("pref", dpo_run / "adapter")
    prompt = "What is 12 + 30?"
    chat = [[{"role": "user", "content": prompt}]]
    got = aset.generate(chat, adapter="pref", options=SamplingOptions(max_new_tokens=24))[0].text
    assert got == alone_greedy(dpo_run / "adapter", prompt, max_new_tokens=24)


def test_combine_with_an_sft_adapter_evaluates_the_preference_source(dpo_run, skill_runs, tmp_path):
    result = api.combine(
        {"pref": dpo_run, "arithmetic": skill_runs["arithmetic"]}, tmp_path / "combined", how="cat"
    )
    pref = next(t for t in result.tasks if t.task == "pref")
    assert pref.own is not None and pref.combined is not None
    assert "| pref |" in (tmp_path / "combined" / "combine_report.md").read_text()
