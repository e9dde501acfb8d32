"""The speed-ups change how a micro-batch is computed, never what it computes: packed rows and
padded rows, supervised-only logits and full logits, chunked and one-shot cross-entropy all give
the same loss sum and the same gradients."""

from __future__ import annotations

import itertools
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from peftkit.data.encode import IGNORE, EncodedRow
from peftkit.data.step_plan import StepPlan, TokenBudget
from peftkit.kernels import attention
from peftkit.kernels.attention import use_varlen_attention
from peftkit.kernels.chunked_ce import chunked_cross_entropy_sum
from peftkit.objectives.batches import collate, collate_packed
from peftkit.objectives.loss import causal_lm_loss_sum


def _rows(vocab: int, lengths: list[int], seed: int = 0) -> list[EncodedRow]:
    rng = np.random.default_rng(seed)
    rows = []
    for n in lengths:
        ids = rng.integers(10, vocab, size=n)
        labels = ids.copy()
        labels[: n // 2] = IGNORE  # a prompt without loss, then a supervised completion
        rows.append(EncodedRow(ids, labels, origin=f"row{n}"))
    return rows


def _lora_model(path, attn: str):
    torch.manual_seed(0)
    varlen = attn == "varlen"
    model = AutoModelForCausalLM.from_pretrained(
        str(path), attn_implementation="sdpa" if varlen else attn
    )
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(model, config)
    if varlen:
        use_varlen_attention(model)
    return model


def _loss_and_grads(model, batch, supervised_only=False):
    model.zero_grad()
    loss = causal_lm_loss_sum(model, batch, supervised_only)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def _assert_same(a, b, tol=1e-5):
    torch.testing.assert_close(a[0], b[0], rtol=tol, atol=tol)
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("attn", ["sdpa", "eager", "varlen"])
def test_packed_rows_give_padded_loss_and_gradients(tiny_model, attn):
    model = _lora_model(tiny_model, attn)
    vocab = model.config.vocab_size
    rows = _rows(vocab, [5, 17, 9, 30, 1])
    padded = collate(rows, pad_id=7)
    packed = collate_packed(rows, boundaries=attn == "varlen")
    assert packed["input_ids"].shape == (1, 5 + 17 + 9 + 30 + 1)
    assert int(padded["attention_mask"].sum()) == 62
    _assert_same(_loss_and_grads(model, padded), _loss_and_grads(model, packed))


@pytest.mark.parametrize("attn", ["sdpa", "varlen"])
def test_filler_rounding_keeps_loss_and_gradients(tiny_model, attn):
    """Under bf16 on CPU packed lengths are rounded up with a filler segment: same math."""
    model = _lora_model(tiny_model, attn)
    rows = _rows(model.config.vocab_size, [5, 17, 9])
    rounded = collate_packed(rows, boundaries=attn == "varlen", pad_to_multiple=16, pad_id=7)
    assert rounded["input_ids"].shape == (1, 32)
    if attn == "varlen":
        assert rounded["cu_seq_lens_q"].tolist() == [0, 5, 22, 31, 32]
        assert rounded["row_lengths"] == (5, 17, 9, 1) and rounded["max_length_q"] == 17
    assert (rounded["labels"][0, 31:] == IGNORE).all()
    _assert_same(_loss_and_grads(model, collate(rows, pad_id=7)), _loss_and_grads(model, rounded))


@pytest.mark.parametrize("attn", ["sdpa", "varlen"])
def test_packing_isolates_rows(tiny_model, attn):
    """A row's loss does not depend on what it is packed with (no attention across rows)."""
    model = _lora_model(tiny_model, attn)
    a, b, c = _rows(model.config.vocab_size, [12, 20, 8], seed=3)

    def loss(*rows):
        return causal_lm_loss_sum(model, collate_packed(list(rows), boundaries=attn == "varlen"))

    with torch.no_grad():
        alone, with_a, a_only, with_c, c_only = loss(b), loss(a, b), loss(a), loss(b, c), loss(c)
    torch.testing.assert_close(with_a - a_only, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(with_c - c_only, alone, rtol=1e-5, atol=1e-5)


def test_varlen_attention_reads_no_tensor_back_and_builds_no_mask(tiny_model, monkeypatch):
    """Packed rows under the varlen attention: the row lengths come from the host (collate), so
    no attention layer reads a tensor back from the device (`.tolist()` / `.item()`: a sync per
    layer on a GPU), and no (tokens x tokens) mask is built; a padded call (generation) still
    gets SDPA's own mask."""
    import transformers.masking_utils as masking

    model = _lora_model(tiny_model, "varlen")
    rows = _rows(model.config.vocab_size, [5, 17, 9])
    reads, masks = [], []
    for name in ("tolist", "item"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name):
            reads.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counting)
    sdpa_mask = masking.sdpa_mask

    def counting_mask(*args, **kwargs):
        masks.append(kwargs.get("q_length"))
        return sdpa_mask(*args, **kwargs)

    monkeypatch.setattr(masking, "sdpa_mask", counting_mask)
    attention.CALLS.clear()
    batch = collate_packed(rows, boundaries=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model(**inputs).logits.sum().backward()
    assert dict(attention.CALLS) == {"sdpa_per_row": model.config.num_hidden_layers}
    assert reads == [] and masks == []
    padded = collate(rows, pad_id=7)
    with torch.no_grad():
        model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"])
    assert masks == [padded["input_ids"].shape[1]]  # built once per forward, used by SDPA
    assert attention.CALLS["sdpa"] == model.config.num_hidden_layers


@pytest.mark.parametrize("packed", [False, True])
def test_supervised_only_logits_give_full_loss_and_gradients(tiny_model, packed):
    model = _lora_model(tiny_model, "sdpa")
    rows = _rows(model.config.vocab_size, [11, 4, 23])
    batch = collate_packed(rows) if packed else collate(rows, pad_id=7)
    _assert_same(_loss_and_grads(model, batch), _loss_and_grads(model, batch, supervised_only=True))


def test_chunked_cross_entropy_matches_one_shot():
    torch.manual_seed(0)
    logits = torch.randn(2, 13, 50, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 50, (2, 13))
    targets[0, :4] = IGNORE
    ref = F.cross_entropy(
        logits.float().reshape(-1, 50), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    (ref_grad,) = torch.autograd.grad(ref, logits)
    out = chunked_cross_entropy_sum(logits, targets, chunk_rows=5)
    (grad,) = torch.autograd.grad(out, logits)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad.float(), ref_grad.float())


def test_length_grouping_keeps_the_steps_rows():
    plan = StepPlan(n_rows=40, micro_batch_size=4, grad_accum=3, world_size=1, seed=0)
    lengths = np.random.default_rng(1).integers(5, 500, size=40)
    order = plan.epoch_order(0)
    plain = plan.micro_batches(order, 1, 0)
    grouped = plan.micro_batches(order, 1, 0, lengths)
    assert sorted(np.concatenate(plain)) == sorted(np.concatenate(grouped))
    flat = np.concatenate(grouped)
    assert list(lengths[flat]) == sorted(lengths[flat])
    waste = lambda mbs: sum(len(mb) * lengths[mb].max() - lengths[mb].sum() for mb in mbs)  # noqa: E731
    assert waste(grouped) < waste(plain)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_token_budget_keeps_the_steps_rows_within_the_budget_on_every_rank(world_size):
    """micro_batch_tokens: each rank's micro-batches hold the same rows as without a budget,
    none over the budget unless it is one longer row, as few as the budget allows, and the
    same number on every rank (sharded runs gather weights once per micro-batch)."""
    rng = np.random.default_rng(2)
    lengths = rng.integers(5, 500, size=96)
    lengths[7] = 900  # one row longer than the budget
    plan = StepPlan(n_rows=96, micro_batch_size=8, grad_accum=2, world_size=world_size, seed=0)
    budget = TokenBudget(lengths, 600)
    order = plan.epoch_order(0)
    for step in range(plan.steps_per_epoch):
        counts = set()
        for rank in range(world_size):
            plain = plan.micro_batches(order, step, rank)
            cut = plan.micro_batches(order, step, rank, budget=budget)
            assert sorted(np.concatenate(plain)) == sorted(np.concatenate(cut))
            assert all(len(mb) > 0 for mb in cut)
            for mb in cut:
                assert lengths[mb].sum() <= 600 or len(mb) == 1, lengths[mb]
            again = plan.micro_batches(order, step, rank, budget=budget)  # deterministic
            assert [list(mb) for mb in cut] == [list(mb) for mb in again]
            counts.add(len(cut))
            if world_size == 1:  # few passes: long rows alone, the rest within one bin of ideal
                step_lengths = lengths[np.concatenate(cut)]
                short = step_lengths[step_lengths <= 600]
                ideal = len(step_lengths) - len(short) + -(-int(short.sum()) // 600)
                assert len(cut) <= ideal + 1, (len(cut), ideal)
        assert len(counts) == 1
    # a budget larger than the step packs the whole step into one forward pass
    assert len(plan.micro_batches(order, 0, 0, budget=TokenBudget(lengths, 10**6))) == 1


def _per_row_reference(
    q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False
):
    """flash-attn's `flash_attn_varlen_func` contract in plain torch: (tokens, heads, dim)
    inputs, k/v with fewer heads (GQA), causal attention within each [cu[i], cu[i+1])."""
    assert causal and dropout_p == 0.0 and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
    assert max_q == max_k == int(cu_q.diff().max())
    rep = q.shape[1] // k.shape[1]
    bounds = cu_q.tolist()
    outs = []
    for a, b in itertools.pairwise(bounds):
        qi, ki, vi = (t[a:b].transpose(0, 1) for t in (q, k, v))  # (heads, len, dim)
        ki, vi = ki.repeat_interleave(rep, 0), vi.repeat_interleave(rep, 0)
        out = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=softmax_scale)
        outs.append(out.transpose(0, 1))
    return torch.cat(outs)


def test_flash_varlen_call_follows_flash_attns_layout(tiny_model, monkeypatch):
    """The flash-attn branch hands the packed micro-batch to `flash_attn_varlen_func` in its
    layout: (tokens, heads, head_dim), int32 boundaries, the layer's scaling. Checked on CPU
    against that function's contract written in torch (flash-attn itself needs a GPU; the
    `gpu` test below runs the real kernel): the same output as per-row SDPA."""
    model = _lora_model(tiny_model, "varlen")
    rows = _rows(model.config.vocab_size, [5, 17, 9])
    batch = collate_packed(rows, boundaries=True)
    layer = model.base_model.model.model.layers[0].self_attn
    torch.manual_seed(0)
    heads, kv_heads, dim, tokens = 4, 2, 16, 31
    q = torch.randn(1, heads, tokens, dim)
    k, v = torch.randn(2, 1, kv_heads, tokens, dim)
    per_row, _ = attention.varlen_sdpa_forward(
        layer, q, k, v, None, row_lengths=batch["row_lengths"], scaling=dim**-0.5
    )
    fake = type(sys)("flash_attn")
    fake.flash_attn_varlen_func = _per_row_reference
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    out = attention._flash_varlen(
        layer, q, k, v, batch["cu_seq_lens_q"], batch["max_length_q"], {"scaling": dim**-0.5}
    )
    assert out.shape == per_row.shape == (1, tokens, heads, dim)
    torch.testing.assert_close(out, per_row, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_flash_varlen_on_gpu_gives_the_padded_rows_logits(tiny_model):
    """The real flash-attn varlen kernel on packed rows: each row's logits are its padded logits
    (bf16: a few roundings)."""
    if not torch.cuda.is_available() or not attention.flash_varlen_available():
        pytest.skip("needs a CUDA device and flash-attn")
    model = _lora_model(tiny_model, "varlen").cuda().to(torch.bfloat16)
    rows = _rows(model.config.vocab_size, [5, 17, 9, 30])
    batch = {
        k: v.cuda() if isinstance(v, torch.Tensor) else v
        for k, v in collate_packed(rows, True).items()
    }
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    attention.CALLS.clear()
    with torch.no_grad():
        flash = model(**inputs).logits.float()
    assert attention.CALLS["flash_varlen"] == model.config.num_hidden_layers
    padded = collate(rows, pad_id=7)
    with torch.no_grad():
        ref = model(
            input_ids=padded["input_ids"].cuda(), attention_mask=padded["attention_mask"].cuda()
        ).logits.float()
    start = 0
    for i, n in enumerate(batch["row_lengths"]):
        torch.testing.assert_close(flash[0, start : start + n], ref[i, :n], rtol=3e-2, atol=3e-2)
        start += n
