"""The prompt an adapter was trained on is the prompt it is served and exported with: a run trained
with data.system_prompt, served without a system message through the official openai client on
loopback, answers as the run's own evaluation did; its exports' chat templates render the
training system prompt by default; a run without one behaves as before."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from peftkit import api
from peftkit.io import MANIFEST
from tests.conftest import write_jsonl

SYSTEM = "Repeat the words after the colon, exactly as written."
ROOT = Path(__file__).resolve().parents[2]
EVAL_ROWS = 6
MAX_TOKENS = 12


def _without_system(src: Path, out: Path, limit: int) -> Path:
    rows = [json.loads(line) for line in src.read_text().splitlines()[:limit]]
    for row in rows:
        row["messages"] = [m for m in row["messages"] if m["role"] != "system"]
    return write_jsonl(out, rows)


def _train(root: Path, name: str, system: str | None) -> Path:
    data = ROOT / "recipes" / "data"
    train = _without_system(data / "skill-repeat-train.jsonl", root / f"{name}-train.jsonl", 96)
    evals = _without_system(data / "skill-repeat-eval.jsonl", root / f"{name}-eval.jsonl", 12)
    overrides = [
        f"output.dir={root / name}",
        f"data.train={train}",
        f"data.eval={evals}",
        f"data.max_eval_rows={EVAL_ROWS}",
        "train.max_steps=12",
        "train.eval_every=null",
        "output.plot=false",
        "output.sample_prompts=[]",
        "eval.metric=exact",
        f"eval.rows={EVAL_ROWS}",
        f"eval.max_new_tokens={MAX_TOKENS}",
    ]
    if system is not None:
        overrides.append(f"data.system_prompt={json.dumps(system)}")
    api.train(ROOT / "recipes" / "tiny-llama" / "adapters" / "repeat.yaml", overrides)
    return root / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two short runs on builtin:tiny-llama: one with data.system_prompt, one without."""
    root = tmp_path_factory.mktemp("prompted")
    return {"prompted": _train(root, "prompted", SYSTEM), "plain": _train(root, "plain", None)}


def _user_turns(run: Path) -> list[str]:
    rows = (run.parent / f"{run.name}-eval.jsonl").read_text().splitlines()[:EVAL_ROWS]
    return [json.loads(r)["messages"][0]["content"] for r in rows]


def test_the_manifest_records_the_training_rendering(runs):
    manifest = json.loads((runs["prompted"] / "adapter" / MANIFEST).read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(runs["prompted"] / "adapter"))
    assert manifest["prompt"] == {
        "chat_template": tokenizer.chat_template,
        "chat_template_source": "tokenizer",
        "system_prompt": SYSTEM,
        "system_turns": "one",
        "chat_template_kwargs": {},  # the template variables training rendered with: none here
    }
    plain = json.loads((runs["plain"] / "adapter" / MANIFEST).read_text())["prompt"]
    assert plain["system_prompt"] is None and plain["system_turns"] == "none"


def test_the_openai_client_without_a_system_message_gets_the_runs_own_answers(runs, tmp_path):
    from openai import OpenAI

    served = tmp_path / "served"
    served.mkdir()
    for name, run in runs.items():
        (served / name).symlink_to(run, target_is_directory=True)
    server = api.serve(served, host="127.0.0.1", port=0, served_base_name="tiny", block=False)
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        defaults = {m.id: m.model_extra["default_system_prompt"] for m in client.models.list()}
        assert defaults == {"tiny": None, "plain": None, "prompted": SYSTEM}
        own = [r["after"] for r in json.loads((runs["prompted"] / "answers.json").read_text())]
        tokenizer = AutoTokenizer.from_pretrained(str(runs["prompted"] / "adapter"))

        def ask(text: str, model: str = "prompted", system: str | None = None, **extra):
            messages = [{"role": "system", "content": system}] if system else []
            return client.chat.completions.create(
                model=model,
                messages=[*messages, {"role": "user", "content": text}],
                temperature=0,
                max_tokens=MAX_TOKENS,
                extra_body=extra or None,
            )

        def tokens(messages: list[dict]) -> int:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

        users = _user_turns(runs["prompted"])
        answers = [ask(u).choices[0].message.content.strip() for u in users]
        assert answers == [a.strip() for a in own]  # as the run's own evaluation answered
        user = [{"role": "user", "content": users[0]}]
        system = [{"role": "system", "content": SYSTEM}]
        mine = [{"role": "system", "content": "Be brief."}]
        assert ask(users[0]).usage.prompt_tokens == tokens(system + user)
        assert ask(users[0], default_system=False).usage.prompt_tokens == tokens(user)
        assert ask(users[0], system="Be brief.").usage.prompt_tokens == tokens(mine + user)
        assert ask(users[0], model="plain").usage.prompt_tokens == tokens(user)  # as before
    finally:
        server.stop()


