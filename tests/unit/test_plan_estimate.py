"""The planner's arithmetic: the GPU runtime (CUDA context, allocator slack), the fused head's
chunk, and the evaluation's generate call."""

from __future__ import annotations

import pytest

from peftkit.kernels.linear_ce import chunk_bytes, rows_per_chunk
from peftkit.planner.counts import ModelCounts
from peftkit.planner.estimate import GPU_ALLOCATOR_SLACK, Workload, estimate, generation_bytes
from peftkit.training.generated import row_bytes, rows_per_generate

GEMMA_LIKE = ModelCounts(  # Gemma 3 270M's shape: 262k vocabulary, head_dim 256 > hidden / heads
    base_params=268_000_000,
    quantizable_params=100_000_000,
    trainable_params=3_800_000,
    adapter_params=3_800_000,
    adapter_input_features=640 * 4 + 2048,
    hidden=640,
    intermediate=2048,
    layers=18,
    heads=4,
    kv_heads=1,
    vocab=262_144,
    fused_head=True,
    head_softcap=False,
    kv_width=256,
    fused_chunk_rows=rows_per_chunk(262_144),
)


STEP = Workload(800, 300)


def _estimate(counts=GEMMA_LIKE, work=STEP, precision="bf16", cpu=True, **kw):
    return estimate(
        counts,
        precision=precision,
        storage_dtype="bfloat16",
        quant_bits=None,
        full_weights=False,
        optimizer="adamw",
        gradient_checkpointing=False,
        supervised_only=True,
        lora=True,
        work=work,
        runtime_bytes=kw.pop("runtime_bytes", 123.0),
        cpu=cpu,
        **kw,
    ).parts


def test_gpu_counts_cuda_context_and_allocator_slack_not_cpu_slack():
    cpu, gpu = _estimate(cpu=True), _estimate(cpu=False, runtime_bytes=0.5 * 2**30)
    assert "cpu slack" in cpu and "allocator slack" not in cpu and cpu["runtime"] == 123.0
    assert gpu["cuda context"] == 0.5 * 2**30 and "cpu slack" not in gpu
    transient = gpu["activations"] + gpu["logits"] + gpu["backward"]
    assert gpu["allocator slack"] == pytest.approx(GPU_ALLOCATOR_SLACK * transient)


def test_fused_head_prices_its_chunk_at_the_vocabulary_and_the_kept_gradient():
    rows = rows_per_chunk(262_144)
    assert rows == 64 and rows_per_chunk(49_152) == 256  # 64 MiB fp32 buffers at most
    parts = _estimate()
    assert parts["logits"] == chunk_bytes(262_144, 2, False, rows) + 300 * 640 * 2
    capped = _estimate(GEMMA_LIKE.__class__(**{**GEMMA_LIKE.__dict__, "head_softcap": True}))
    assert capped["logits"] - parts["logits"] == rows * 262_144 * 4  # the tanh buffer
    fp16 = _estimate(precision="fp16")  # fp16 keeps the gradient fp32 (loss scaling)
    assert fp16["logits"] - parts["logits"] == 300 * 640 * 2
    few = _estimate(work=Workload(800, 10))  # fewer supervised rows than a chunk
    assert few["logits"] == chunk_bytes(262_144, 2, False, 10) + 10 * 640 * 2


def test_generation_is_counted_beyond_training_transients():
    """20 prompts of 100 tokens over 262k logits: KV cache, prefill and last-position logits."""
    train = _estimate(work=Workload(800, 300))
    work = Workload(800, 300, generation_rows=20, generation_tokens=148, prompt_tokens=100)
    one_row = row_bytes(
        vocab=262_144, layers=18, kv_width=256, hidden=640, intermediate=2048,
        prompt_tokens=100, new_tokens=48, value_bytes=2,
    )  # fmt: skip
    assert generation_bytes(GEMMA_LIKE, work, 2) == 20 * one_row
    assert one_row > 262_144 * 10  # the logits alone: bf16, an fp32 copy, the pick's
    small = _estimate(work=work)
    assert small.get("generation", 0) == 0  # smaller than the step: peak unchanged
    assert small["cpu slack"] == train["cpu slack"]
    big = Workload(800, 300, generation_rows=400, generation_tokens=1100, prompt_tokens=1000)
    parts = _estimate(work=big)
    transient = train["activations"] + train["logits"] + train["backward"]
    assert parts["generation"] == pytest.approx(generation_bytes(GEMMA_LIKE, big, 2) - transient)
    assert parts["cpu slack"] > train["cpu slack"]


def test_generate_batches_shrink_to_the_budget():
    assert rows_per_generate(20, 2**20, budget=2**30) == 20
    assert rows_per_generate(20, 2**28, budget=2**30) == 4
    assert rows_per_generate(20, 2**31, budget=2**30) == 1  # always at least one row


def test_answer_evaluation_generates_in_batches_that_fit_the_budget(tiny_model, monkeypatch):
    """eval.batch_size is an upper bound: rows whose transients pass GENERATION_BUDGET wait."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.training import generated

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    items = [generated.HeldOutAnswer([5, 6, 7, 8][: 1 + i % 4], "x") for i in range(7)]
    sizes = []
    real = generated.greedy_generate
    monkeypatch.setattr(
        generated, "greedy_generate", lambda m, p, *a: sizes.append(len(p)) or real(m, p, *a)
    )
    one_row = generated.model_row_bytes(model, 4, 3)
    monkeypatch.setattr(generated, "GENERATION_BUDGET", 2 * one_row)
    with torch.no_grad():
        generated.score_answers(model, tokenizer, items, lambda a, r: {"score": 0.0}, [0], 3, 16)
    assert sizes == [2, 2, 2, 1]
    monkeypatch.setattr(generated, "GENERATION_BUDGET", 2**40)
    sizes.clear()
    generated.score_answers(model, tokenizer, items, lambda a, r: {"score": 0.0}, [0], 3, 16)
    assert sizes == [7]
