"""The one home for version-guarded workarounds of library quirks. Each says what it guards and why.

Every private attribute peftkit touches is listed in `PRIVATE_API` (the test suite checks each one
against the installed libraries, so an upgrade that removes one fails loudly) and is reached
through `_private`, which names the library and version when it is gone. Type checks against
optional libraries (bitsandbytes) are `isinstance` on the loaded module, never class-name strings.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from importlib import metadata
from typing import Any

from packaging.version import Version

# (library, object that holds it, private attribute, the versions it was checked with)
PRIVATE_API = (
    ("accelerate", "accelerate.state.AcceleratorState", "_reset_state", "1.6-1.15"),
    ("accelerate", "accelerate.state.GradientState", "_reset_state", "1.6-1.15"),
    ("accelerate", "accelerate.state.PartialState", "_shared_state", "1.6-1.15"),
    ("deepspeed", "deepspeed.ops", "__compatible_ops__", "0.19"),
    ("peft", "peft.tuners.tuners_utils.BaseTunerLayer", "_active_adapter", "0.17-0.21"),
    ("peft", "peft.tuners.tuners_utils.BaseTunerLayer", "_disable_adapters", "0.17-0.21"),
    (
        "transformers",
        "transformers.modeling_gguf_pytorch_utils",
        "GGUF_SUPPORTED_ARCHITECTURES",
        "4.4x-5.24",
    ),
    ("transformers", "transformers.PretrainedConfig", "_attn_implementation", "5.0-5.24"),
    (
        "transformers",
        "transformers.utils.chat_template_utils",
        "_compile_jinja_template",
        "5.24",
    ),
)

FAST_LORA_SWITCH_PEFT = (Version("0.17"), Version("0.22"))
"""peft versions whose adapter switching `switch_lora_adapter` reproduces (checked: 0.17-0.21);
outside them peftkit switches through peft's own, slower `set_adapter`."""
FAST_CHAT_RENDER_TRANSFORMERS = (Version("5.0"), Version("6"))
"""transformers versions whose `apply_chat_template(..., tokenize=False)` `chat_renderer`
reproduces (checked: 5.24, with jinja2 3.1); outside them peftkit renders through
`apply_chat_template` itself."""


class PrivateApiChanged(RuntimeError):
    """A library no longer has a private attribute a peftkit workaround relies on."""


def installed(library: str) -> Version:
    return Version(metadata.version(library))


def _private(owner: Any, attr: str, library: str) -> Any:
    """`owner.attr`, which is private to `library`; a clear error naming the version if it is gone."""
    if not hasattr(owner, attr):
        checked = next((c for lib, _, a, c in PRIVATE_API if lib == library and a == attr), "?")
        raise PrivateApiChanged(
            f"{library} {installed(library)} has no {getattr(owner, '__name__', type(owner).__name__)}"
            f".{attr}, which peftkit relies on (checked with {library} {checked}): "
            "use a version in that range, or update peftkit/_compat.py"
        )
    return getattr(owner, attr)


def fast_lora_switch_supported() -> bool:
    low, below = FAST_LORA_SWITCH_PEFT
    return low <= installed("peft") < below


def _loaded_bitsandbytes() -> Any:
    """The bitsandbytes module if something imported it (else no bitsandbytes object can exist)."""
    return sys.modules.get("bitsandbytes")


def is_packed_4bit(param: Any) -> bool:
    """A bitsandbytes 4-bit weight: two values per stored uint8."""
    bnb = _loaded_bitsandbytes()
    return bnb is not None and isinstance(param, bnb.nn.Params4bit)


