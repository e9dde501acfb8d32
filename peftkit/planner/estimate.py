"""Peak-memory arithmetic for one training step, component by component.

For a decoder with hidden size h, MLP width I, key/value width h_kv, L layers, T tokens in the
largest micro-batch and compute dtype of b bytes:

  weights      quantized linears: 4-bit 0.5 B (+ absmax ~1/64 B), 8-bit 1 B per weight; the rest
               (embeddings, norms, head) in the compute dtype, or fp32 with
               `quantization.upcast_unquantized`
  adapter      trainable parameters added by the method, fp32 (peft keeps adapters in fp32)
  gradients    one per trainable parameter, in its dtype
  optimizer    AdamW: two fp32 moments (8 B) per trainable parameter; 8-bit variants: 2 B
  activations  per layer and token, what autograd keeps for backward: the two RMSNorm inputs and
               their fp32 upcasts, q/k/v and the rotated q/k, the attention output, the MLP's
               gate/up/act/product:  b (8h + 3 h_kv + 4 I) + 4 (2h)  bytes, plus, for LoRA under
               half precision, the fp32 copy of each adapted layer's input peft casts. With
               gradient checkpointing: only each layer's input (b h) plus one layer's full set.
               The fused LoRA MLP (kernels/lora_mlp.py; any precision, 4-bit bases included,
               not 8-bit or an fp32-upcast 4-bit base) keeps 2 I, not 4 I, and none of the
               fp32 input copies of its three projections (2h + I).
  experts      a mixture-of-experts layer (transformers 5's 3-D experts, T k routed rows for
               k experts per token, expert width I_e, E experts) keeps, instead of the dense
               MLP's 4 I: per routed row its gathered input, gate/up output, act(gate), the
               product and the down output, b (2h + 4 I_e) (gpt-oss's clamped GLU: 7 I_e;
               frozen experts keep neither matmul's input: h + I_e less), plus 28 B of
               indices and routing weight; per token the fp32 router probabilities and top-k
               picks, 4E + 12k; a frozen shared expert's MLP, b 3 I_s. A LoRA on the expert
               weights (`target_parameters`) rebuilds each adapted weight as W + s·BA on every
               forward (peft's parametrization) and autograd keeps that copy, in the weights'
               dtype (over 16-bit weights also the fp32 LoRA factors cast to it); autocast to
               half precision over fp32 weights is assumed to keep a b-byte copy of it as well
               (not verified).
  logits       supervised-only: K supervised positions x vocab in b bytes, plus fp32 chunks;
               fused with the head (kernels/linear_ce.py): one chunk's transients
               (`linear_ce.chunk_bytes`: rows_per_chunk(vocab) x vocab x (8 + b), + 4 when
               soft-capped) and the kept gradient K x h (fp32 under fp16, else b); otherwise T x
               vocab in b bytes, its fp32 upcast and the fp32 log-softmax
  backward     transients while backward runs: one layer's activation gradients and the gradient
               of the kept logits (fp32; none when fused with the head)
  cpu slack    CPU only: glibc and oneDNN keep freed and scratch memory resident; measured on the
               benchmark workload (torch 2.13, glibc) as ~45% of the step's transient tensors
               (activations + logits + backward; with the fused MLP, also the silu(g) and h it
               makes and frees). Not a law of nature: see benchmarks/README.md.
  sharding     per process, with N processes: FSDP and DeepSpeed ZeRO-2/3 divide gradients and
               optimizer state by N; FSDP (reshard after forward) and ZeRO-3 also the weights and
               adapter, plus one decoder layer's weights gathered at a time; DDP divides nothing
  generation   the generation-based evaluation (`eval.metric`), no gradients, on top of the
               state training keeps (weights, adapter, optimizer): the KV cache of eval.batch_size
               rows x (longest prompt + max_new_tokens) x layers x 2 h_kv x b, one layer's
               prefill activations (rows x prompt x (4h + 2I) x 4 B) and the last position's
               logits (rows x vocab x (b + 4 + 4): the head's output, its fp32 copy and the
               greedy pick's). Counted as its excess over training's transients, since the two
               never coexist.
  runtime      CPU: the resident size of a process that has imported torch and transformers
               (measured by the planner itself); GPU: the CUDA context (CUDA_CONTEXT: driver,
               kernels, cuBLAS workspace; outside torch's allocator) and the caching allocator's
               slack (GPU_ALLOCATOR_SLACK of the transient tensors: freed blocks it keeps and
               rounding), so the total compares with nvidia-smi, and the total less the context
               with `torch.cuda.max_memory_reserved`, which peftkit reports on GPU. Both GPU
               figures are allowances from PyTorch's documented behaviour, not measured here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peftkit.kernels.chunked_ce import CE_CHUNK_ROWS
from peftkit.kernels.linear_ce import chunk_bytes
from peftkit.planner.counts import ModelCounts, MoECounts
from peftkit.training.generated import row_bytes

BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
STORAGE = {"bfloat16": 2, "float16": 2, "float32": 4}
CPU_SLACK = 0.45
CUDA_CONTEXT = 0.5 * 2**30
"""Bytes of a CUDA context with torch's kernels and cuBLAS workspace (~300-600 MiB by GPU)."""
GPU_ALLOCATOR_SLACK = 0.15
"""Reserved beyond allocated, as a share of the step's transient tensors."""
OPTIMIZER_BYTES = {"adamw": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2, "paged_adamw_32bit": 8}


