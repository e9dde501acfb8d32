"""Adapters per task: manifest checks, one base with many adapters, mixed batches, combine, CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel

from peftkit import api
from peftkit.adapters.adapter_set import AdapterSet
from peftkit.adapters.generation import SamplingOptions
from peftkit.cli import main
from peftkit.errors import AdapterMismatchError, ServingError
from peftkit.io import MANIFEST
from tests.e2e.conftest import PROMPTS, SKILLS, alone_greedy

GREEDY = SamplingOptions(max_new_tokens=24)


def _chat(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


@pytest.fixture(scope="module")
def aset(skill_runs) -> AdapterSet:
    return api.load_adapters(dict(skill_runs))


@pytest.fixture(scope="module")
def alone(skill_runs) -> dict[tuple[str | None, str], str]:
    """{(adapter or None, prompt): greedy answer with that adapter loaded alone}."""
    return {
        (a, p): alone_greedy(skill_runs[a] / "adapter" if a else None, p)
        for a in (*SKILLS, None)
        for p in PROMPTS.values()
    }


def test_manifest_records_base_tokenizer_and_recipe(skill_runs, aset):
    manifest = json.loads((skill_runs["sort"] / "adapter" / MANIFEST).read_text())
    assert manifest["base_model"]["name"] == "builtin:tiny-llama"
    assert manifest["base_model"]["fingerprint"] == aset.identity.fingerprint
    assert manifest["tokenizer"]["fingerprint"] == aset.identity.tokenizer
    assert manifest["tokenizer"]["chat_template"] is not None
    assert "<|im_end|>" in manifest["stop_tokens"]
    assert manifest["recipe"]["data"]["train"][0]["path"].endswith("skill-sort-train.jsonl")


def test_wrong_base_is_refused_and_can_be_allowed(skill_runs, tiny_model, tmp_path):
    # Same architecture and shapes, other weights: only the weights fingerprint can tell.
    same_shape = AdapterSet("builtin:tiny-llama-init")
    with pytest.raises(AdapterMismatchError, match="base model weights differ"):
        same_shape.add("sort", skill_runs["sort"])
    assert same_shape.names == []
    same_shape.add("sort", skill_runs["sort"], allow_mismatch=True)
    assert same_shape.names == ["sort"] and "mismatch allowed" in same_shape.warnings[-1]
    # Another architecture altogether.
    with pytest.raises(AdapterMismatchError, match="base model config differ"):
        AdapterSet(str(tiny_model)).add("sort", skill_runs["sort"])
    # Another tokenizer (recorded fingerprint changed): refused too.
    copy = tmp_path / "sort"
    shutil.copytree(skill_runs["sort"] / "adapter", copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["tokenizer"]["fingerprint"] = "0" * 64
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(AdapterMismatchError, match="tokenizer differs"):
        same_shape.add("other", copy)


def test_each_adapter_answers_as_when_loaded_alone(aset, alone):
    for adapter in (*SKILLS, None):
        got = aset.generate([_chat(p) for p in PROMPTS.values()], adapter=adapter, options=GREEDY)
        assert [c.text for c in got] == [alone[(adapter, p)] for p in PROMPTS.values()], adapter
    # the adapters really differ: routing to the wrong one would show
    answers = {a: alone[(a, PROMPTS["sort"])] for a in (*SKILLS, None)}
    assert len(set(answers.values())) >= 3, answers


def test_mixed_batch_gives_each_row_its_adapters_answer(aset, alone):
    rows = [(a, p) for p in PROMPTS.values() for a in (*SKILLS, None)]  # 12 rows, 4 adapters
    got = aset.generate([_chat(p) for _, p in rows], adapter=[a for a, _ in rows], options=GREEDY)
    assert [c.text for c in got] == [alone[r] for r in rows]
    assert aset.active is None  # a generate call leaves the active adapter as it was


def test_activate_disable_and_unload(skill_runs):
    aset = api.load_adapters([skill_runs["sort"], skill_runs["repeat"]])
    assert aset.names == ["sort", "repeat"]  # named after their run folders
    ids = torch.tensor([aset.encode(_chat(PROMPTS["sort"]), "sort")])

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return aset.model(input_ids=ids).logits

    base_logits = logits()  # nothing active yet: the base model
    aset.activate("sort")
    sort_logits = logits()
    alone = PeftModel.from_pretrained(
        AdapterSet("builtin:tiny-llama").model, str(skill_runs["sort"] / "adapter")
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(sort_logits, alone(input_ids=ids).logits)
    aset.activate("repeat")
    assert not torch.allclose(logits(), sort_logits)
    aset.disable()
    torch.testing.assert_close(logits(), base_logits)
    aset.activate("sort")
    aset.remove("repeat")
    assert aset.names == ["sort"] and aset.active == "sort"
    torch.testing.assert_close(logits(), sort_logits)
    with pytest.raises(ServingError, match="no adapter named 'repeat'"):
        aset.generate(["x"], adapter="repeat")
    aset.remove("sort")
    assert not isinstance(aset.model, PeftModel) and aset.active is None
    torch.testing.assert_close(logits(), base_logits)


def test_switching_does_not_walk_the_module_tree(aset, monkeypatch):
    """peft's set_adapter walks model.modules(), which grows with every adapter loaded; peftkit's
    switch touches a cached list of layers, so loading more adapters cannot slow it down."""
    walks = []
    original = torch.nn.Module.modules
    monkeypatch.setattr(torch.nn.Module, "modules", lambda self: walks.append(1) or original(self))
    for name in (*SKILLS, None, "sort"):
        aset.activate(name)
    aset.activate(None)
    assert walks == []


def test_combine_writes_a_valid_adapter_and_its_table(skill_runs, tmp_path):
    out = tmp_path / "combined"
    result = api.combine(
        {"arithmetic": skill_runs["arithmetic"], "sort": skill_runs["sort"]}, out, how="ties"
    )
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["derived_from"]["combine"] == "ties"
    assert set(manifest["derived_from"]["sources"]) == {"arithmetic", "sort"}
    loaded = AdapterSet("builtin:tiny-llama")
    loaded.add("combined", out)  # a valid adapter for this base (manifest checked)
    assert loaded.generate([_chat(PROMPTS["sort"])], adapter="combined")[0].text is not None
    assert [t.task for t in result.tasks] == ["arithmetic", "sort"]
    for task in result.tasks:
        summary = json.loads((skill_runs[task.task] / "summary.json").read_text())
        # the table's "own adapter" column is the run's own final eval loss, recomputed
        assert task.own == pytest.approx(summary["final_eval_loss"], rel=1e-4)
        assert task.own < task.base and task.combined < task.base
    assert "| arithmetic |" in (out / "combine_report.md").read_text()


def test_combine_refuses_a_single_adapter_and_unknown_methods(skill_runs, tmp_path):
    with pytest.raises(ServingError, match="at least two"):
        api.combine({"sort": skill_runs["sort"]}, tmp_path / "x")
    with pytest.raises(ServingError, match="unknown method 'average'"):
        api.combine(dict(skill_runs), tmp_path / "x", how="average")


def test_cli_generate_uses_each_adapter_in_one_batch(skill_runs, alone, capsys):
    args = ["generate", "--max-new-tokens", "24", "--json", "--use", "sort,arithmetic,base"]
    for skill in ("sort", "arithmetic"):
        args += ["--adapter", f"{skill}={skill_runs[skill]}"]
    assert main([*args, "--prompt", PROMPTS["sort"], "--prompt", PROMPTS["arithmetic"]]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["adapter"], r["prompt"]) for r in lines] == [
        (a, p)
        for p in (PROMPTS["sort"], PROMPTS["arithmetic"])
        for a in ("sort", "arithmetic", "base")
    ]
    for r in lines:
        assert r["answer"] == alone[(None if r["adapter"] == "base" else r["adapter"], r["prompt"])]


def test_cli_generate_needs_use_when_several_adapters(skill_runs, capsys):
    args = ["generate", "--prompt", "hi"]
    for skill in ("sort", "repeat"):
        args += ["--adapter", str(skill_runs[skill])]
    assert main(args) == 2
    assert "pick one with --use" in capsys.readouterr().err


def test_cli_chat_streams_and_switches_adapters(skill_runs, alone, monkeypatch, capsys):
    lines = iter([PROMPTS["sort"], "/use arithmetic", "/reset", PROMPTS["arithmetic"], "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    args = ["chat", "--max-new-tokens", "24", "--use", "sort"]
    for skill in ("sort", "arithmetic"):
        args += ["--adapter", f"{skill}={skill_runs[skill]}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert alone[("sort", PROMPTS["sort"])] + "\n" in out
    assert "using arithmetic" in out
    assert alone[("arithmetic", PROMPTS["arithmetic"])] + "\n" in out