def is_quantized_linear(module: Any) -> bool:
    """A bitsandbytes 4-bit or 8-bit linear layer."""
    bnb = _loaded_bitsandbytes()
    return bnb is not None and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def quiet_bitsandbytes_cpu_kernel_warning() -> None:
    """bitsandbytes >= 0.49 on CPUs with AVX512-BF16 tries to fetch an optional fused 4-bit kernel
    from the Hugging Face hub via the `kernels` package and logs a warning when that fails (always,
    offline). The built-in CPU path is used instead and is correct, so the warning is noise."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def accelerator_kwargs() -> dict[str, bool]:
    """accelerate 1.x only forms a multi-process CPU group (gloo) under torchrun when told the run
    is on CPU (`cpu=True`); without it every process believes it is alone."""
    import torch

    return {"cpu": not torch.cuda.is_available()}


def keep_bnb_4bit_cpu_weights_unpacked(model) -> int:
    """bitsandbytes >= 0.49 on CPUs with AVX512-BF16: the first forward of a `Linear4bit` in eval
    mode with an input that does not require grad repacks its weight for a bf16 inference kernel,
    and from then on *every* forward (training too) goes through that kernel (`gemv_4bit`). So an
    evaluation in the middle of QLoRA training would switch the rest of training to different
    numerics (~1e-3 logit changes). Turning the fast path off per module keeps training, evaluation
    and the saved adapter on the same fp32-dequantize path. Returns the number of modules changed."""
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def contiguous_head_input(model) -> bool:
    """torch 2.13 (CPU): `F.linear` of a non-contiguous 3-D bf16/fp16 input by a weight that does
    not require grad materialises (batch, out, in): `logits_to_keep=1` hands the head the last
    position as such a slice, so generating for 20 prompts with Gemma 3's 262k x 640 head (frozen
    under LoRA) allocated 6.4 GiB for 20 x 262k logits (measured; fp32, a contiguous input or a
    weight that requires grad take the plain matmul). A pre-hook on the output layer hands it a
    contiguous copy of such an input (batch x kept x hidden: small). Returns whether it was added."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        return False
    HALF = (torch.bfloat16, torch.float16)

    def contiguous(module, args):
        x = args[0]
        if x.device.type == "cpu" and x.dim() > 2 and x.dtype in HALF and not x.is_contiguous():
            return (x.contiguous(), *args[1:])
        return None

    head.register_forward_pre_hook(contiguous)
    return True


