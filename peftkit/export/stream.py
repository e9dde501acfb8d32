"""Merge the adapter into the base one layer at a time, reading the base checkpoint tensor by tensor.

The merged model is never built whole. Its structure comes from a weightless copy of the base
(every parameter a zero-stride placeholder: right shape, no memory) with the adapter attached by
peft as usual. Each adapted layer receives its real base weight, read from the checkpoint's
safetensors and rounded through the dtype training loaded it in, only while peft's own `merge`
folds the adapter into it (LoRA: W' = W + s·BA with s = alpha / r, or alpha / sqrt(r) with
rsLoRA, transposed for fan_in_fan_out; DoRA, IA3, LoHa, LoKr, VeRA, OFT, ... by their own rule);
every other tensor is the checkpoint's, or the adapter's for `modules_to_save`. A LoRA on
parameters (`target_parameters`: a MoE's 3-D expert weights, `experts.gate_up_proj` [E, 2I, H])
is a chain of peft `ParamWrapper`s around the experts module, one per parameter: the wrapper of
each parameter folds its own delta (W' = W + s·einsum(B, A), per expert) with its own `merge`, as
`merge_and_unload` walks the chain. So each tensor is
the one `merge_and_unload(safe_merge=True)` gives on a dense fp32 base, with one layer's weights
in memory at a time.

`streaming_refusal` says when this cannot be done exactly (then export builds the merged model in
memory, as before), and why.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora.layer import ParamWrapper
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from peftkit.errors import ExportError
from peftkit.export.build import trained_dtype
from peftkit.export.source import ExportSource
from peftkit.models.layers import expert_target
from peftkit.models.source import model_source


class CannotStream(Exception):
    """This merge cannot be streamed exactly; the message says why (export merges in memory)."""


def streaming_refusal(source: ExportSource) -> str | None:
    """Why this run's merge cannot be streamed (None = it can), from the configs alone; building
    `MergedWeights` may still raise `CannotStream` for what only the model's structure shows."""
    spec = source.recipe.model
    if source.whole_model:
        return "a whole-model result has no adapter to merge"
    if spec.quantization is not None:
        return "the QLoRA merge bases are measured against the trained model as whole models"
    if spec.trust_remote_code:
        return "the model's own code may lay out its weights differently from its checkpoint"
    adapter = json.loads((source.result_dir / "adapter_config.json").read_text())
    if adapter.get("bias", "none") != "none":
        return f"the adapter trains base biases (bias: {adapter['bias']})"
    if adapter.get("trainable_token_indices"):
        return "trained token rows are merged by peft's embedding wrapper"
    return None


@dataclass
class _Checkpoint:
    """The base's safetensors files: which file holds each tensor. Each read opens the file and
    closes it again, so no mapping of the checkpoint stays resident."""

    files: dict[str, Path]

    @classmethod
    def locate(cls, folder: Path) -> _Checkpoint:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return cls({k: folder / v for k, v in weight_map.items()})
        single = folder / "model.safetensors"
        if not single.is_file():
            raise CannotStream(f"no model.safetensors or its index in {folder}")
        with safe_open(str(single), framework="pt") as f:
            return cls(dict.fromkeys(f.keys(), single))

    def read(self, name: str) -> torch.Tensor:
        with safe_open(str(self.files[name]), framework="pt") as f:
            return f.get_tensor(name)


def _checkpoint_folder(where: str, revision: str | None) -> Path:
    if Path(where).is_dir():
        return Path(where)
    from huggingface_hub import snapshot_download  # the files from_pretrained already fetched

    patterns = ["*.json", "*.safetensors"]
    return Path(snapshot_download(where, revision=revision, allow_patterns=patterns))


def _placeholder(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.zeros((), dtype=t.dtype).expand(t.shape), requires_grad=False)


