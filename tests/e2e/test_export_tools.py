"""Exports keep the tool-capable chat template training rendered with: the merged HF export's
tokenizer and the GGUF file's `tokenizer.chat_template` render a tool chat (tools list, call,
tool result) exactly as training's renderer did, with training's template variables
(`data.chat_template_kwargs`) as the exported template's defaults; the Ollama Modelfile carries
a Go TEMPLATE with tools for peftkit's fallback template, and says when it cannot."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import gguf
import pytest
from transformers import AutoTokenizer

from peftkit import api
from peftkit.cli import main
from peftkit.data.encode import Encoder
from peftkit.data.formats import to_example
from peftkit.data.sources import RawRow
from tests.conftest import write_jsonl, write_recipe

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "tests" / "fixtures" / "chat_templates"
TOOLS = [{"type": "function", "function": {"name": "send_order", "description": "Order."}}]
CASES = {  # template, its variables
    "fallback": ("fallback", {}),
    "qwen3-thinking-off": (str(TEMPLATES / "qwen3.jinja"), {"enable_thinking": False}),
}


def _rows(name: str, n: int) -> list[dict]:
    lines = (ROOT / "recipes" / "data" / f"tools-{name}.jsonl").read_text().splitlines()[:n]
    rows = [json.loads(line) for line in lines]
    for row in rows:  # the schema alone outgrows the tiny model
        row["tools"] = TOOLS
    return rows


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory, tiny_model):
    template, variables = CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    train = write_jsonl(tmp / "train.jsonl", _rows("train", 4))
    evals = write_jsonl(tmp / "eval.jsonl", _rows("eval", 2))
    recipe = write_recipe(
        tmp / "r.yaml",
        tiny_model,
        train,
        data={
            "train": str(train),
            "eval": str(evals),
            "max_length": 512,
            "chat_template": template,
            "chat_template_kwargs": variables,
            "cache": False,
        },
        train={"max_steps": 1, "micro_batch_size": 4, "precision": "fp32"},
        output={"dir": str(tmp / "run"), "plot": False, "sample_prompts": []},
        export={"samples": 2, "generate_tokens": 4, "max_sample_tokens": 512},
    )
    api.train(recipe)
    run = tmp / "run"
    assert main(["export", str(run), "--out", str(tmp / "hf")]) == 0
    gguf_args = ["export", str(run), "--out", str(tmp / "gguf"), "--format", "gguf"]
    assert main([*gguf_args, "--quant", "f16"]) == 0
    return request.param, variables, run, tmp


def _trained_text(run: Path, variables: dict) -> tuple[str, list[dict], list[dict]]:
    """A held-out agent chat as training's renderer wrote it, and the chat as the template got
    it (training's canonical messages and tools)."""
    tokenizer = AutoTokenizer.from_pretrained(str(run / "adapter"))
    row = _rows("eval", 1)[0]
    example = to_example(RawRow(copy.deepcopy(row), "eval.jsonl line 1"), "messages", None)
    rendered = Encoder(tokenizer, "completion", "template", variables).render(example)
    return rendered.text, example.messages, example.tools


def test_the_exports_render_a_tool_chat_as_training_did(exported):
    _, variables, run, tmp = exported
    text, messages, tools = _trained_text(run, variables)
    assert "send_order" in text and "Stefan Romero" in text  # the tools and the call are there
    hf = AutoTokenizer.from_pretrained(str(tmp / "hf"))
    (name,) = [p.name for p in (tmp / "gguf").iterdir() if p.suffix == ".gguf"]
    from_gguf = AutoTokenizer.from_pretrained(str(tmp / "gguf"), gguf_file=name)
    for tokenizer in (hf, from_gguf):  # a client passes no template variables
        assert tokenizer.apply_chat_template(messages, tools=tools, tokenize=False) == text
    field = gguf.GGUFReader(tmp / "gguf" / name).fields["tokenizer.chat_template"]
    assert field.contents() == hf.chat_template
    # a request's prompt (the generation prompt opened) is training's, variables included
    trained = AutoTokenizer.from_pretrained(str(run / "adapter"))
    history = messages[:1]
    prompt = trained.apply_chat_template(
        history, tools=tools, tokenize=False, add_generation_prompt=True, **variables
    )
    for tokenizer in (hf, from_gguf):
        assert (
            tokenizer.apply_chat_template(
                history, tools=tools, tokenize=False, add_generation_prompt=True
            )
            == prompt
        )
    if variables:  # a client may still pass them: the export sets defaults, not constants
        flipped = {k: not v for k, v in variables.items()}
        assert (
            hf.apply_chat_template(
                history, tools=tools, tokenize=False, add_generation_prompt=True, **flipped
            )
            != prompt
        )
    report = json.loads((tmp / "hf" / "fidelity.json").read_text())
    assert report["prompt"]["template_variables"] == variables


def test_the_modelfile_has_a_tool_template_for_the_fallback_or_says_why_not(exported):
    case, _, _, tmp = exported
    modelfile = (tmp / "gguf" / "Modelfile").read_text()
    if case != "fallback":
        assert "TEMPLATE" not in modelfile.replace("# TEMPLATE: none written", "")
        assert "peftkit does not translate Jinja into" in modelfile
        return
    template = modelfile.split('TEMPLATE """', 1)[1].rsplit('"""', 1)[0]
    assert "{{ if .Tools }}### Tools:" in template and "{{ range .Tools }}{{ json . }}" in template
    assert "{{ range $j, $c := .ToolCalls }}" in template
    assert '<tool_call>{"name": "{{ .Function.Name }}", "arguments": ' in template
    eos = AutoTokenizer.from_pretrained(str(tmp / "hf")).eos_token  # the fallback's end of answer
    assert "{{ " + json.dumps(eos) + " }}\n\n{{ end }}" in template
    assert f"PARAMETER stop {json.dumps(eos)}" in modelfile  # training supervised it
    opened = sum(template.count(k) for k in ("{{ if ", "{{ range "))
    assert opened == template.count("{{ end }}")  # every block closed