def release_freed_cpu_memory() -> None:
    """glibc keeps memory freed by torch's CPU allocator in its heaps. Training with varying
    micro-batch shapes then grows the resident size step after step (measured on the 52M benchmark:
    peak RSS 3.4 GiB after 20 bf16 steps without this, 2.5 GiB with it), though live tensors do not
    grow. `malloc_trim(0)` after each optimizer step hands that memory back. (Also trimming
    between each micro-batch's forward and backward lowered SmolLM2-135M's peak RSS by 5-14% but
    cost 4.5-10% of speed, page faults on memory touched again: not done.) No-op off glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def allow_new_mixed_precision() -> None:
    """accelerate (1.x) keeps one process-wide `AcceleratorState` and refuses an `Accelerator` with
    another mixed precision ("AcceleratorState has already been initialized and cannot be
    changed"), so a notebook that trains a bf16 recipe and then an fp32 one fails. Clearing that
    state (not the distributed `PartialState`) before each run lets each run choose its precision."""
    from accelerate.state import AcceleratorState, GradientState

    _private(AcceleratorState, "_reset_state", "accelerate")(reset_partial_state=False)
    _private(GradientState, "_reset_state", "accelerate")()


def switch_lora_adapter(peft_model, tuner_layers: list, name: str | None) -> None:
    """Make `name` the active adapter (None: no adapter) of a peft model held for inference.

    peft (0.17-0.21) `set_adapter` walks `model.modules()` — which holds every loaded adapter's
    submodules — and sets requires_grad on each adapter's weights, so switching slows down with
    every adapter loaded (O(adapters x layers); see benchmarks/adapters.py). For inference only the
    layers' active-adapter list and disable flag matter; both are the attributes peft's own
    `BaseTunerLayer.set_adapter` / `enable_adapters` assign, set here on a cached list of layers
    (O(layers), independent of how many adapters are loaded). Only for the peft versions of
    `FAST_LORA_SWITCH_PEFT` (see `fast_lora_switch_supported`)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    _private(BaseTunerLayer, "_active_adapter", "peft")
    _private(BaseTunerLayer, "_disable_adapters", "peft")
    for layer in tuner_layers:
        if name is None:
            layer._disable_adapters = True
        else:
            layer._active_adapter = [name]
            layer._disable_adapters = False
    if name is not None:
        peft_model.base_model.active_adapter = name


def chat_renderer(tokenizer) -> Callable[..., str]:
    """`render(messages, add_generation_prompt, tools=None, **variables)`: the text of
    `tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
    add_generation_prompt=..., **variables)` with the tokenizer's template and special tokens as
    they are now, for messages in the canonical form `peftkit.data.formats` makes (plain dicts of
    JSON types, no None values, reasoning under `reasoning_content`).

    transformers 5.x (checked: 5.24-5.25) normalises every conversation before rendering (message
    objects to dicts, None values dropped, reasoning fields aliased, everything rebuilt from JSON
    types), a no-op for such messages but for the `thinking` alias of `reasoning_content` that it
    adds (for gpt-oss templates; added here too); and jinja (3.1) merges the template's globals
    into every render's context. Together two thirds of the cost of rendering a short chat. This
    renders the same compiled template (`_compile_jinja_template`, cached per template) with the
    same variables (the globals, then messages, tools, documents=None, add_generation_prompt, the
    special tokens and the extra variables) merged once, as `Template.render` does, so the text is
    identical (tests/unit/test_compat.py compares them). Outside `FAST_CHAT_RENDER_TRANSFORMERS`,
    `apply_chat_template` itself."""
    if not _fast_chat_render_supported():

        def slow(messages, add_generation_prompt, tools=None, **variables):
            return tokenizer.apply_chat_template(
                messages,
                tools=tools,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )

        return slow
    from transformers.utils import chat_template_utils

    compile_template = _private(chat_template_utils, "_compile_jinja_template", "transformers")
    template = compile_template(tokenizer.get_chat_template())
    base = {**template.globals, **tokenizer.special_tokens_map, "documents": None}

    def render(messages, add_generation_prompt, tools=None, **variables) -> str:
        if not messages:  # apply_chat_template's own refusal
            raise ValueError("Cannot apply chat template to an empty conversation.")
        if any("reasoning_content" in m for m in messages):
            messages = [
                {"thinking": m["reasoning_content"], **m} if "reasoning_content" in m else m
                for m in messages
            ]
        context = template.new_context(
            {
                **base,
                "tools": tools,
                **variables,
                "messages": messages,
                "add_generation_prompt": add_generation_prompt,
            },
            shared=True,  # the globals are in already
        )
        try:
            return template.environment.concat(template.root_render_func(context))
        except Exception:
            template.environment.handle_exception()  # re-raises, as Template.render does

    return render


@functools.cache
def _fast_chat_render_supported() -> bool:
    low, below = FAST_CHAT_RENDER_TRANSFORMERS
    return low <= installed("transformers") < below


def gguf_architectures() -> set[str]:
    """GGUF `general.architecture` names transformers (5.x) can read, from its own table
    (`modeling_gguf_pytorch_utils.GGUF_SUPPORTED_ARCHITECTURES`, present in 4.4x and 5.x)."""
    from transformers import modeling_gguf_pytorch_utils

    return set(
        _private(modeling_gguf_pytorch_utils, "GGUF_SUPPORTED_ARCHITECTURES", "transformers")
    )


def attention_implementation(model) -> str | None:
    """The attention kernel a transformers model runs ("sdpa", "eager", "flash_attention_2", ...):
    `config._attn_implementation`, which transformers (checked 5.0-5.24) sets from
    `from_pretrained(attn_implementation=...)` and has no public getter for. None for a model
    whose config has none (then nothing is assumed about how it masks packed rows)."""
    return getattr(model.config, "_attn_implementation", None)


def gguf_dequantize_config():
    """transformers >= 5.2x can keep GGUF weights packed (`GgufConfig(dequantize=False)`, the
    default) and cast them in every matmul where a `kernels` GGUF kernel exists; peftkit trains on
    plain dense weights, so it always asks for the dequantized model."""
    from transformers import GgufConfig

    return GgufConfig(dequantize=True)


def detach_gguf_quantizer(model) -> None:
    """A model read from GGUF keeps the GGUF quantizer (`model.hf_quantizer`) and its
    `config.quantization_config`, and `save_pretrained` refuses such a model (GGUF is not
    "serializable"), though its weights are already dense. Checked: transformers 5.24. Refuses a
    model whose weights are not plain floating-point tensors (a packed GGUF module)."""
    import torch

    packed = [n for n, p in model.named_parameters() if not torch.is_floating_point(p)]
    if packed:
        raise ValueError(f"GGUF weights were kept packed ({packed[0]}, ...); expected dense")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def readable_gguf_name(name: str) -> str:
    """transformers (checked on 5.24) reads a "llama" GGUF whose `general.name` is exactly "mistral"
    as a Mistral model, then fails to find a "mistral" architecture in gguf-py (0.19 has none), so
    such a file cannot be loaded at all. Any other name reads as Llama, which is also how llama.cpp
    runs Mistral files; so that one name gets a suffix."""
    return f"{name}-model" if name.strip().lower() == "mistral" else name


# GGUF `tokenizer.ggml.pre` names whose pre-tokenizer transformers' GGUF reader does not rebuild
# (checked: 5.24 reads every BPE file as plain GPT-2 byte-level): digits split one by one first.
_GGUF_DIGIT_SPLITTING_PRE = {"smollm", "starcoder", "deepseek-coder", "refact"}


def restore_gguf_pre_tokenizer(tokenizer, pre: str | None) -> bool:
    """Put back the digit splitting that llama.cpp applies for `pre` (its `llama-vocab.cpp`
    regexes split every digit on its own for these names, as the original tokenizer.json does:
    `Sequence[Digits(individual_digits=True), ByteLevel]`), so "24" is two tokens as in
    training of the base. Returns whether the tokenizer was changed."""
    from tokenizers import pre_tokenizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if pre not in _GGUF_DIGIT_SPLITTING_PRE or backend is None:
        return False
    current = backend.pre_tokenizer
    if current is None or "Digits" in repr(current):
        return False
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), current]
    )
    return True


