"""Write the export folder: weights (sharded safetensors), configs, tokenizer, model card, report."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from peftkit import units
from peftkit.export.source import ExportSource
from peftkit.export.stream import MergedWeights
from peftkit.io import MANIFEST, RunLayout
from peftkit.models.load import DTYPES


def write_generation_config(
    model: nn.Module | MergedWeights, source: ExportSource, tokenizer: PreTrainedTokenizerBase
) -> None:
    """Stop on every end-of-turn token training supervised (not just the tokenizer's EOS)."""
    stop_ids = source.meta.get("stop_token_ids") or [tokenizer.eos_token_id]
    model.generation_config.eos_token_id = stop_ids if len(stop_ids) > 1 else stop_ids[0]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = True  # off during training; serving wants it


def write_model(
    model: nn.Module | MergedWeights, out: Path, dtype: str, max_shard_size: str
) -> None:
    """The weights in `dtype`, sharded at `max_shard_size`, with config and generation config."""
    if isinstance(model, MergedWeights):
        write_streamed(model, out, dtype, max_shard_size)
        return
    model.to(DTYPES[dtype])
    # In bytes: the hub's size parser takes 2GB but not 2GiB, which the recipe allows.
    limit = shard_bytes(max_shard_size)
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size=limit)


_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def shard_bytes(size: str) -> int:
    """`5GB` -> 5 * 10**9, `2GiB` -> 2 * 2**30 (the units `ExportSpec.max_shard_size` takes)."""
    number, unit, binary = re.fullmatch(r"(\d+)\s*([KMG])(i?)B", size).groups()
    return int(number) * (1024 if binary else 1000) ** ("KMG".index(unit) + 1)


def write_streamed(
    weights: MergedWeights, out: Path, dtype: str, max_shard_size: str
) -> list[Path]:
    """Write a `stream.MergedWeights` as `save_pretrained` lays a model out (config.json,
    generation_config.json, model.safetensors or model-0000i-of-0000n.safetensors shards split
    as `huggingface_hub` splits them, and model.safetensors.index.json), one tensor in memory at
    a time: each shard's header is known from the shapes before its first tensor is computed."""
    target = DTYPES[dtype]
    out_dtype = {
        k: target if weights.dtype(k).is_floating_point else weights.dtype(k) for k in weights
    }
    nbytes = {k: weights.shape(k).numel() * out_dtype[k].itemsize for k in weights}
    shards: list[list[str]] = []
    limit, size = shard_bytes(max_shard_size), 0
    for key in sorted(weights):  # huggingface_hub's greedy split, in name order as transformers
        if not shards or nbytes[key] > limit or size + nbytes[key] > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes[key]
        if nbytes[key] > limit:
            size = limit  # a tensor over the limit keeps a shard of its own
    n = len(shards)
    names = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    file_of = {key: name for name, keys in zip(names, shards) for key in keys}
    files = {
        name: _SafetensorsFile(out / name, keys, out_dtype, weights)
        for name, keys in zip(names, shards)
    }
    try:
        for key in sorted(weights):
            files[file_of[key]].write(key, weights[key].to(out_dtype[key]))
    finally:
        for f in files.values():
            f.close()
    config = weights.config
    config.dtype = target
    config.use_cache = True
    config.architectures = [weights.architecture]
    config.save_pretrained(str(out))
    weights.generation_config.save_pretrained(str(out))
    if n > 1:
        index = {
            "metadata": {
                "total_parameters": weights.num_parameters,
                "total_size": sum(nbytes.values()),
            },
            "weight_map": file_of,
        }
        (out / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n"
        )
    return [out / name for name in names]


class _SafetensorsFile:
    """A safetensors file written tensor by tensor in a fixed order: 8-byte header length, the
    JSON header (offsets from the shapes), padded to 8 bytes, then each tensor's bytes."""

    def __init__(self, path: Path, keys: list[str], dtypes, weights) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key in keys:
            shape = list(weights.shape(key))
            end = offset + int(torch.Size(shape).numel()) * dtypes[key].itemsize
            header[key] = {
                "dtype": _SAFETENSORS_DTYPES[dtypes[key]],
                "shape": shape,
                "data_offsets": [offset, end],
            }
            offset = end
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._order, self._next = list(keys), 0
        self._header = header
        self._file = path.open("wb")
        self._file.write(struct.pack("<Q", len(text)) + text)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if self._order[self._next] != key or list(tensor.shape) != self._header[key]["shape"]:
            raise RuntimeError(f"{key}: not the tensor the header announced")
        self._file.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._order):
            raise RuntimeError(
                f"{self._file.name}: {len(self._order) - self._next} tensors unwritten"
            )


def copy_adapter(source: ExportSource, out: Path) -> None:
    for name in ("adapter_config.json", "adapter_model.safetensors", MANIFEST):
        if (source.result_dir / name).is_file():  # runs before the manifest existed have none
            shutil.copy2(source.result_dir / name, out / name)


