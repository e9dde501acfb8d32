"""report.html, `peftkit report` and the experiment trackers (output.report_to), on one tiny run
that is trained, resumed further, and exported; what the trackers wrote is read back with their
own readers, and the pages are opened in a real headless browser (Debian's chromium)."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import yaml

from peftkit import api
from peftkit.errors import PeftkitError, RecipeError
from tests.conftest import chat_rows, write_jsonl, write_recipe

TRACKERS = [
    name
    for name, module in (("tensorboard", "tensorboard"), ("wandb", "wandb"), ("mlflow", "mlflow"))
    if __import__("importlib").util.find_spec(module) is not None
]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _steps(run: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in _records(run) if key in r}


@pytest.fixture(scope="module")
def tracked_run(tiny_model, tmp_path_factory):
    """8 steps with an evaluation every 4 (eval loss, reference loss, task metric), then resumed
    to 12 steps: the trackers must append to the same runs."""
    root = tmp_path_factory.mktemp("report")
    train = write_jsonl(root / "train.jsonl", chat_rows(24))
    evals = write_jsonl(root / "eval.jsonl", chat_rows(4, seed=1))
    reference = write_jsonl(
        root / "ref.jsonl", [{"text": f"the {w} sat on the mat"} for w in "abcd"]
    )
    recipe = write_recipe(
        root / "r.yaml",
        tiny_model,
        train,
        data={"train": str(train), "eval": str(evals), "reference": str(reference)},
        train={"max_steps": 8, "eval_every": 4, "save_every": 4, "log_every": 1},
        eval={"metric": "exact", "rows": 2, "max_new_tokens": 4, "batch_size": 2},
        export={"samples": 2, "generate_tokens": 4},
        output={
            "dir": str(root / "run"),
            "plot": True,
            "report_to": TRACKERS,
            "sample_prompts": ["Repeat: red cat"],
            "sample_max_new_tokens": 4,
        },
    )
    run = root / "run"
    seen: dict[int, str] = {}

    def on_step(step: int, metrics: dict) -> None:
        if "eval_loss" in metrics:  # report.html as a user reloading it during training sees it
            seen[step] = (run / "report.html").read_text()

    api.train(recipe, on_step=on_step)
    api.train(recipe, ["train.max_steps=12"], resume=True)
    return {"run": run, "recipe": recipe, "during": seen}


def test_report_is_rewritten_at_every_evaluation_and_at_the_end(tracked_run):
    during = tracked_run["during"]
    assert sorted(during) == [4]  # the evaluation at the last step comes with the end
    assert "training: last logged step 4 " in during[4]
    final = (tracked_run["run"] / "report.html").read_text()
    assert "finished: completed at step 12" in final
    assert (tracked_run["run"] / "loss.png").is_file()  # kept beside it


# ------------------------------------------------------------------ the browser
def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no chromium on PATH (.ci/setup-tests.sh installs Debian's chromium package)")


def _browse(page: Path, work: Path, screenshot: Path | None = None) -> dict:
    """Open `page` headless: the DOM after the scripts ran, console messages, the URLs the page
    requested (from chromium's own network log; the browser's background requests left out)."""
    flags = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={work / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        f"--log-net-log={work / 'net.json'}",
        "--window-size=1200,2000",
        "--hide-scrollbars",
    ]
    flags += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    done = subprocess.run(
        [*flags, page.resolve().as_uri()], capture_output=True, text=True, timeout=120
    )
    net = json.loads((work / "net.json").read_text())
    requested = {
        e["params"]["url"]
        for e in net["events"]
        if "url" in e.get("params", {})
        and "method" in e["params"]
        and e["params"].get("initiator") != "not an origin"  # chromium's own, not the page's
    }
    console = re.findall(r":CONSOLE[^\]]*\] (.*)", done.stderr)
    return {"dom": done.stdout, "console": console, "requested": requested}


def _points(dom: str, chart: str) -> dict[str, int]:
    box = dom[dom.index(f'id="chart-{chart}"') :]
    box = box[: box.index("</svg>")]
    return {
        name: int(n) for name, n in re.findall(r'data-series="([^"]*)" data-points="(\d+)"', box)
    }


def test_report_renders_in_a_headless_browser(tracked_run, tmp_path, tmp_path_factory):
    run = tracked_run["run"]
    seen = _browse(run / "report.html", tmp_path)
    assert seen["console"] == []  # no errors, no warnings, nothing logged
    assert seen["requested"] == set()  # self-contained: nothing fetched
    dom = seen["dom"]
    assert re.search(r'<body[^>]*data-rendered="[1-9]', dom)
    loss = _points(dom, "loss")
    assert loss["train loss"] == len(_steps(run, "loss")) == 12
    assert loss["eval loss"] == len(_steps(run, "eval_loss")) == 4  # steps 0, 4, 8, 12
    assert loss["reference loss"] == len(_steps(run, "reference_loss"))
    assert _points(dom, "answers")["score"] == len(_steps(run, "answer_score"))
    assert _points(dom, "lr")["lr"] == len(_steps(run, "lr"))
    assert _points(dom, "tokens_per_s")["tokens_per_s"] == len(_steps(run, "tokens_per_s"))
    # the loss mask: each supervised stretch of the audit's first rows is one highlight
    audit = json.loads((run / "data_audit.json").read_text())
    supervised = sum(s for row in audit["rows"] for _, s in row["segments"])
    assert dom.count("<mark>") == supervised + 1  # + the legend's own example
    assert "Repeat: red cat" in dom and "Held-out answers before / after" in dom

    artifacts = Path(os.environ.get("PEFTKIT_TEST_ARTIFACTS", tmp_path_factory.getbasetemp()))
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "report.png"
    _browse(run / "report.html", tmp_path / "shot", screenshot=shot)
    assert shot.stat().st_size > 10_000
    print(f"report.html screenshot: {shot}")


# ------------------------------------------------------------------ the trackers
def test_tensorboard_event_files_hold_every_metric_at_its_step(tracked_run):
    if "tensorboard" not in TRACKERS:
        pytest.skip("tensorboard not installed (pip install 'peftkit[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tracked_run["run"]
    events = EventAccumulator(str(run / "tensorboard" / "test")).Reload()
    for key in ("loss", "eval_loss", "reference_loss", "answer_score", "lr", "tokens_per_s"):
        logged = {e.step: e.value for e in events.Scalars(key)}
        assert logged == pytest.approx(_steps(run, key), rel=1e-6), key
    assert 12 in {e.step for e in events.Scalars("loss")}  # the resumed steps, same folder


def _wandb_records(path: Path):
    """The records of a W&B .wandb file (a LevelDB-style log of wandb's protobuf Records)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunk = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += block - pos % block
            continue
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def test_wandb_offline_run_holds_the_recipe_and_every_metric(tracked_run):
    if "wandb" not in TRACKERS:
        pytest.skip("wandb not installed (pip install 'peftkit[wandb]')")
    run = tracked_run["run"]
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2  # the run and its resumption, offline, one W&B run id
    run_id = json.loads((run / "trackers.json").read_text())["wandb"]
    assert all(f.name == f"run-{run_id}.wandb" for f in files)
    history: dict[str, dict[int, float]] = {}
    config = {}
    for f in files:
        for record in _wandb_records(f):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = {"/".join(i.nested_key) or i.key: i.value_json for i in record.history.item}
                for key, value in items.items():
                    history.setdefault(key, {})[int(items["_step"])] = json.loads(value)
            elif kind == "config":
                config |= {u.key: json.loads(u.value_json) for u in record.config.update}
    assert config["train.lr"] == pytest.approx(1e-3) and config["adapter.method"] == "lora"
    for key in ("loss", "eval_loss", "reference_loss", "answer_score", "tokens_per_s"):
        assert history[key] == pytest.approx(_steps(run, key), rel=1e-6), key
    assert history["summary/peak_memory_bytes"][12] > 0


def test_mlflow_store_holds_the_recipe_and_every_metric(tracked_run):
    if "mlflow" not in TRACKERS:
        pytest.skip("mlflow not installed (pip install 'peftkit[mlflow]')")
    from mlflow.tracking import MlflowClient

    run = tracked_run["run"]
    client = MlflowClient(tracking_uri=(run / "mlruns").as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "test"]
    (logged,) = client.search_runs([experiment.experiment_id])  # resumed into the same run
    assert logged.info.run_id == json.loads((run / "trackers.json").read_text())["mlflow"]
    assert float(logged.data.params["train.lr"]) == pytest.approx(1e-3)
    for key in ("loss", "eval_loss", "reference_loss", "answer_score"):
        history = {m.step: m.value for m in client.get_metric_history(logged.info.run_id, key)}
        assert history == pytest.approx(_steps(run, key), rel=1e-6), key


def test_a_missing_tracker_package_is_named_with_its_install_command(
    monkeypatch, tiny_model, chat_file, tmp_path
):
    from peftkit.training import trackers
    from peftkit.training.run_dir import RunDir

    real = __import__("importlib").util.find_spec
    monkeypatch.setattr(
        trackers.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name)
    )
    with pytest.raises(
        RecipeError, match=r"wandb is not installed.*pip install 'peftkit\[wandb\]'"
    ):
        trackers.accelerator_kwargs(["wandb"], RunDir(tmp_path))
    assert trackers.accelerator_kwargs([], RunDir(tmp_path)) == {}
    recipe = api.validate(
        write_recipe(tmp_path / "r.yaml", tiny_model, chat_file, output={"report_to": ["wandb"]})
    )
    assert any("pip install 'peftkit[wandb]'" in note for note in api.environment_notes(recipe))