@dataclass
class Workload:
    """The shape of the largest micro-batch the run will see."""

    tokens: int
    """Tokens the model computes in the micro-batch (padding included when not packing)."""
    supervised: int
    """Positions that carry loss in it."""
    generation_rows: int = 0
    """Rows generated at once by the evaluation (0: it does not generate)."""
    generation_tokens: int = 0
    """Longest prompt plus new tokens of a generated row."""
    prompt_tokens: int = 0
    """Longest prompt of a generated row."""


@dataclass
class Estimate:
    parts: dict[str, float] = field(default_factory=dict)  # bytes per component

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def estimate(
    counts: ModelCounts,
    *,
    precision: str,
    storage_dtype: str,
    quant_bits: int | None,
    full_weights: bool,
    optimizer: str,
    gradient_checkpointing: bool,
    supervised_only: bool,
    lora: bool,
    work: Workload,
    runtime_bytes: float,
    cpu: bool,
    shards: int = 1,
    shard_weights: bool = False,
    upcast_unquantized: bool = False,
) -> Estimate:
    c, b = counts, BYTES[precision]
    store = STORAGE[storage_dtype]
    e = Estimate()
    rest = c.base_params - c.quantizable_params
    rest_bytes = 4 if upcast_unquantized else b
    if quant_bits == 4:
        e.parts["weights"] = c.quantizable_params * (0.5 + 1 / 64) + rest * rest_bytes
    elif quant_bits == 8:
        e.parts["weights"] = c.quantizable_params * 1.0 + rest * rest_bytes
    else:
        e.parts["weights"] = c.base_params * store
    e.parts["adapter"] = c.adapter_params * 4
    trainable_bytes = store if full_weights else 4
    e.parts["gradients"] = c.trainable_params * trainable_bytes
    e.parts["optimizer"] = c.trainable_params * OPTIMIZER_BYTES[optimizer]
    if full_weights and precision != "fp32" and store == 4:
        # autocast keeps a half-precision copy of every fp32 weight it casts, until backward
        e.parts["autocast copies"] = c.quantizable_params * b

    t, h, i = work.tokens, c.hidden, c.intermediate
    kv = c.kv_width or c.kv_heads * (c.hidden // c.heads)
    # the fused MLP needs its input in the compute dtype: not behind fp32-upcast norms
    fused_mlp = c.fused_mlp and quant_bits != 8 and not (quant_bits and upcast_unquantized)
    per_layer = t * (b * (8 * h + 3 * kv + (2 if fused_mlp else 4) * i) + 4 * 2 * h)
    # The fused MLP still makes silu(g) and h for a moment (forward, and again in backward): the
    # allocator's slack follows what is allocated, not what is kept.
    allocated_per_layer = per_layer + (t * b * 2 * i if fused_mlp else 0)
    if lora and precision != "fp32":
        copies = c.adapter_input_features - ((2 * h + i) if fused_mlp else 0)
        per_layer += t * copies * 4
        allocated_per_layer += t * copies * 4
    moe_extra = 0.0  # an MoE layer's experts in place of its dense MLP
    if c.moe is not None:
        moe_extra = moe_layer_bytes(c.moe, h, t, b, store) - t * b * (2 if fused_mlp else 4) * i
    if gradient_checkpointing:
        e.parts["activations"] = c.layers * t * h * b + per_layer + max(moe_extra, 0.0)
    else:
        e.parts["activations"] = c.layers * per_layer + (c.moe.layers if c.moe else 0) * moe_extra
    fused_head = supervised_only and c.fused_head
    if fused_head:
        rows = min(work.supervised, c.fused_chunk_rows)
        kept_grad = 4 if precision == "fp16" else b  # fp16 keeps it fp32 (loss scaling)
        e.parts["logits"] = chunk_bytes(c.vocab, b, c.head_softcap, rows) + (
            work.supervised * h * kept_grad
        )
    elif supervised_only:
        e.parts["logits"] = (
            work.supervised * c.vocab * b + min(work.supervised, CE_CHUNK_ROWS) * c.vocab * 4 * 2
        )
    else:
        e.parts["logits"] = t * c.vocab * (b + 4 + 4)
    kept = 0 if fused_head else work.supervised if supervised_only else t
    e.parts["backward"] = per_layer + kept * c.vocab * 4
    transient = (
        e.parts["activations"]
        + (c.layers if not gradient_checkpointing else 1) * (allocated_per_layer - per_layer)
        + e.parts["logits"]
        + e.parts["backward"]
    )
    generating = generation_bytes(c, work, b)
    if generating:
        e.parts["generation"] = max(0.0, generating - transient)
        transient = max(transient, generating)
    if cpu:
        e.parts["cpu slack"] = CPU_SLACK * transient
    else:
        e.parts["allocator slack"] = GPU_ALLOCATOR_SLACK * transient
    if shards > 1:  # per process: each holds 1/N of what is sharded
        e.parts["gradients"] /= shards
        e.parts["optimizer"] /= shards
        if shard_weights:
            quantized = (0.5 + 1 / 64) if quant_bits == 4 else 1.0 if quant_bits == 8 else store
            gathered = c.quantizable_params * quantized / max(c.layers, 1)  # one layer at a time
            e.parts["weights"] = e.parts["weights"] / shards + gathered
            e.parts["adapter"] /= shards
    e.parts["runtime" if cpu else "cuda context"] = runtime_bytes
    return e


def moe_layer_bytes(moe: MoECounts, hidden: int, tokens: int, b: int, store: int) -> float:
    """Bytes one mixture-of-experts MLP keeps for backward over `tokens` tokens (module
    docstring, `experts`), in a compute dtype of `b` bytes over weights of `store` bytes."""
    routed = tokens * moe.experts_per_token
    widths = 2 * hidden + moe.kept_widths * moe.intermediate
    if not moe.adapted_params:  # frozen expert weights: their inputs need no keeping
        widths -= hidden + moe.intermediate
    return float(
        routed * (b * widths + 28)
        + tokens * (4 * moe.experts + 12 * moe.experts_per_token)
        + tokens * b * 3 * moe.shared_intermediate  # gate, act(gate), up: frozen down
        + moe.adapted_params * store
        + (moe.adapter_params * store if store != 4 else 0)
        + (moe.adapted_params * b if store == 4 and b != 4 else 0)
    )


def generation_bytes(c: ModelCounts, work: Workload, b: int) -> float:
    """Transient bytes of the evaluation's generate call (module docstring, `generation`)."""
    if work.generation_rows == 0:
        return 0.0
    new = work.generation_tokens - work.prompt_tokens
    return float(work.generation_rows * generated_row_bytes(c, work.prompt_tokens, new, b))


def generated_row_bytes(c: ModelCounts, prompt_tokens: int, new_tokens: int, b: int) -> int:
    """`training.generated.row_bytes` for a model of these counts."""
    return row_bytes(
        vocab=c.vocab,
        layers=c.layers,
        kv_width=c.kv_width or c.kv_heads * (c.hidden // c.heads),
        hidden=c.hidden,
        intermediate=c.intermediate,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        value_bytes=b,
    )
