"""Bad input stops with a clear error before anything is written, and an existing run survives."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml

from peftkit.cli import main
from tests.conftest import chat_rows, fingerprint, write_jsonl, write_recipe


@pytest.fixture
def existing_run(tmp_path, tiny_model, chat_file):
    recipe = write_recipe(
        tmp_path / "good.yaml", tiny_model, chat_file, train={"max_steps": 2, "save_every": 1}
    )
    assert main(["train", str(recipe)]) == 0
    return tmp_path / "run"


def _bad(tmp_path, tiny_model, chat_file):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    malformed = tmp_path / "bad.jsonl"
    malformed.write_text(json.dumps(chat_rows(1)[0]) + "\n{not json}\n")
    users_only = write_jsonl(
        tmp_path / "users.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 4
    )
    return {
        "unknown key": (
            {"train": {"lrr": 1e-3}},
            chat_file,
            r"train\.lrr: unknown key\. Did you mean 'train\.lr'",
        ),
        "wrong type": (
            {"train": {"micro_batch_size": "four"}},
            chat_file,
            r"train\.micro_batch_size: Input should be a valid integer",
        ),
        "unknown method": (
            {"adapter": {"method": "lorra"}},
            chat_file,
            r"unknown method 'lorra'\. Did you mean 'lora'",
        ),
        "qlora unquantized": (
            {"adapter": {"method": "qlora"}},
            chat_file,
            r"'qlora' needs a quantized base",
        ),
        "fp16 on cpu": ({"train": {"precision": "fp16"}}, chat_file, r"fp16 needs a GPU"),
        "missing file": ({}, tmp_path / "missing.jsonl", r"data file not found: .*missing\.jsonl"),
        "malformed line": ({}, malformed, r"bad\.jsonl line 2: not valid JSON"),
        "empty dataset": ({}, empty, r"empty\.jsonl: the dataset is empty"),
        "no supervised tokens": ({}, users_only, r"no train row has any supervised token"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "unknown key",
        "wrong type",
        "unknown method",
        "qlora unquantized",
        "fp16 on cpu",
        "missing file",
        "malformed line",
        "empty dataset",
        "no supervised tokens",
    ],
)
def test_bad_input_is_a_clear_error_and_the_run_directory_survives(
    case, tmp_path, tiny_model, chat_file, existing_run, capsys
):
    before = fingerprint(existing_run)
    sections, data, message = _bad(tmp_path, tiny_model, chat_file)[case]
    sections = {**sections, "output": {"dir": str(existing_run), "overwrite": True, "plot": False}}
    recipe = write_recipe(tmp_path / "bad.yaml", tiny_model, data, **sections)
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert __import__("re").search(message, err), err
    assert fingerprint(existing_run) == before


def test_existing_run_directory_is_not_overwritten_by_default(
    tmp_path, tiny_model, chat_file, existing_run, capsys
):
    before = fingerprint(existing_run)
    recipe = write_recipe(
        tmp_path / "again.yaml", tiny_model, chat_file, output={"dir": str(existing_run)}
    )
    assert main(["train", str(recipe)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert fingerprint(existing_run) == before


def test_nan_loss_stops_with_advice_and_keeps_the_last_good_checkpoint(
    tmp_path, tiny_model, chat_file, capsys, monkeypatch
):
    from peftkit.objectives import causal_lm as objective

    real, calls = objective.causal_lm_loss_sum, []

    def diverging(model, batch, *args):  # the loss of the 4th micro-batch (step 4) becomes NaN
        calls.append(1)
        loss = real(model, batch, *args)
        return loss * float("nan") if len(calls) >= 4 else loss

    monkeypatch.setattr(objective, "causal_lm_loss_sum", diverging)
    recipe = write_recipe(
        tmp_path / "nan.yaml",
        tiny_model,
        chat_file,
        train={"max_steps": 6, "save_every": 2, "keep_last": 1},
    )
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "loss became nan at step 4" in err and "lower train.lr" in err
    assert "last good checkpoint is" in err and "step-0000002" in err
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert [c.name for c in checkpoints] == ["step-0000002"] and (
        checkpoints[0] / "state.json"
    ).exists()
    assert not (tmp_path / "run" / "adapter").exists()


# ---------------------------------------------------------------------------------------------
# The bad-input catalogue: each case is one way a user (or a disk) gets it wrong. Every case
# asserts the exit code, that the message names the culprit (file and line, key, folder, flag),
# that no traceback is shown, and that nothing that existed before (a finished run, its data and
# base model) changed. Recipe cases run `peftkit validate`; data cases stop before the model loads.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tiny_model, finished_run):
    """A finished run with checkpoints, its data and recipe: what no bad input may change."""
    root = finished_run.parent
    return {
        "root": root,
        "run": finished_run,
        "data": root / "train.jsonl",
        "recipe": root / "r.yaml",
        "model": tiny_model,
    }


GOOD = (
    "model:\n  name: {model}\nadapter:\n  method: lora\ndata:\n  train: {data}\n"
    "output:\n  dir: {out}\n"
)


def _recipe_text(w, tmp, extra="", **fmt):
    values = {"model": w["model"], "data": w["data"], "out": tmp / "out", **fmt}
    return GOOD.format(**values) + extra


def _validate(extra="", **fmt):
    """A `peftkit validate` case of a recipe with `extra` YAML appended."""

    def build(w, tmp):
        path = tmp / "recipe.yaml"
        path.write_text(_recipe_text(w, tmp, extra, **fmt))
        return ["validate", str(path)]

    return build


def _override(*items):
    def build(w, tmp):
        path = tmp / "recipe.yaml"
        path.write_text(_recipe_text(w, tmp))
        return ["validate", str(path), *items]

    return build


def _raw_recipe(text):
    def build(w, tmp):
        path = tmp / "recipe.yaml"
        path.write_text(text)
        return ["validate", str(path)]

    return build


def _train_on(name, content, **sections):
    """A `peftkit train` case on a data file `name` holding `content` (bytes or str)."""

    def build(w, tmp):
        data = tmp / name
        (data.write_bytes if isinstance(content, bytes) else data.write_text)(content)
        path = write_recipe(tmp / "r.yaml", w["model"], data, **sections)
        return ["train", str(path)]

    return build


def _train(resume=False, **sections):
    def build(w, tmp):
        filled = _fill(sections, w, tmp)
        argv = ["train", str(write_recipe(tmp / "r.yaml", w["model"], w["data"], **filled))]
        return argv + (["--resume"] if resume else [])

    return build


def _train_model(damage):
    """A `peftkit train` case on a copy of the base model damaged by `damage(folder)`."""

    def build(w, tmp):
        model = tmp / "model"
        shutil.copytree(w["model"], model)
        damage(model)
        return ["train", str(write_recipe(tmp / "r.yaml", model, w["data"]))]

    return build


def _resume(*overrides, prepare=None):
    """A `peftkit train --resume` case on a copy of the finished run."""

    def build(w, tmp):
        run = tmp / "run"
        shutil.copytree(w["run"], run)
        data = tmp / "train.jsonl"
        shutil.copy(w["data"], data)
        recipe = write_recipe(
            tmp / "r.yaml", w["model"], data, train={"max_steps": 2, "save_every": 1}
        )
        saved = yaml.safe_load((run / "recipe.yaml").read_text())
        saved["data"]["train"][0]["path"] = str(data)  # the copy trains on the copied data
        (run / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
        inputs = (run / "inputs.json").read_text().replace(str(w["data"]), str(data))
        (run / "inputs.json").write_text(inputs)
        if prepare:
            prepare(run, data)
        return ["train", str(recipe), *overrides, "--resume"]

    return build


def _export(*args, out=None):
    def build(w, tmp):
        target = out(w, tmp) if out else tmp / "export"
        return ["export", str(w["run"]), "--out", str(target), *args]

    return build


def _cli(*argv):
    def build(w, tmp):
        return [a.format(run=w["run"], tmp=tmp, model=w["model"]) for a in argv]

    return build


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _non_utf8_jsonl():
    good = json.dumps(chat_rows(1)[0]).encode()
    return good + b"\n" + good.replace(b"Repeat", b"R\xe9peat") + b"\n"


def _copy_run_and(change):
    """An export case on a copy of the run altered by `change(run)`."""

    def build(w, tmp):
        run = tmp / "run"
        shutil.copytree(w["run"], run)
        change(run)
        return ["export", str(run), "--out", str(tmp / "export")]

    return build


def _folder_with(name, text):
    def out(w, tmp):
        folder = tmp / "mine"
        folder.mkdir()
        (folder / name).write_text(text)
        return folder

    return out


def _write(path, text):
    path.write_text(text)


def _serve_dir(damage=None, name="mine"):
    """A `peftkit serve` case on an adapters folder holding a junk folder and, with `damage`,
    a damaged copy of the run's adapter (or, with another `name`, an intact one)."""

    def build(w, tmp):
        folder = tmp / "adapters"
        (folder / "junk").mkdir(parents=True)
        if damage or name != "mine":
            shutil.copytree(w["run"] / "adapter", folder / name)
        if damage:
            damage(folder / name)
        return ["serve", "--adapters-dir", str(folder), "--port", "0"]

    return build