def test_each_row_of_a_mixed_batch_gets_its_own_adapters_system_prompt(runs, tmp_path):
    old = tmp_path / "old"  # an adapter saved before manifests recorded the prompt
    shutil.copytree(runs["prompted"] / "adapter", old)
    manifest = json.loads((old / MANIFEST).read_text())
    del manifest["prompt"]
    (old / MANIFEST).write_text(json.dumps(manifest))
    aset = api.load_adapters(
        {"prompted": runs["prompted"], "plain": runs["plain"], "old": old}, dtype="float32"
    )
    user = [{"role": "user", "content": "Repeat after me: red fox"}]
    tok = aset.tokenizer

    def ids(messages):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]

    with_system = ids([{"role": "system", "content": SYSTEM}, *user])
    names = ["prompted", "plain", "old", None]
    out = aset.generate([user] * 4, adapter=names)
    assert [c.prompt_tokens for c in out] == [len(with_system)] + [len(ids(user))] * 3
    assert aset.encode(user, "prompted") == with_system
    assert aset.encode(user, "prompted", default_system=False) == ids(user)
    no_default = api.load_adapters({"prompted": runs["prompted"]}, default_system=False)
    assert no_default.encode(user, "prompted") == ids(user)


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_exports_render_the_training_system_prompt_by_default(runs, tmp_path, fmt):
    report = api.export(runs["prompted"], tmp_path / "out", format=fmt, allow_drift=False)
    out = tmp_path / "out"
    user = [{"role": "user", "content": "Repeat after me: red fox"}]
    trained = AutoTokenizer.from_pretrained(str(runs["prompted"] / "adapter"))
    expected = trained.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, *user], tokenize=False, add_generation_prompt=True
    )
    if fmt == "gguf":
        exported = AutoTokenizer.from_pretrained(str(out), gguf_file=report["gguf"]["file"])
        assert f'SYSTEM """{SYSTEM}"""' in (out / "Modelfile").read_text()
    else:
        exported = AutoTokenizer.from_pretrained(str(out))
        assert (out / "chat_template.jinja").read_text() == exported.chat_template
    rendered = exported.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert rendered == expected
    mine = [{"role": "system", "content": "Be brief."}, *user]
    assert exported.apply_chat_template(mine, tokenize=False) == trained.apply_chat_template(
        mine, tokenize=False
    )
    client = report["client_rendering"]
    assert client["prompts"] > 0 and client["prompts_rendered_differently"] == 0
    card = (out / "README.md").read_text()
    assert report["passed"] and f"{json.dumps(SYSTEM)}. The exported chat template uses it" in card


def test_a_run_without_a_system_prompt_exports_its_template_unchanged(runs, tmp_path):
    report = api.export(runs["plain"], tmp_path / "out")
    trained = AutoTokenizer.from_pretrained(str(runs["plain"] / "adapter"))
    exported = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert exported.chat_template == trained.chat_template
    assert "client_rendering" not in report and report["prompt"]["system_prompt"] is None


def test_an_export_whose_template_loses_the_system_prompt_fails_the_gate(
    runs, tmp_path, monkeypatch
):
    from peftkit.data import default_system
    from peftkit.errors import FidelityGateFailed
    from peftkit.export import prompt

    def unchanged(template, system, render):
        return default_system.DefaultSystem(template, default_system.WRAPPED, None)

    monkeypatch.setattr(prompt, "with_default_system", unchanged)
    with pytest.raises(FidelityGateFailed, match="render differently from training"):
        api.export(runs["prompted"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