def test_report_to_rejects_an_unknown_tracker(tiny_model, chat_file, tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yaml", tiny_model, chat_file, output={"report_to": ["comet"]}
    )
    with pytest.raises(RecipeError, match=r"output\.report_to"):
        api.validate(recipe)


# ------------------------------------------------------------------ runs compared
def test_compare_page_of_a_folder_of_runs(tracked_run, tmp_path):
    """A folder of runs (as a sweep leaves): one row and one curve per run, and the recipe keys
    in which they differ."""
    sweep = tmp_path / "sweep"
    for name, lr in (("trial-000", None), ("trial-001", 5e-4)):
        folder = sweep / name
        folder.mkdir(parents=True)
        for f in ("recipe.yaml", "metrics.jsonl", "summary.json"):
            shutil.copy(tracked_run["run"] / f, folder / f)
        if lr is not None:
            recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
            recipe["train"]["lr"] = lr
            (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (sweep / "logs").mkdir()  # not a run: ignored
    page = api.report([sweep])
    assert page == sweep / "report.html"
    seen = _browse(page, tmp_path)
    assert seen["console"] == [] and seen["requested"] == set()
    train = _points(seen["dom"], "train")
    rows = len(_steps(tracked_run["run"], "loss"))
    assert train["trial-000: train loss"] == train["trial-001: train loss"] == rows
    assert "train.lr=0.0005" in seen["dom"] and "train.lr=0.001" in seen["dom"]
    # it replaces its own page, never another file
    api.report([sweep / "trial-000", sweep / "trial-001"], out=page)
    other = tmp_path / "notes.html"
    other.write_text("<p>mine</p>")
    with pytest.raises(PeftkitError, match="not a page peftkit report wrote"):
        api.report([sweep], out=other)
    assert other.read_text() == "<p>mine</p>"
    with pytest.raises(PeftkitError, match="neither a run directory"):
        api.report([sweep / "logs"])


def test_cli_report_rewrites_a_runs_page(tracked_run, capsys):
    from peftkit.cli import main

    page = tracked_run["run"] / "report.html"
    page.unlink()
    assert main(["report", str(tracked_run["run"])]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {page}"
    assert "finished: completed at step 12" in page.read_text()


def test_export_adds_its_fidelity_to_the_runs_report(tracked_run, tmp_path):
    out = tmp_path / "export"
    report = api.export(tracked_run["run"], out, dtype="float32")
    page = (tracked_run["run"] / "report.html").read_text()
    assert "Exports and their fidelity" in page and str(out) in page
    assert ("passed" if report["passed"] else "failed") in page
    assert f"{report['fidelity']['greedy_agreement']:.4g}" in page
