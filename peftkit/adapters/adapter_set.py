"""One base model in memory, many named LoRA adapters on it: load, switch, unload, generate.

    aset = AdapterSet("builtin:tiny-llama")
    aset.add("sql", "runs/sql")              # a run directory or an adapter folder
    aset.add("support", "runs/support")
    aset.generate(["Hi"], adapter="sql")      # one adapter for every row
    aset.generate(["Hi", "Hi"], adapter=["sql", "support"])  # one batch, one adapter per row
    aset.activate("support"); aset.model(...)  # the peft model itself, for custom forwards

Each adapter's manifest is checked against the loaded base (see `manifest.py`); each adapter keeps
its own chat template, stop tokens and default system prompt (the recipe's `data.system_prompt`,
given to chat prompts without a system turn, as in training; `default_system=False` turns that
off, for the set or per call). Switching is O(layers) however many adapters are loaded
(`_compat.switch_lora_adapter`). Only the LoRA family (LoRA, QLoRA, DoRA, rsLoRA, ...) can share a
base and mix in one batch; other methods are refused with a message saying so.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from transformers import PreTrainedTokenizerBase

from peftkit import _compat
from peftkit.adapters.generation import Completion, Row, SamplingOptions, generate_rows
from peftkit.data.chat import FALLBACK_TEMPLATE
from peftkit.errors import ServingError
from peftkit.models.load import DTYPES, damaged_weight_files, load_model, load_tokenizer
from peftkit.models.manifest import (
    BaseIdentity,
    check_compatible,
    default_system_prompt,
    read_manifest,
)
from peftkit.models.spec import Quantize
from peftkit.recipe.schema import ModelSpec, QuantizationSpec

BASE = "base"
"""The name that means 'no adapter': the base model alone."""
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
Prompt = str | list[dict[str, str]]
"""Raw text (continued as is) or chat messages (rendered with the adapter's chat template)."""


@dataclass
class LoadedAdapter:
    name: str
    path: Path
    method: str
    manifest: dict[str, Any] | None
    chat_template: str
    stop_ids: set[int]
    system_prompt: str | None = None
    """The system prompt training gave chats without one (None: none, or an older manifest)."""


def resolve_adapter_dir(path: str | Path) -> Path:
    """An adapter folder, or a run directory holding one (RUN/adapter)."""
    path = Path(path)
    for candidate in (path, path / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    if (path / "config.json").is_file() or (path / "model" / "config.json").is_file():
        raise ServingError(
            f"{path} holds whole-model weights (full fine-tuning), not an adapter: serve it as a "
            "base model instead"
        )
    raise ServingError(
        f"no adapter at {path}: expected adapter_config.json there or in {path / 'adapter'}"
    )


def default_name(path: str | Path) -> str:
    """The name an adapter gets when none is given: its run's folder name (not "adapter")."""
    path = Path(path).resolve()
    return path.parent.name if path.name == "adapter" else path.name


def base_of(paths: list[str | Path]) -> tuple[str, dict[str, Any] | None]:
    """The base model (and quantization) recorded in the adapters' manifests; they must agree."""
    bases = {}
    for path in paths:
        adapter_dir = resolve_adapter_dir(path)
        manifest = read_manifest(adapter_dir)
        if manifest is not None:
            trained = manifest["base_model"]
            bases[adapter_dir] = (trained["name"], json.dumps(trained.get("quantization")))
        else:
            config = json.loads((adapter_dir / "adapter_config.json").read_text())
            if config.get("base_model_name_or_path"):
                bases[adapter_dir] = (config["base_model_name_or_path"], "null")
    names = {b for b, _ in bases.values()}
    if len(names) != 1:
        found = ", ".join(f"{p}: {b}" for p, (b, _) in bases.items()) or "none recorded"
        raise ServingError(
            f"give the base model explicitly: the adapters do not name one ({found})"
        )
    quantizations = {q for _, q in bases.values()}
    return names.pop(), json.loads(quantizations.pop()) if len(quantizations) == 1 else None


def _quantization(
    value: Quantize | QuantizationSpec | dict[str, Any] | None, recorded: dict[str, Any] | None
) -> QuantizationSpec | dict[str, Any] | None:
    """A `Quantize` word as a quantization section ("auto": the one the adapters recorded)."""
    words: dict[str, Any] = {"auto": recorded, "none": None, "4": {"bits": 4}, "8": {"bits": 8}}
    return words[value] if isinstance(value, str) and value in words else value


class AdapterSet:
    """A base model loaded once with any number of named LoRA adapters attached."""

    def __init__(
        self,
        base: str,
        *,
        dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto",
        quantization: QuantizationSpec | dict[str, Any] | None = None,
        device: str | torch.device | None = None,
        trust_remote_code: bool = False,
        allow_mismatch: bool = False,
        default_system: bool = True,
    ) -> None:
        """Load the base model and its tokenizer.

        Args:
            base: hub id, local folder or `builtin:` name, as in a recipe's model.name.
            dtype: weights dtype; auto = bf16 on a GPU that supports it, fp32 on CPU.
            quantization: load the base in 4/8 bit (as QLoRA adapters were trained).
            allow_mismatch: load adapters whose manifest names another base (warn, don't refuse).
            default_system: give chat prompts without a system turn their adapter's training
                system prompt (False: render them as given).
        """
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(quantization, dict):
            quantization = QuantizationSpec(**quantization)
        self.spec = ModelSpec(
            name=base, quantization=quantization, trust_remote_code=trust_remote_code
        )
        self.tokenizer: PreTrainedTokenizerBase = load_tokenizer(self.spec)
        self.model: torch.nn.Module = load_model(self.spec, self._dtype(dtype), self.device)
        self.model.eval()
        self.identity = BaseIdentity.of(base, self.model, self.tokenizer)
        self.allow_mismatch = allow_mismatch
        self.default_system = default_system
        self.adapters: dict[str, LoadedAdapter] = {}
        self.warnings: list[str] = []
        self._active: str | None = None
        self._tuner_layers: list[BaseTunerLayer] = []
        own = self.tokenizer.chat_template
        self._base_template = own if isinstance(own, str) else FALLBACK_TEMPLATE
        self._base_stop = {self.tokenizer.eos_token_id}

    @classmethod
    def from_adapters(
        cls,
        adapters: dict[str, str | Path],
        base: str | None,
        dtype: str,
        quantization: Quantize | QuantizationSpec | dict[str, Any] | None,
        allow_mismatch: bool = False,
        default_system: bool = True,
    ) -> AdapterSet:
        """Load the base (given, or the one the adapters' manifests name) and every adapter.

        Args:
            quantization: a `Quantize` word ("auto" = as the adapters were trained), None =
                unquantized, or a quantization section ({"bits": 4}).
        """
        recorded_base, recorded_quant = (
            base_of(list(adapters.values())) if adapters else (None, None)
        )
        if base is None and recorded_base is None:
            raise ServingError("give the base model: there are no adapters to read it from")
        aset = cls(
            base or recorded_base,
            dtype=dtype,
            quantization=_quantization(quantization, recorded_quant),
            allow_mismatch=allow_mismatch,
            default_system=default_system,
        )
        for name, path in adapters.items():
            aset.add(name, path)
        return aset

    def _dtype(self, dtype: str) -> torch.dtype:
        if dtype != "auto":
            return DTYPES[dtype]
        cuda_bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32

    # ------------------------------------------------------------------ adapters
    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    @property
    def active(self) -> str | None:
        """The active adapter's name, or None when the base model runs alone."""
        return self._active

    def add(self, name: str, path: str | Path, allow_mismatch: bool | None = None) -> LoadedAdapter:
        """Load the adapter at `path` (adapter folder or run directory) under `name`.

        Raises:
            AdapterMismatchError: the adapter was trained on another base model or tokenizer.
            ServingError: bad name, name taken, or a method that cannot share a base.
        """
        if not NAME_PATTERN.match(name) or name == BASE:
            raise ServingError(
                f"adapter name {name!r}: use letters, digits, '.', '_', '-' (up to 64), not {BASE!r}"
            )
        if name in self.adapters:
            raise ServingError(f"an adapter named {name!r} is already loaded; remove it first")
        adapter_dir = resolve_adapter_dir(path)
        damaged = damaged_weight_files(adapter_dir)
        if damaged:
            raise ServingError(
                f"adapter {name!r}: damaged or truncated weights file {'; '.join(damaged)}. "
                "Copy the adapter again"
            )
        manifest = read_manifest(adapter_dir)
        peft_config = json.loads((adapter_dir / "adapter_config.json").read_text())
        method = manifest["method"] if manifest else peft_config.get("peft_type", "?").lower()
        if peft_config.get("peft_type") != "LORA":
            raise ServingError(
                f"adapter {name!r} is {method} ({peft_config.get('peft_type')}): only LoRA-family "
                "adapters (lora, qlora, DoRA, rsLoRA) can share one base model and mix in a batch"
            )
        allow = self.allow_mismatch if allow_mismatch is None else allow_mismatch
        self.warnings += check_compatible(name, adapter_dir, manifest, self.identity, allow)
        template = _adapter_chat_template(adapter_dir) or self._base_template
        stop = {
            self.tokenizer.convert_tokens_to_ids(t) for t in (manifest or {}).get("stop_tokens", [])
        }
        previous = self._active
        try:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=False)
            else:
                self.model = PeftModel.from_pretrained(
                    self.model, str(adapter_dir), adapter_name=name, is_trainable=False
                )
        except (RuntimeError, ValueError, KeyError) as e:
            raise ServingError(
                f"adapter {name!r} ({adapter_dir}) does not fit the base model {self.spec.name!r}: "
                f"{str(e).splitlines()[0][:300]}"
            ) from None
        self.model.eval()
        loaded = LoadedAdapter(
            name,
            adapter_dir,
            method,
            manifest,
            template,
            stop | self._base_stop,
            default_system_prompt(manifest),
        )
        self.adapters[name] = loaded
        self._refresh_layers()
        self.activate(previous)
        return loaded

    def remove(self, name: str) -> None:
        """Unload an adapter and free its weights."""
        self._require(name)
        del self.adapters[name]
        if not self.adapters:  # peft keeps at least one adapter: go back to the plain base model
            self.model = self.model.unload()
        else:
            self.model.delete_adapter(name)
        self._refresh_layers()
        self.activate(None if self._active == name else self._active)

    def activate(self, name: str | None) -> None:
        """Route forwards through adapter `name`; None (or "base") runs the base model alone."""
        name = None if name == BASE else name
        if name is not None:
            self._require(name)
        if isinstance(self.model, PeftModel):
            if self._plain_lora:
                _compat.switch_lora_adapter(self.model, self._tuner_layers, name)
            elif name is None:
                self.model.base_model.disable_adapter_layers()
            else:
                self.model.base_model.enable_adapter_layers()
                self.model.set_adapter(name)
        self._active = name

    def disable(self) -> None:
        """Run the base model alone (every adapter stays loaded)."""
        self.activate(None)

    def _require(self, name: str) -> LoadedAdapter:
        if name not in self.adapters:
            known = ", ".join(self.adapters) or "none"
            raise ServingError(f"no adapter named {name!r} is loaded (loaded: {known})")
        return self.adapters[name]

    def _refresh_layers(self) -> None:
        modules = list(self.model.modules())
        self._tuner_layers = [m for m in modules if isinstance(m, BaseTunerLayer)]
        # modules_to_save copies switch through peft's own (slower, complete) path, as do peft
        # versions the fast path was not checked against
        self._plain_lora = _compat.fast_lora_switch_supported() and not any(
            isinstance(m, ModulesToSaveWrapper) for m in modules
        )

    # ------------------------------------------------------------------ generation
    def stop_ids(self, adapter: str | None) -> set[int]:
        return self.adapters[adapter].stop_ids if adapter else self._base_stop

    def system_prompt(self, adapter: str | None) -> str | None:
        """The system prompt chat prompts without one get on `adapter` (None: none is added)."""
        if adapter is None or not self.default_system:
            return None
        return self.adapters[adapter].system_prompt

    def encode(
        self,
        prompt: Prompt,
        adapter: str | None,
        default_system: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Token ids of a prompt: chat messages through the adapter's chat template, text as is.

        Messages whose first turn is not a system turn get the adapter's training system prompt
        first (`system_prompt`), unless `default_system` is False. `tools` (OpenAI function
        definitions) go to the template, which writes them into the prompt."""
        if isinstance(prompt, str):
            return self.tokenizer(prompt)["input_ids"]
        messages = self.with_system(prompt, adapter) if default_system else prompt
        text = self.render(messages, adapter, tools)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def with_system(self, messages: list[dict[str, str]], adapter: str | None) -> list[dict]:
        """`messages` with the adapter's training system prompt first when they have no system
        turn of their own (unchanged when the adapter has none or defaults are off)."""
        system = self.system_prompt(adapter)
        if system is not None and (not messages or messages[0]["role"] != "system"):
            return [{"role": "system", "content": system}, *messages]
        return messages

    def chat_template(self, adapter: str | None) -> str:
        """The chat template prompts on `adapter` (None: the base model) are rendered with."""
        return self.adapters[adapter].chat_template if adapter else self._base_template

    def render(
        self,
        messages: list[dict[str, Any]],
        adapter: str | None,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """Chat messages (and `tools`, for a template that renders them) as the text the
        adapter's chat template makes of them, with the assistant's turn opened."""
        return self.tokenizer.apply_chat_template(
            messages,
            tools=tools or None,
            chat_template=self.chat_template(adapter),
            tokenize=False,
            add_generation_prompt=True,
        )

    def generate(
        self,
        prompts: list[Prompt],
        adapter: str | list[str | None] | None = None,
        options: SamplingOptions | None = None,
        seed: int | None = None,
        default_system: bool = True,
    ) -> list[Completion]:
        """Continue each prompt, in one batch.

        Args:
            prompts: texts (continued as they are) or chat message lists (the adapter's template).
            adapter: one name for every row, one per row (mixed batch), or None for the active one.
                "base" or None in a per-row list means the base model for that row.
            options: sampling settings shared by the batch (default: greedy, 128 new tokens).
            seed: seed torch's RNG first, for reproducible sampling.
            default_system: give chat prompts without a system turn their row's adapter's
                training system prompt (each row its own, in a mixed batch).
        """
        options = options or SamplingOptions()
        per_row = adapter if isinstance(adapter, list) else [adapter or self._active] * len(prompts)
        if len(per_row) != len(prompts):
            raise ServingError(f"{len(prompts)} prompts but {len(per_row)} adapter names")
        per_row = [None if a in (None, BASE) else a for a in per_row]
        for name in {a for a in per_row if a is not None}:
            self._require(name)
        rows = [
            Row(self.encode(p, a, default_system), a, options, self.stop_ids(a))
            for p, a in zip(prompts, per_row)
        ]
        if seed is not None:
            torch.manual_seed(seed)
        return self.generate_rows(rows)

    def generate_rows(self, rows: list[Row]) -> list[Completion]:
        """Generate for prepared rows (shared sampling settings); the serving engine's entry point.

        All rows on one adapter run through the ordinary (switched) path, exactly as that adapter
        loaded alone; rows on different adapters run through peft's mixed-adapter path."""
        names = [r.adapter for r in rows]
        mixed = len(set(names)) > 1
        previous = self._active
        # the mixed path needs adapter layers enabled: any loaded adapter active does that
        self.activate(next(n for n in names if n) if mixed else names[0])
        try:
            adapter_names = [n or "__base__" for n in names] if mixed else None
            return generate_rows(self.model, self.tokenizer, rows, adapter_names)
        finally:
            self.activate(previous)


def _adapter_chat_template(adapter_dir: Path) -> str | None:
    """The chat template saved beside the adapter (the one its training data was rendered with)."""
    jinja = adapter_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = adapter_dir / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text()).get("chat_template")
        if isinstance(template, str):
            return template
    return None
