"""The recipe's `model:` section: which base model to load and how (quantization included).

It lives with the models, which load what it says; the recipe (`peftkit.recipe.schema`) composes
it, as it composes each method's own spec.
"""

from __future__ import annotations

from typing import Literal

from pydantic import StrictBool, field_validator, model_validator

from peftkit.section import Section

DType = Literal["auto", "bfloat16", "float16", "float32"]
Quantize = Literal["auto", "none", "4", "8"]
"""How to load a base for adapters, in a word (the command line's --quantize): "auto" = as the
adapters were trained (QLoRA adapters: the same 4-bit base), "none" = unquantized, "4" / "8" =
in 4 / 8 bit."""


class QuantizationSpec(Section):
    """bitsandbytes quantization of the frozen base weights (QLoRA when paired with LoRA)."""

    bits: Literal[4, 8] = 4
    """4 (NF4/FP4, QLoRA) or 8 (LLM.int8)."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type; NF4 is the QLoRA paper's choice for normally distributed weights."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves ~0.4 bits per parameter)."""
    compute_dtype: DType = "auto"
    """dtype the 4-bit weights are dequantized to for matmuls; auto = the training precision."""
    upcast_unquantized: bool = False
    """Cast the layers bitsandbytes leaves unquantized (embeddings, norms, head) to fp32 for
    training, as peft's `prepare_model_for_kbit_training` does: +2 bytes per such weight (~2.1 GB
    at Llama-3.1-8B), an fp32 residual stream, and no fused LoRA MLP (its input is then fp32).
    false: they stay in the compute dtype, which is what they were trained in."""
    quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = "auto"
    """dtype the packed 4-bit weights are stored in; auto = uint8, except under an FSDP launch:
    the compute dtype, so that FSDP can shard them like every other parameter (QLoRA + FSDP)."""


class ModelSpec(Section):
    """Which base model to load and how."""

    name: str
    """Hub id (`meta-llama/Llama-3.2-1B`), local folder, a `.gguf` file (llama.cpp / Ollama model
    files: dequantized once into peftkit's cache), or a built-in model: `builtin:smollm2-135m`
    (SmolLM2-135M-Instruct, the quickstart's) or `builtin:tiny-llama` (a 3M toy for fast tests)."""
    gguf_file: str | None = None
    """A GGUF file inside the folder or hub repository `name` (e.g. `model-Q4_K_M.gguf`)."""

    revision: str | None = None
    """Hub branch, tag or commit to pin."""
    tokenizer: str | None = None
    """Tokenizer id or folder when it differs from `name`."""
    dtype: DType = "auto"
    """dtype of the base weights; auto = bf16/fp16 for adapter methods under that precision, else fp32."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] = "sdpa"
    quantization: QuantizationSpec | None = None
    """Load the base quantized with bitsandbytes (null = full precision)."""
    trust_remote_code: StrictBool = False
    """Run Python code shipped with the model. Only for sources you trust. `true` or `false` only
    (no 'yes', no YAML 1.1 `on`): a security switch is never turned on by a guess."""

    @field_validator("name")
    @classmethod
    def _known_builtin(cls, name: str) -> str:
        from peftkit.models.builtin import unknown_builtin

        problem = unknown_builtin(name)
        if problem:
            raise ValueError(problem)
        return name

    @model_validator(mode="after")
    def _gguf_rules(self) -> ModelSpec:
        if self.gguf_file is not None:
            if self.name.lower().endswith(".gguf"):
                raise ValueError(
                    "model.gguf_file is set but model.name is already a .gguf file: remove one"
                )
            if not self.gguf_file.lower().endswith(".gguf"):
                raise ValueError(f"model.gguf_file {self.gguf_file!r} must name a .gguf file")
            if self.name.startswith("builtin:"):
                raise ValueError("model.gguf_file does not apply to built-in models: remove it")
        return self
