"""Load the base model and tokenizer a recipe names, optionally quantized with bitsandbytes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from peftkit import _compat
from peftkit.errors import ModelLoadError
from peftkit.models.source import (  # noqa: F401 - resolve_source: imported from here too
    model_source,
    resolve_source,
    tokenizer_source,
)
from peftkit.models.spec import ModelSpec, QuantizationSpec

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def load_tokenizer(spec: ModelSpec, needs_eos: bool = True) -> PreTrainedTokenizerBase:
    """The recipe's tokenizer with a pad token set (labels never come from pad ids, so pad = EOS is safe).

    Args:
        needs_eos: refuse a tokenizer without EOS (a generating model must learn to stop; a
            classifier never generates, and BERT-style tokenizers have none).
    """
    source = tokenizer_source(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise ModelLoadError(_explain_load_failure("tokenizer", source, e)) from e
    if tokenizer.eos_token is None and needs_eos:
        raise ModelLoadError(
            f"tokenizer of {source!r} has no EOS token: a fine-tuned model could never learn to stop"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def bnb_config(quant: QuantizationSpec, compute_dtype: torch.dtype) -> Any:
    """The `BitsAndBytesConfig` for a quantization section."""
    from transformers import BitsAndBytesConfig

    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    from peftkit.launch import Launch  # the recipe schema imports this module

    storage = quant.quant_storage
    if storage == "auto":  # FSDP shards parameters of one dtype: store the 4-bit data in it
        storage = "uint8" if Launch.from_env().kind != "fsdp" else str(compute_dtype)[6:]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=getattr(torch, storage),
    )


def head_config(labels: list[str] | None, pad_token_id: int | None) -> dict[str, Any]:
    """`from_pretrained` settings of a sequence-classification head: the classes (None =
    regression, one output) and the pad id decoder LMs need to find each row's last token."""
    if labels is None:
        return {"num_labels": 1, "problem_type": "regression", "pad_token_id": pad_token_id}
    return {
        "num_labels": len(labels),
        "problem_type": "single_label_classification",
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
        "pad_token_id": pad_token_id,
    }


def load_model(
    spec: ModelSpec,
    dtype: torch.dtype,
    device: torch.device,
    head: dict[str, Any] | None = None,
    place: bool = True,
) -> nn.Module:
    """Load the causal LM in `dtype` and place it on `device`, once, here: training and
    inference alike make every other tensor on the model's device (quantized models are placed
    as they load, as bitsandbytes requires).

    Args:
        head: `head_config(...)`: load `AutoModelForSequenceClassification` with a new task head
            instead (its weights start random; everything else loads from the checkpoint).
        place: False leaves an unquantized model on the CPU for an engine that places it as it
            shards it (FSDP, DeepSpeed): a whole copy per GPU is what sharding avoids.
    """
    source = model_source(spec)
    kwargs: dict[str, Any] = {
        "revision": spec.revision,
        "dtype": dtype,
        "attn_implementation": spec.attn_implementation,
        "trust_remote_code": spec.trust_remote_code,
        "use_safetensors": True,  # never unpickle weight files
    }
    if spec.quantization is not None:
        compute = DTYPES.get(spec.quantization.compute_dtype, dtype)
        kwargs["quantization_config"] = bnb_config(spec.quantization, compute)
        kwargs["device_map"] = {"": device}
    auto = AutoModelForCausalLM
    if head is not None:
        auto = AutoModelForSequenceClassification
        kwargs.update(head)
    try:
        model = auto.from_pretrained(source, **kwargs)
    except ImportError as e:
        raise ModelLoadError(f"loading {source!r} needs a package that is missing: {e}") from e
    except (OSError, ValueError, SafetensorError) as e:
        raise ModelLoadError(_explain_load_failure("model", source, e)) from e
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    _compat.contiguous_head_input(model)
    if spec.quantization is not None:
        _compat.keep_bnb_4bit_cpu_weights_unpacked(model)
    elif place:
        model.to(device)
    return model


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant checkpointing: works with frozen embeddings, no input-grad hooks needed."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def damaged_weight_files(folder: str | Path) -> list[str]:
    """The safetensors files of a local folder whose header or size do not check out."""
    damaged = []
    for file in sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []:
        try:
            with safe_open(str(file), "pt"):
                pass
        except (SafetensorError, OSError) as e:
            damaged.append(f"{file} ({e})")
    return damaged


def _explain_load_failure(what: str, source: str, error: Exception) -> str:
    damaged = damaged_weight_files(source)
    if damaged:
        return (
            f"could not load the {what} from {source!r}: damaged or truncated weights file "
            f"{'; '.join(damaged)}. Download or copy it again"
        )
    if os.path.exists(source):
        hint = "the local folder needs config.json, weights (safetensors) and tokenizer files"
    else:
        hint = (
            "no such local path, so it was read as a hub id: check the spelling, network access "
            "and HF_TOKEN for gated models"
        )
    return f"could not load the {what} from {source!r}: {error}\n  hint: {hint}"