def _weightless(config) -> tuple[nn.Module, set[int]]:
    """The base model's modules with placeholder fp32 parameters and buffers (ties kept), and the
    ids of the placeholders (what the checkpoint fills)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = made.setdefault(id(p), _placeholder(p))
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = made.setdefault(
                    id(b), torch.zeros((), dtype=b.dtype).expand(b.shape)
                )
    return model, {id(t) for t in made.values()}


class MergedWeights(Mapping[str, torch.Tensor]):
    """The merged model's state dict, each tensor computed when it is read (one layer's weights in
    memory at a time): what `state_dict()` of the merged model holds, less the tied copies that
    `save_pretrained` leaves out; with the `config` and `generation_config` to write beside it."""

    def __init__(
        self,
        base: str | Path,
        adapter_dir: str | Path,
        dtype: torch.dtype = torch.float32,
        revision: str | None = None,
    ) -> None:
        """Args:
        base: the base model's folder (or hub id, from the local hub cache).
        adapter_dir: the trained peft adapter.
        dtype: the dtype training loaded the base in (each base tensor is rounded through it).
        """
        self.config = AutoConfig.from_pretrained(str(base), revision=revision)
        try:
            self.generation_config = GenerationConfig.from_pretrained(str(base), revision=revision)
        except OSError:  # no generation_config.json: from_pretrained derives it from the config
            self.generation_config = GenerationConfig.from_model_config(self.config)
        self._dtype = dtype
        self._checkpoint = _Checkpoint.locate(_checkpoint_folder(str(base), revision))
        skeleton, self._placeholders = _weightless(self.config)
        if self._dtype != torch.float32 and (
            skeleton._keep_in_fp32_modules
            or getattr(skeleton, "_keep_in_fp32_modules_strict", None)
        ):
            raise CannotStream(f"{type(skeleton).__name__} keeps some modules in fp32")
        self._fill_saved_base_weights(skeleton, Path(adapter_dir))
        try:
            peft_model = PeftModel.from_pretrained(skeleton, str(adapter_dir))
        except (RuntimeError, ValueError, KeyError) as e:
            raise ExportError(
                f"the adapter in {adapter_dir} does not fit the base model {base!r}: "
                f"{str(e).splitlines()[0][:300]}"
            ) from None
        inner = peft_model.base_model.model
        self._tuners = {n: m for n, m in inner.named_modules() if isinstance(m, BaseTunerLayer)}
        for name, m in inner.named_modules():
            odd = isinstance(m, AuxiliaryTrainingWrapper) and not isinstance(
                m, ModulesToSaveWrapper
            )
            if odd or (
                isinstance(m, BaseTunerLayer)
                and hasattr(m, "unload_and_optionally_merge_module")
                and not isinstance(m, ParamWrapper)  # merged one parameter at a time below
            ):
                raise CannotStream(f"{name} ({type(m).__name__}) merges in its own way")
        self.architecture = type(skeleton).__name__
        plain = peft_model.unload()  # the base's structure; modules_to_save: the trained copies
        self.num_parameters = plain.num_parameters()
        seen: set[int] = set()
        self._params: dict[str, torch.Tensor] = {}
        for key, t in plain.state_dict(keep_vars=True).items():
            if id(t) not in seen:  # a tied copy (lm_head = embed_tokens) is written once
                seen.add(id(t))
                self._params[key] = t
        head, embed = plain.get_output_embeddings(), plain.get_input_embeddings()
        if self.config.tie_word_embeddings and head is not None and head.weight is not embed.weight:
            # as peft's merge_and_unload: a trained copy of one of them undid the tie
            self.config.tie_word_embeddings = False
        missing = [
            k
            for k, t in self._params.items()
            if id(t) in self._placeholders and k not in self._checkpoint.files
        ]
        experts = [k for k in missing if expert_target(k) is not None]
        if experts:
            raise CannotStream(
                f"the base checkpoint stores the MoE experts one by one, not as {experts[0]}: "
                "transformers fuses them into 3-D tensors at load, which the streamed merge does "
                "not replicate"
            )
        if missing:
            raise CannotStream(
                f"the base checkpoint has no tensor {missing[0]} of the model (transformers "
                "converts its tensors at load)"
            )

    def _fill_saved_base_weights(self, skeleton: nn.Module, adapter_dir: Path) -> None:
        """Base weights the adapter file carries too (peft saves the embeddings when it adapts
        them) are loaded into the base as in the in-memory merge: those few get real values
        first, from the checkpoint, with their ties kept."""
        with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
            keys = f.keys()
        saved = {k.removeprefix("base_model.model.").replace(".base_layer.", ".") for k in keys}
        for name, p in skeleton.state_dict(keep_vars=True).items():
            if name in saved and id(p) in self._placeholders and name in self._checkpoint.files:
                p.data = self._base(name)
                self._placeholders.discard(id(p))

    @classmethod
    def of_run(cls, source: ExportSource) -> MergedWeights:
        """The merge `peftkit export` writes for a run: its adapter over its base."""
        spec = source.recipe.model
        return cls(model_source(spec), source.result_dir, trained_dtype(source), spec.revision)

    def __iter__(self) -> Iterator[str]:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)

    def shape(self, key: str) -> torch.Size:
        return self._params[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self._params[key].dtype

    def __getitem__(self, key: str) -> torch.Tensor:
        """The merged tensor `key` (fp32 where floating), computed now."""
        t = self._params[key]
        module_name, _, param = key.rpartition(".")
        tuner = self._tuners.get(module_name)
        if tuner is not None:
            return self._merged(module_name, param, tuner)
        return self._base(key) if id(t) in self._placeholders else t.detach()

    def _base(self, key: str) -> torch.Tensor:
        # as training loaded it (in its dtype), then upcast to fp32 as the trained model computes
        t = self._checkpoint.read(key)
        return t.to(self._dtype).float() if t.is_floating_point() else t

    def _merged(self, name: str, param: str, tuner: BaseTunerLayer) -> torch.Tensor:
        """Give the tuner's base layer its real weights, fold the adapter in with peft's own
        merge, keep `param`, and put the placeholders back (unmerged)."""
        if isinstance(tuner, ParamWrapper):
            tuner = _wrapper_of(tuner, param)
            if tuner is None:  # a parameter of the experts module that no adapter targets
                key = f"{name}.{param}"
                t = self._params[key]
                return self._base(key) if id(t) in self._placeholders else t.detach()
        base = tuner.get_base_layer()
        held = {}
        for pname, p in list(base._parameters.items()):
            if p is not None and id(p) in self._placeholders:
                held[pname] = p
                real = self._base(f"{name}.{pname}")
                base._parameters[pname] = nn.Parameter(real, requires_grad=False)
        try:
            with torch.no_grad():
                tuner.merge(safe_merge=True)
            return getattr(base, param).detach()
        finally:
            base._parameters.update(held)
            tuner.merged_adapters.clear()


def _wrapper_of(outer: ParamWrapper, param: str) -> ParamWrapper | None:
    """The wrapper in peft's chain of `ParamWrapper`s (outermost first) that adapts `param`."""
    layer: nn.Module = outer
    while isinstance(layer, ParamWrapper):
        if layer.parameter_name == param:
            return layer
        layer = layer.base_layer
    return None