def fsdp_on_cpu(accelerator) -> bool:
    """accelerate <= 1.15 (checked up to 1.15.0) forms FSDP only on GPU-like devices: on CPU an
    FSDP launch (ACCELERATE_USE_FSDP, gloo) silently becomes DDP. torch's FSDP2 (`fully_shard`)
    itself runs on CPU, so the accelerator state is switched to FSDP with the launch's plugin;
    accelerate's FSDP2 preparation then shards the model as it would on GPUs. Returns whether it
    switched. (The test of a 2-process FSDP run fails loudly when accelerate changes this.)"""
    import os

    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    wanted = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not wanted or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    if getattr(state, "fsdp_plugin", None) is None:
        plugin = FullyShardedDataParallelPlugin()  # reads the launch's FSDP_* variables
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    _private(PartialState, "_shared_state", "accelerate")["distributed_type"] = DistributedType.FSDP
    return True


def deepspeed_on_cpu(accelerator) -> bool:
    """accelerate <= 1.16 (checked: 1.15, 1.16) starts DeepSpeed only when not `cpu=True`, and a
    CPU multi-process run needs `cpu=True` to form its gloo group (`accelerator_kwargs`): so on CPU
    a DeepSpeed launch (ACCELERATE_USE_DEEPSPEED) silently becomes DDP. DeepSpeed itself runs on
    CPU (its CPU accelerator communicates over gloo when oneCCL is absent), so the accelerator
    state is switched to DeepSpeed with the launch's plugin, as accelerate does on GPUs (select it,
    let DeepSpeed own the precision); `prepare` then calls `deepspeed.initialize`. Returns whether
    it switched. (The test of a 2-process DeepSpeed run fails loudly when accelerate changes this.)"""
    import os

    from accelerate.state import PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    state = accelerator.state
    wanted = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if not wanted or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    skip_cpu_shm_kernel()
    plugin = getattr(state, "deepspeed_plugins", None) or DeepSpeedPlugin()  # the DS_* variables
    plugin.set_mixed_precision(state.mixed_precision)
    plugin.select(_from_accelerator_state=True)
    state.deepspeed_plugins = plugin
    state.distributed_type = DistributedType.DEEPSPEED
    _private(PartialState, "_shared_state", "accelerate")["distributed_type"] = (
        DistributedType.DEEPSPEED
    )
    return True


def skip_cpu_shm_kernel() -> None:
    """DeepSpeed (checked: 0.19.8) compiles, on CPU, a shared-memory all-reduce kernel the first
    time its communication starts on a machine (ninja and a C++ compiler: about a minute of CPU,
    and a failure where no compiler is installed). Only its inference all-reduce uses that kernel;
    training's collectives are torch.distributed's (gloo). So peftkit marks the kernel unavailable
    in DeepSpeed's table of compatible ops (`deepspeed.ops.__compatible_ops__`, probed once per
    process, which DeepSpeed reads before building it)."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    _private(deepspeed.ops, "__compatible_ops__", "deepspeed")[ShareMemCommBuilder.NAME] = False


def allow_mlflow_file_store() -> None:
    """MLflow 3 (checked with 3.17) keeps its local file store (`file:` tracking URIs) in
    maintenance mode and raises on it unless MLFLOW_ALLOW_FILE_STORE=true. peftkit's default MLflow
    store is a file store inside the run directory (readable offline, no database to create), so
    it opts in; a user's own setting of the variable wins."""
    import os

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def cache_keyword(model: Any) -> str:
    """The name under which a causal LM's forward takes its KV cache: `cache` since transformers
    5.2x, where `past_key_values` still works but warns (removal announced for 5.40); older 5.x
    releases know only `past_key_values`. Read from the (base) model's forward signature."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(type(base).forward).parameters
    return "cache" if "cache" in params else "past_key_values"