LIBRARIES = {"merged": "transformers", "adapter": "peft", "gguf": "gguf"}


def model_card(source: ExportSource, kind: str, report: dict[str, Any]) -> str:
    """README.md of the export: provenance, training metrics and the fidelity figures."""
    r = source.recipe
    summary = _read_json(RunLayout(source.run_dir).summary)
    data = ", ".join(s.path for s in r.data.train)
    fid = report.get("fidelity") or {}
    lines = [
        "---",
        f"base_model: {r.model.name}",
        f"library_name: {LIBRARIES[kind]}",
        "tags: [peftkit, " + r.adapter.method + "]",
        "---",
        "",
        f"# {r.name} ({kind})",
        "",
        f"Fine-tuned from `{r.model.name}` with **{r.adapter.method}** by peftkit "
        f"{source.meta.get('peftkit_version', '')}; exported as {report['what']}.",
        "",
        "## Training",
        "",
        f"- data: {data} (loss on {r.data.loss_on}, max length {r.data.max_length})",
        f"- chat template: {source.meta.get('chat_template_source')}; turns end with "
        f"{', '.join(source.meta.get('stop_tokens', []))}",
        *_prompt_lines(report.get("prompt") or {}),
    ]
    if summary:
        lines += [
            f"- steps: {summary['steps']} ({summary['epochs']} epochs), {summary['tokens']:,} tokens",
            f"- train loss {summary['first_train_loss']:.4f} -> {summary['final_train_loss']:.4f}"
            + (
                f"; best eval loss {summary['best_eval_loss']:.4f}"
                if summary.get("best_eval_loss")
                else ""
            ),
        ]
        if summary.get("train_seconds") is not None and summary.get("peak_memory_bytes"):
            lines.append(
                f"- training: {units.duration(summary['train_seconds'])} of training steps, "
                f"peak memory {units.size(summary['peak_memory_bytes'])} "
                f"({summary.get('peak_memory_kind', 'peak')})"
            )
    if fid:
        lines += [
            "",
            "## Fidelity (exported model reloaded with transformers vs the trained model)",
            "",
            "| metric | value |",
            "|---|---|",
            *[
                f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |"
                for k, v in fid.items()
            ],
            "",
            f"Verdict: {'passed' if report['passed'] else 'FAILED (kept with --allow-drift)'}.",
        ]
    if kind == "gguf":
        lines += _gguf_usage(report["gguf"], r.name)
    if report.get("merge_bases"):
        lines += ["", "QLoRA merge bases measured (relative error / mean KL):", ""]
        lines += [
            f"- {k}: {v['relative_error']:.3g} / {v['mean_kl']:.3g}"
            for k, v in report["merge_bases"].items()
        ]
        lines.append(f"- chosen: {report['merge_base']}")
    lines += [
        "",
        "## Recipe",
        "",
        "```yaml",
        RunLayout(source.run_dir).recipe.read_text().rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _prompt_lines(prompt: dict[str, Any]) -> list[str]:
    """What the exported chat template does with a request that has no system message."""
    system = prompt.get("system_prompt")
    if not system:
        return []
    replaced = prompt.get("replaced_default")
    return [
        f"- system prompt (data.system_prompt): {json.dumps(system)}. The exported chat template "
        "uses it as the default system turn"
        + (f", replacing the base template's own ({json.dumps(replaced)})" if replaced else "")
        + ", so a request without a system message renders as in training; a request's own "
        "system message replaces it.",
    ]


def _gguf_usage(gguf: dict[str, Any], name: str) -> list[str]:
    if "tokenizer" not in gguf:  # a LoRA adapter: it runs over the base model's own GGUF
        return [
            "",
            "## Run it",
            "",
            f"`{gguf['file']}` ({gguf['quant']}) is a LoRA adapter in llama.cpp's format; load it "
            "over a GGUF of the base model:",
            "",
            "```",
            f"llama-cli -m BASE.gguf --lora {gguf['file']} -cnv",
            "```",
        ]
    tok = gguf["tokenizer"]
    return [
        "",
        "## Run it",
        "",
        f"`{gguf['file']}` ({gguf['quant']}, {units.size(gguf['bytes'])}) holds the weights, the "
        "tokenizer and the chat template used in training. Read back with transformers' GGUF "
        f"loader, its tokenizer encoded {tok['identical_rows']}/{tok['rows']} held-out rows to the "
        "same ids as the training tokenizer.",
        "",
        "```",
        f"ollama create {name} -f Modelfile && ollama run {name}",
        f"llama-cli -m {gguf['file']} -cnv",
        "```",
        "",
        f"Stop tokens: {', '.join(gguf['stop_tokens'])} (in the Modelfile as `PARAMETER stop`).",
    ]


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None