def _edit_run_recipe(edit):
    """`edit(text) -> text` of a copied run's recipe.yaml."""

    def change(run):
        (run / "recipe.yaml").write_text(edit((run / "recipe.yaml").read_text()))

    return change


def _trusting(text):
    return text.replace("trust_remote_code: false", "trust_remote_code: true")


def _resume_trusting(w, tmp):
    """`peftkit train RUN/recipe.yaml --resume` of a run sent from elsewhere that trusts its
    model's code (the copy's recipe points at the copy)."""
    run = tmp / "run"
    shutil.copytree(w["run"], run)
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    saved["output"]["dir"] = str(run)
    saved["model"]["trust_remote_code"] = True
    (run / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    return ["train", str(run / "recipe.yaml"), "--resume"]


def _adapter_copy(damage):
    """`peftkit generate` with a copy of the run's adapter damaged by `damage(folder)`."""

    def build(w, tmp):
        adapter = tmp / "adapter"
        shutil.copytree(w["run"] / "adapter", adapter)
        damage(adapter)
        return ["generate", "--adapter", f"a={adapter}", "--prompt", "hi"]

    return build


PAIRS = "".join(
    json.dumps({"prompt": f"Order {i}?", "chosen": f"Sure, order {i}.", "rejected": "No."}) + "\n"
    for i in range(8)
)


# id: (build(world, tmp) -> argv, exit code, regex the message must match)
CATALOGUE = {
    # ---- recipe: keys, types, values
    "recipe: unknown key": (
        _validate("train:\n  lrr: 1\n"),
        2,
        r"train\.lrr: unknown key\. Did you mean 'train\.lr'",
    ),
    "recipe: alias of another toolkit": (
        _validate("train:\n  learning_rate: 1\n"),
        2,
        r"Did you mean 'train\.lr'",
    ),
    "recipe: unknown section": (
        _validate("trian:\n  lr: 1\n"),
        2,
        r"trian: unknown key\. Did you mean 'train'",
    ),
    "recipe: wrong type": (
        _validate("train:\n  micro_batch_size: four\n"),
        2,
        r"train\.micro_batch_size: Input should be a valid integer",
    ),
    "recipe: negative lr": (
        _validate("train:\n  lr: -1\n"),
        2,
        r"train\.lr: Input should be greater than 0",
    ),
    "recipe: zero micro batch": (
        _validate("train:\n  micro_batch_size: 0\n"),
        2,
        r"train\.micro_batch_size: Input should be greater than 0",
    ),
    "recipe: keep_last 0": (_validate("train:\n  keep_last: 0\n"), 2, r"train\.keep_last"),
    "recipe: eval_fraction too large": (
        _override("data.eval_fraction=0.7"),
        2,
        r"data\.eval_fraction: Input should be less than 0\.5",
    ),
    "recipe: bad precision": (_validate("train:\n  precision: fp8\n"), 2, r"train\.precision"),
    "recipe: bad loss_on": (_override("data.loss_on=everything"), 2, r"data\.loss_on"),
    "recipe: unknown method": (
        _override("adapter.method=lorra"),
        2,
        r"unknown method 'lorra'\. Did you mean 'lora'",
    ),
    "recipe: lora rank 0": (_override("adapter.r=0"), 2, r"adapter\.r"),
    "recipe: qlora without quantization": (
        _override("adapter.method=qlora"),
        2,
        r"'qlora' needs a quantized base",
    ),
    "recipe: bad export dtype": (_validate("export:\n  dtype: int3\n"), 2, r"export\.dtype"),
    "recipe: garbage max_shard_size": (
        _validate("export:\n  max_shard_size: lots\n"),
        2,
        r"export\.max_shard_size: 'lots' is not a size",
    ),
    "recipe: builtin typo": (
        _override("model.name=builtin:tiny-lama"),
        2,
        r"unknown built-in model 'builtin:tiny-lama'\. Did you mean 'builtin:tiny-llama'",
    ),
    "recipe: one class label": (
        _validate("task:\n  type: classification\n  labels: [a]\n"),
        2,
        r"task\.labels: a classifier needs at least two labels",
    ),
    # ---- recipe: security switches and YAML
    "recipe: trust_remote_code 'yes'": (
        _override("model.trust_remote_code='yes'"),
        2,
        r"model\.trust_remote_code: Input should be a valid boolean",
    ),
    "recipe: trust_remote_code on": (
        _raw_recipe(
            "model:\n  name: m\n  trust_remote_code: on\nadapter:\n  method: lora\ndata:\n  train: d.jsonl\n"
        ),
        2,
        r"model\.trust_remote_code: Input should be a valid boolean \(got 'on'\)",
    ),
    "recipe: trust_remote_code 1": (
        _override("model.trust_remote_code=1"),
        2,
        r"model\.trust_remote_code: Input should be a valid boolean",
    ),
    "recipe: overwrite yes": (
        _override("output.overwrite=yes"),
        2,
        r"output\.overwrite: Input should be a valid boolean",
    ),
    "recipe: duplicate key": (
        _validate("train:\n  lr: 1e-4\n  lr: 1e-3\n"),
        2,
        r"'lr' is given twice in the same section \(lines 10 and 11\)",
    ),
    "recipe: duplicate section": (
        _validate("data:\n  train: x.jsonl\n"),
        2,
        r"'data' is given twice in the same section \(lines 5 and 9\)",
    ),
    "recipe: bad YAML": (_validate("train: [unclosed\n"), 2, r"recipe\.yaml: not valid YAML"),
    "recipe: a list, not a mapping": (
        _raw_recipe("- model\n- data\n"),
        2,
        r"recipe\.yaml: a recipe is a mapping of sections",
    ),
    "recipe: empty": (_raw_recipe(""), 2, r"model: required, missing"),
    "recipe: file missing": (
        _cli("validate", "{tmp}/nowhere.yaml"),
        2,
        r"recipe file not found: .*nowhere\.yaml",
    ),
    "recipe: override without =": (
        _override("train.lr"),
        2,
        r"override 'train\.lr' is not of the form section\.key=value",
    ),
    "recipe: override into a value": (
        _override("model.name.x=1"),
        2,
        r"override 'model\.name\.x=1': 'name' is not a section",
    ),
    "recipe: override bad YAML": (
        _override("train.lr=[1"),
        2,
        r"override 'train\.lr=\[1': value is not valid YAML",
    ),
    # ---- data
    "data: missing file": (
        _train(data={"train": "/nowhere/missing.jsonl"}),
        2,
        r"data file not found: /nowhere/missing\.jsonl",
    ),
    "data: malformed JSON line": (
        _train_on("bad.jsonl", json.dumps(chat_rows(1)[0]) + "\n{not json}\n"),
        2,
        r"bad\.jsonl line 2: not valid JSON",
    ),
    "data: a line that is a list": (
        _train_on("list.jsonl", json.dumps(chat_rows(1)[0]) + "\n[1, 2]\n"),
        2,
        r"list\.jsonl line 2: expected a JSON object, got list",
    ),
    "data: empty file": (_train_on("empty.jsonl", ""), 2, r"empty\.jsonl: the dataset is empty"),
    "data: non-UTF-8 jsonl": (
        _train_on("latin1.jsonl", _non_utf8_jsonl()),
        2,
        r"latin1\.jsonl line 2: not UTF-8 text \(byte 0xe9 at column \d+\)",
    ),
    "data: non-UTF-8 csv": (
        _train_on("latin1.csv", b"prompt,completion\nhi,ok\ncaf\xe9,ok\n"),
        2,
        r"latin1\.csv line 3: not UTF-8 text \(byte 0xe9 at column 4\)",
    ),
    "data: non-UTF-8 json": (
        _train_on("latin1.json", b'[{"text": "caf\xe9"}]'),
        2,
        r"latin1\.json line 1: not UTF-8 text",
    ),
    "data: JSON that is not an array": (
        _train_on("obj.json", '{"rows": 1}'),
        2,
        r"obj\.json: expected a JSON array of rows",
    ),
    "data: unsupported file type": (
        _train_on("notes.txt", "hello\n"),
        2,
        r"notes\.txt: unsupported file type '\.txt'",
    ),
    "data: csv row with extra fields": (
        _train_on("extra.csv", "prompt,completion\na,b,c\n"),
        2,
        r"extra\.csv line 2: more fields than the header has",
    ),
    "data: no supervised tokens": (
        _train_on(
            "users.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
        ),
        2,
        r"no train row has any supervised token",
    ),
    "data: json_fields metric on answers that are not JSON": (
        _train(eval={"metric": "json_fields"}, data={"eval_fraction": 0.2}),
        2,
        r"train\.jsonl line \d+: eval\.metric json_fields cannot score this row's reference "
        r"answer: it is not JSON",
    ),
    "data: DPO with json_fields on answers that are not JSON": (
        _train_on(
            "prefs.jsonl",
            PAIRS,
            objective={"type": "dpo"},
            eval={"metric": "json_fields"},
            data={"eval_fraction": 0.25},
        ),
        2,
        r"prefs\.jsonl line \d+: eval\.metric json_fields cannot score this row's reference answer",
    ),
    "data: missing chat template file": (
        _train(data={"chat_template": "/nowhere/t.jinja"}),
        2,
        r"data\.chat_template: no such template file: /nowhere/t\.jinja",
    ),
    # ---- model
    "model: truncated model.safetensors": (
        _train_model(lambda m: _truncate(m / "model.safetensors")),
        2,
        r"damaged or truncated weights file .*model\.safetensors",
    ),
    "model: garbage model.safetensors": (
        _train_model(lambda m: _write(m / "model.safetensors", "not weights")),
        2,
        r"damaged or truncated weights file .*model\.safetensors",
    ),
    "model: missing folder": (
        _train(model={"name": "/nowhere/model"}),
        2,
        r"/nowhere/model: no such folder \(written as a local path, so not looked up",
    ),
    "model: missing relative folder": (
        _train(model={"name": "./nowhere/model"}),
        2,
        r"\./nowhere/model: no such folder",
    ),
    "model: generate --base that does not exist": (
        _cli("generate", "--base", "{tmp}/nowhere", "--prompt", "hi"),
        2,
        r"nowhere: no such folder",
    ),
    # ---- run directory and resume
    "run: output.dir is a file": (_train(output={"dir": "{file}"}), 2, r"is a file, not a folder"),
    "run: exists, no overwrite": (
        lambda w, tmp: ["train", str(w["recipe"])],
        2,
        r"run directory .*run already exists and is not empty",
    ),
    "run: overwrite of a folder that is not a run": (
        _train(output={"dir": "{mine}", "overwrite": True}),
        2,
        r"is not a previous peftkit run \(no recipe\.yaml",
    ),
    "run: data inside output.dir": (
        _train(output={"dir": "{data_parent}", "overwrite": True}),
        2,
        r"contains the input .*train\.jsonl",
    ),
    "run: resume without a run": (
        _train(output={"dir": "{empty}"}, resume=True),
        2,
        r"holds no run to resume \(no recipe\.yaml\)",
    ),
    "run: resume with another recipe": (
        _resume("adapter.r=4"),
        2,
        r"the recipe differs .* in adapter\.r",
    ),
    "run: resume on changed data": (
        _resume(prepare=lambda run, data: write_jsonl(data, chat_rows(24, seed=9))),
        2,
        r"data file .*train\.jsonl has other contents",
    ),
    "run: resume, every checkpoint damaged": (
        _resume(
            prepare=lambda run, data: [
                _truncate(c / "trainable.safetensors") for c in (run / "checkpoints").glob("step-*")
            ]
        ),
        2,
        r"no intact checkpoint to resume from \(checkpoint .*step-0000002 is damaged: trainable\.safetensors cannot be read",
    ),
    "run: export of a run that trusts its model's code": (
        _copy_run_and(_edit_run_recipe(_trusting)),
        2,
        r"recipe\.yaml: model\.trust_remote_code is true: reading this run would run the Python "
        r"code .* Pass --trust-remote-code",
    ),
    "run: export of a run whose recipe says trust_remote_code: on": (
        _copy_run_and(
            _edit_run_recipe(
                lambda t: t.replace("trust_remote_code: false", "trust_remote_code: on")
            )
        ),
        2,
        r"model\.trust_remote_code: Input should be a valid boolean \(got 'on'\)",
    ),
    "run: export of a run recipe with a duplicate section": (
        _copy_run_and(_edit_run_recipe(lambda t: t + "model:\n  name: other\n")),
        2,
        r"'model' is given twice in the same section",
    ),
    "run: resume of a run that trusts its model's code": (
        _resume_trusting,
        2,
        r"model\.trust_remote_code is true: .* Pass --trust-remote-code",
    ),
    # ---- export
    "export: truncated adapter weights": (
        _copy_run_and(lambda run: _truncate(run / "adapter" / "adapter_model.safetensors")),
        2,
        r"damaged or truncated weights file .*adapter/adapter_model\.safetensors \(",
    ),
    "export: --out is the run": (
        _export("--overwrite", out=lambda w, tmp: w["run"]),
        2,
        r"the output folder .*run is the input .*run",
    ),
    "export: --out inside the run": (
        _export("--overwrite", out=lambda w, tmp: w["run"] / "checkpoints"),
        2,
        r"is inside the input .*run",
    ),
    "export: --out holds the run": (
        _export("--overwrite", out=lambda w, tmp: w["root"]),
        2,
        r"contains the input .*run",
    ),
    "export: --out is the base model": (
        _export("--overwrite", out=lambda w, tmp: w["model"]),
        2,
        r"is the input",
    ),
    "export: --out not empty": (
        _export(out=_folder_with("notes.txt", "mine")),
        2,
        r"mine already exists and is not empty: .*pass --overwrite",
    ),
    "export: --overwrite of a non-export": (
        _export("--overwrite", out=_folder_with("notes.txt", "mine")),
        2,
        r"mine is not a previous peftkit export \(no fidelity\.json",
    ),
    "export: --max-shard-size garbage": (
        _export("--max-shard-size", "lots"),
        2,
        r"--max-shard-size: 'lots' is not a size",
    ),
    "export: --target without --adapter-only": (
        _export("--target", "vllm"),
        2,
        r"--target checks adapter-only exports",
    ),
    "export: no such run": (
        _cli("export", "{tmp}/nowhere", "--out", "{tmp}/x"),
        2,
        r"nothing to export at .*nowhere: no such folder",
    ),
    "export: not a run": (
        _cli("export", "{model}", "--out", "{tmp}/x"),
        2,
        r"is not a peftkit run directory \(no recipe\.yaml",
    ),
    "export: unfinished run": (
        _copy_run_and(lambda run: (run / "peftkit.json").unlink()),
        2,
        r"has no peftkit\.json: the run did not finish",
    ),
    "export: adapter weights missing": (
        _copy_run_and(lambda run: (run / "adapter" / "adapter_model.safetensors").unlink()),
        2,
        r"adapter is incomplete or corrupted: missing adapter_model\.safetensors",
    ),
    # ---- command-line arguments (argparse: exit 2 and the flag named)
    "cli: --max-new-tokens -5": (
        _cli("generate", "--adapter", "a={run}", "--prompt", "hi", "--max-new-tokens", "-5"),
        2,
        r"argument --max-new-tokens: must be >= 1 \(got -5\)",
    ),
    "cli: --max-new-tokens x": (
        _cli("generate", "--adapter", "a={run}", "--prompt", "hi", "--max-new-tokens", "x"),
        2,
        r"argument --max-new-tokens: 'x' is not a whole number",
    ),
    "cli: --top-p 2": (
        _cli("generate", "--prompt", "hi", "--top-p", "2"),
        2,
        r"argument --top-p: must be > 0\.0 and <= 1\.0",
    ),
    "cli: --temperature -1": (
        _cli("chat", "--temperature", "-1"),
        2,
        r"argument --temperature: must be >= 0\.0",
    ),
    "cli: --temperature nan": (
        _cli("chat", "--temperature", "nan"),
        2,
        r"argument --temperature: must be >= 0\.0",
    ),
    "cli: serve --max-queue 0": (
        _cli("serve", "--adapters-dir", "{tmp}", "--max-queue", "0"),
        2,
        r"argument --max-queue: must be >= 1",
    ),
    "cli: serve --port 70000": (
        _cli("serve", "--adapters-dir", "{tmp}", "--port", "70000"),
        2,
        r"argument --port: must be >= 0 and <= 65535",
    ),
    "cli: serve --max-new-tokens 0": (
        _cli("serve", "--adapters-dir", "{tmp}", "--max-new-tokens", "0"),
        2,
        r"argument --max-new-tokens: must be >= 1",
    ),
    "cli: serve --batch-wait-ms -1": (
        _cli("serve", "--adapters-dir", "{tmp}", "--batch-wait-ms", "-1"),
        2,
        r"argument --batch-wait-ms: must be >= 0\.0 \(got -1\)",
    ),
    "cli: generate --quantize 3": (
        _cli("generate", "--prompt", "hi", "--quantize", "3"),
        2,
        r"argument --quantize: invalid choice: '3'",
    ),
    "cli: sweep --trials 0": (
        _cli("sweep", "r.yaml", "--space", "s.yml", "--trials", "0"),
        2,
        r"argument --trials: must be >= 1",
    ),
    "cli: sweep without --space": (
        _cli("sweep", "r.yaml", "--trials", "2"),
        2,
        r"the following arguments are required: --space",
    ),
    "cli: combine --density 1.5": (
        _cli("combine", "--out", "{tmp}/c", "--density", "1.5"),
        2,
        r"argument --density: must be > 0\.0 and <= 1\.0",
    ),
    "cli: combine --weights x,y": (
        _cli(
            "combine",
            "--adapter",
            "a={run}",
            "--adapter",
            "b={run}",
            "--out",
            "{tmp}/c",
            "--how",
            "linear",
            "--weights",
            "x,y",
        ),
        2,
        r"argument --weights: 'x' is not a number",
    ),
    "cli: combine --weights 1,nan": (
        _cli("combine", "--out", "{tmp}/c", "--weights", "1,nan"),
        2,
        r"argument --weights: '1,nan': every weight must be a finite number",
    ),
    "cli: serve --special-tokens-in-content strip": (
        _cli("serve", "--adapters-dir", "{tmp}", "--special-tokens-in-content", "strip"),
        2,
        r"argument --special-tokens-in-content: invalid choice: 'strip'",
    ),
    "cli: unknown verb": (_cli("trian", "r.yaml"), 2, r"invalid choice: 'trian'"),
    "cli: export without --out": (
        _cli("export", "{run}"),
        2,
        r"the following arguments are required: --out",
    ),
    # ---- serve (refused before the server starts)
    "serve: no such adapters folder": (
        _cli("serve", "--adapters-dir", "{tmp}/nowhere"),
        2,
        r"adapters directory .*nowhere does not exist",
    ),
    "serve: folder without adapters": (
        _serve_dir(),
        2,
        # the error, and the warning naming the sub-folder skipped (in any order)
        r"(?=.*no adapters in .*adapters \(expected one sub-folder per adapter\))"
        r"(?=.*skipping .*adapters/junk: no adapter at)",
    ),
    "serve: damaged adapter_config.json": (
        _serve_dir(lambda a: _write(a / "adapter_config.json", "{not json")),
        2,
        r"adapter_config\.json is damaged \(not JSON.*the folder .*adapters/mine",
    ),
    "serve: bad served name": (
        _serve_dir(name="my adapter"),
        2,
        r"my adapter: folder names are the served model names",
    ),
    "serve: truncated adapter weights": (
        _serve_dir(lambda a: _truncate(a / "adapter_model.safetensors")),
        2,
        r"adapter 'mine': damaged or truncated weights file .*mine/adapter_model\.safetensors",
    ),
    "serve: a public address without an API key": (
        _cli("serve", "--adapters-dir", "{tmp}", "--host", "0.0.0.0"),
        2,
        r"refusing to serve on 0\.0\.0\.0 without an API key: .*--insecure-no-auth",
    ),
    "serve: --api-key-file missing": (
        _cli("serve", "--adapters-dir", "{tmp}", "--api-key-file", "{tmp}/nowhere"),
        2,
        r"--api-key-file: no such file: .*nowhere",
    ),
    "serve: empty --api-key-file": (
        lambda w, tmp: (
            _write(tmp / "key", "\n")
            or ["serve", "--adapters-dir", str(tmp), "--api-key-file", str(tmp / "key")]
        ),
        2,
        r"--api-key-file: .*key is empty",
    ),
    "serve: --api-key and --api-key-file": (
        _cli("serve", "--adapters-dir", "{tmp}", "--api-key", "k", "--api-key-file", "{tmp}/k"),
        2,
        r"give --api-key or --api-key-file, not both",
    ),
    # ---- adapters
    "adapters: generate with a truncated adapter": (
        _adapter_copy(lambda a: _truncate(a / "adapter_model.safetensors")),
        2,
        r"adapter 'a': damaged or truncated weights file .*adapter_model\.safetensors",
    ),
    "adapters: generate with no adapter there": (
        _cli("generate", "--adapter", "a={tmp}/nowhere", "--prompt", "hi"),
        2,
        r"no adapter at .*nowhere",
    ),
    "adapters: combine one adapter": (
        _cli("combine", "--adapter", "a={run}", "--out", "{tmp}/c"),
        2,
        r"combine: give at least two adapters",
    ),
    "adapters: combine unknown how": (
        _cli(
            "combine",
            "--adapter",
            "a={run}",
            "--adapter",
            "b={run}",
            "--out",
            "{tmp}/c",
            "--how",
            "average",
        ),
        2,
        r"combine: unknown method 'average'",
    ),
    "adapters: combine into a source": (
        _cli(
            "combine",
            "--adapter",
            "a={run}",
            "--adapter",
            "b={run}",
            "--out",
            "{run}/adapter",
            "--overwrite",
            "--no-eval",
        ),
        2,
        r"the output folder .*adapter is inside the input .*run",
    ),
}


def _fill(sections, w, tmp):
    """Placeholders of `_train` sections that need the case's folders."""
    mine = tmp / "mine"
    mine.mkdir(exist_ok=True)
    (mine / "thesis.tex").write_text("years of work")
    (tmp / "a-file").write_text("")
    (tmp / "empty").mkdir(exist_ok=True)
    values = {
        "file": tmp / "a-file",
        "mine": mine,
        "data_parent": w["root"],
        "empty": tmp / "empty",
    }
    return {
        k: {kk: str(vv).format(**values) if isinstance(vv, str) else vv for kk, vv in v.items()}
        if isinstance(v, dict)
        else v
        for k, v in sections.items()
    }


@pytest.mark.parametrize("case", list(CATALOGUE))
def test_bad_input_catalogue(case, world, tmp_path, capsys, caplog):
    build, code, message = CATALOGUE[case]
    argv = build(world, tmp_path)
    before = fingerprint(world["root"]), fingerprint(world["model"])
    try:
        got = main(argv)
    except SystemExit as e:  # argparse refuses before any verb runs
        got = e.code
    captured = capsys.readouterr()
    err = captured.err + captured.out + caplog.text  # the library's warnings are logged
    assert got == code, err
    assert "Traceback" not in err
    assert re.search(message, err, re.DOTALL), err
    assert "loading the trained model" not in err  # export refuses before loading anything
    assert (fingerprint(world["root"]), fingerprint(world["model"])) == before


def test_the_catalogue_is_large():
    assert len(CATALOGUE) >= 100
