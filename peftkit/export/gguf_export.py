"""`peftkit export --format gguf`: write the merged model as one GGUF file plus an Ollama Modelfile,
then read the file back with an independent reader (transformers' GGUF loader, which dequantizes)
so the fidelity gate measures what llama.cpp and Ollama will load, tokenizer included."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from peftkit.data.encode import EncodedRow
from peftkit.errors import ExportError
from peftkit.export import build
from peftkit.export.gguf import check_quant, write_gguf
from peftkit.export.gguf_arch import check_config
from peftkit.export.gguf_lora import (
    ADAPTER_QUANTS,
    apply_lora_gguf,
    check_lora_config,
    write_lora_gguf,
)
from peftkit.export.gguf_vocab import build_vocab
from peftkit.export.ollama import template_lines
from peftkit.export.source import ExportSource
from peftkit.exporters.gguf import GgufExport
from peftkit.exporters.gguf import gguf_thresholds as gguf_thresholds  # re-exported
from peftkit.io import atomic_write_text
from peftkit.models.source import model_source

MODELFILE = "Modelfile"


def _base_config(source: ExportSource):
    if source.whole_model:
        return AutoConfig.from_pretrained(str(source.result_dir))
    model = source.recipe.model
    config = AutoConfig.from_pretrained(
        model_source(model), revision=model.revision, trust_remote_code=model.trust_remote_code
    )
    return getattr(config, "text_config", None) or config


def check_gguf_export(source: ExportSource, tokenizer, quant: str, adapter_only: bool) -> None:
    """Refuse what GGUF cannot hold (quant, architecture, RoPE, tokenizer, adapter features) from
    the configs and the tokenizer alone, before any weights are loaded or merged."""
    config = _base_config(source)
    check_config(config)
    if adapter_only:
        if quant not in ADAPTER_QUANTS:
            raise ExportError(
                f"a GGUF LoRA adapter is written as {', '.join(ADAPTER_QUANTS)}, not {quant!r}"
            )
        check_lora_config(json.loads((source.result_dir / "adapter_config.json").read_text()))
        return
    check_quant(quant)
    stops = source.meta.get("stop_tokens") or [tokenizer.eos_token]
    build_vocab(tokenizer, config.vocab_size, tokenizer.chat_template, stops)


def export_lora_gguf(
    source: ExportSource, out: Path, spec: GgufExport, report: dict[str, Any], log
) -> nn.Module:
    """Write `out/<name>-lora-<quant>.gguf` (llama.cpp's `--lora` format) and return what the gate
    measures: the file read back with `gguf`'s reader and applied to the dense base in torch."""
    name = f"{source.recipe.name}-lora-{spec.quant}.gguf"
    log(f"writing {name} (LoRA adapter, {spec.quant}) ...")
    path = write_lora_gguf(source.result_dir, _base_config(source), out / name, spec.quant)
    report["what"] = f"a LoRA adapter as GGUF for llama.cpp's --lora ({name})"
    report["gguf"] = {"file": name, "quant": spec.quant, "bytes": path.stat().st_size}
    log("reading it back and applying it to the base model ...")
    return apply_lora_gguf(build.dense_base(source), path).eval()


def gguf_file_name(source: ExportSource, quant: str) -> str:
    return f"{source.recipe.name}-{quant}.gguf"


def export_gguf(
    model: nn.Module,
    source: ExportSource,
    tokenizer,
    out: Path,
    spec: GgufExport,
    rows: list[EncodedRow],
    report: dict[str, Any],
    log,
    system_prompt: str | None = None,
) -> tuple[nn.Module, list[str]]:
    """Write `out/<name>-<quant>.gguf` and `out/Modelfile`; return the read-back model and the
    tokenizer problems found (each one fails the gate).

    The chat template is the one training rendered with (the run's tokenizer carries it, with
    training's `system_prompt` as its default system turn) and the stop tokens are those training
    supervised, so llama.cpp and Ollama end turns where the model learned to; the Modelfile's
    SYSTEM is the same system prompt.
    """
    stops = source.meta.get("stop_tokens") or [tokenizer.eos_token]
    name = gguf_file_name(source, spec.quant)
    log(f"writing {name} ({spec.quant}) ...")
    path = write_gguf(model, tokenizer, out / name, spec.quant, tokenizer.chat_template, stops)
    atomic_write_text(
        out / MODELFILE,
        modelfile(name, stops, system_prompt, source.recipe.name, template_lines(tokenizer)),
    )
    log("reading it back with transformers' GGUF loader ...")
    try:
        candidate = AutoModelForCausalLM.from_pretrained(
            str(out), gguf_file=name, dtype=torch.float32
        )
        reread_tokenizer = AutoTokenizer.from_pretrained(str(out), gguf_file=name)
    except (ValueError, KeyError, NotImplementedError) as e:
        # Unverified is not kept: the gate exists so that nothing unread leaves peftkit.
        raise ExportError(f"transformers could not read the GGUF file back: {e}") from e
    candidate.eval()
    tokens = compare_tokenizers(tokenizer, reread_tokenizer, rows)
    report["what"] = f"GGUF {spec.quant} for llama.cpp / Ollama / LM Studio ({name})"
    report["gguf"] = {
        "file": name,
        "quant": spec.quant,
        "bytes": path.stat().st_size,
        "stop_tokens": stops,
        "modelfile": MODELFILE,
        "tokenizer": tokens,
    }
    log(
        f"tokenizer read back: {tokens['identical_rows']}/{tokens['rows']} held-out rows encode to "
        f"the same ids; chat template {'kept' if tokens['chat_template_kept'] else 'CHANGED'}"
    )
    problems = []
    if tokens["identical_rows"] < tokens["rows"]:
        problems.append(
            f"the GGUF tokenizer encodes {tokens['rows'] - tokens['identical_rows']} of "
            f"{tokens['rows']} held-out rows differently"
        )
    if not tokens["chat_template_kept"]:
        problems.append("the GGUF file's chat template differs from the one used in training")
    return candidate, problems


def compare_tokenizers(trained, reread, rows: list[EncodedRow]) -> dict[str, Any]:
    """Encode each held-out row's text (as rendered for training, special tokens included) with both
    tokenizers, with and without the tokenizer's own BOS/EOS handling, and count identical rows."""
    identical, first_difference = 0, None
    for row in rows:
        text = trained.decode(row.input_ids.tolist())
        same = all(
            trained.encode(text, add_special_tokens=special)
            == reread.encode(text, add_special_tokens=special)
            for special in (False, True)
        )
        identical += same
        if not same and first_difference is None:
            first_difference = text[:200]
    return {
        "rows": len(rows),
        "identical_rows": identical,
        "first_difference": first_difference,
        "chat_template_kept": reread.chat_template == trained.chat_template,
    }


def modelfile(
    gguf_name: str,
    stop_tokens: list[str],
    system: str | None,
    model_name: str,
    template: list[str] | None = None,
) -> str:
    """An Ollama Modelfile: the GGUF beside it, one `PARAMETER stop` per end-of-turn token training
    supervised, the recipe's system prompt and `template` (`ollama.template_lines`: a Go TEMPLATE
    for peftkit's fallback template, else a note that Ollama picks one from the GGUF's)."""
    lines = [
        f"# ollama create {model_name} -f Modelfile && ollama run {model_name}",
        f"FROM ./{gguf_name}",
        *[f"PARAMETER stop {json.dumps(stop)}" for stop in stop_tokens],
    ]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += template or []
    return "\n".join(lines) + "\n"
