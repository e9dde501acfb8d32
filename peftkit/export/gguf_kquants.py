"""llama.cpp's k-quants (Q6_K, Q5_K, Q4_K, Q3_K, Q2_K), quantized in numpy, byte for byte as
llama.cpp's reference quantizers (`quantize_row_q*_K_ref` in ggml-quants.c, what `llama-quantize`
runs when it is given no importance matrix) write them.

A k-quant packs 256 values (a super-block) into sub-blocks of 16 or 32, each with its own small
integer scale (and, for Q2_K/Q4_K/Q5_K, a min); the sub-block scales are themselves quantized
against one f16 scale per super-block:

    Q6_K: x ~ d * s_j * q,           q in [-32, 31], s_j int8          (6.5625 bits / weight)
    Q5_K: x ~ d * s_j * q - m * m_j, q in [0, 31],   s_j, m_j 6-bit    (5.5 bits / weight)
    Q4_K: x ~ d * s_j * q - m * m_j, q in [0, 15],   s_j, m_j 6-bit    (4.5 bits / weight)
    Q3_K: x ~ d * s_j * q,           q in [-4, 3],   s_j 6-bit signed  (3.4375 bits / weight)
    Q2_K: x ~ d * s_j * q - m * m_j, q in [0, 3],    s_j, m_j 4-bit    (2.625 bits / weight)

Each sub-block's scale (and min) is searched, not just taken from the range: Q6_K and Q3_K try
scales around `nmax / max|x|` and keep the one with the least weighted squared error, Q4_K/Q5_K/
Q2_K fit scale and min by weighted least squares over a sweep of candidate scales
(`make_qkx2_quants`). Those searches run here over every sub-block of a tensor at once; the
sums are accumulated element by element in float32, in llama.cpp's order, so that every rounding
decision, hence every byte, is the same as the C code's compiled with IEEE float semantics (no
fused multiply-add; a `-march=native` build of llama.cpp contracts `a * b + c` into FMAs and so
differs from its own portable build in a few blocks per thousand).

Rows must be a whole number of super-blocks (QK_K = 256 values); `gguf_mix` decides what a tensor
whose rows are not gets instead.
"""

from __future__ import annotations

from collections.abc import Callable

import gguf
import numpy as np

QK_K = 256
_CHUNK = 4096  # super-blocks per pass: ~1M values, keeps the temporaries small
_F32 = np.float32
_T = gguf.GGMLQuantizationType


def _seqsum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0, one element after another in float32 (the C loop's order and rounding;
    numpy's own `sum` is pairwise and may round differently)."""
    total = a[0].copy()
    for row in a[1:]:
        total += row
    return total


def _round(v: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """llama.cpp's `MAX(lo, MIN(hi, nearest_int(v)))`: round half to even, then clamp."""
    return np.clip(np.rint(v), lo, hi)


def _f16(v: np.ndarray) -> np.ndarray:
    """The scale as stored (f16, round to nearest even) and as read back (f32)."""
    half = v.astype(np.float16)
    return half, half.astype(_F32)


def _make_qkx2(x, w, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool = False):
    """Scale, min and levels of each column of `x` (n values, weights `w`) for
    x ~ scale * L - min, L in [0, nmax] (`make_qkx2_quants`): start from the range, then sweep
    nstep + 1 candidate scales, fitting scale and min by weighted least squares for each and
    keeping the one with the least weighted squared (or absolute, `use_mad`) error."""

    def error(diff):
        return _seqsum(w * (np.abs(diff) if use_mad else diff * diff))

    mn = np.minimum(x.min(axis=0), 0)
    mx = x.max(axis=0)
    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)
    flat = mx == mn
    iscale = _F32(nmax) / np.where(flat, _F32(1), mx - mn)
    scale = _F32(1) / iscale
    levels = _round(iscale * (x - mn), 0, nmax)
    best = error(scale * levels + mn - x)
    for step in range(nstep + 1):
        # the span is measured from the best min so far, as in the C loop
        span = np.where(flat, _F32(1), mx - mn)
        iscale = (_F32(rmin) + _F32(rdelta) * _F32(step) + _F32(nmax)) / span
        trial = _round(iscale * (x - mn), 0, nmax)
        wl = w * trial
        sum_l, sum_l2, sum_xl = _seqsum(wl), _seqsum(wl * trial), _seqsum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_min = np.where(positive, _F32(0), this_min)
        this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
        this_error = error(this_scale * trial + this_min - x)
        better = (det > 0) & (this_error < best)
        levels = np.where(better, trial, levels)
        best = np.where(better, this_error, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    return np.where(flat, _F32(0), scale), -mn, np.where(flat, _F32(0), levels)


def _make_qx(x, nmax: int):
    """Scale and levels (offset by nmax) of each column of `x` for x ~ scale * (L - nmax),
    weighted by x^2 (`make_qx_quants` with rmse_type 1 and no importance weights)."""
    cols = np.arange(x.shape[1])
    amax_at = np.abs(x).argmax(axis=0)  # the first largest, as the C loop's strict `>`
    mx = x[amax_at, cols]
    zero = np.abs(mx) < _F32(1e-15)
    mx = np.where(zero, _F32(1), mx)
    w = x * x
    wx = w * x

    def fit(iscale):
        q = _round(iscale * x, -nmax, nmax - 1)
        wq = w * q
        return q, _seqsum(wx * q), _seqsum(wq * q)

    q, sumlx, suml2 = fit(_F32(-nmax) / mx)
    levels = q + nmax
    scale = np.where(suml2 != 0, sumlx / suml2, _F32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        q, sumlx, suml2 = fit(-(_F32(nmax) + _F32(0.1) * _F32(step)) / mx)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        levels = np.where(better, q + nmax, levels)
        scale = np.where(better, sumlx / suml2, scale)
        best = np.where(better, scale * sumlx, best)
    return np.where(zero, _F32(0), scale), np.where(zero, _F32(0), levels)


def _make_q3(x, nmax: int):
    """Scale and levels (offset by nmax) of each column of `x` for x ~ scale * (L - nmax):
    `make_q3_quants` with rmse, coordinate descent on one level at a time (weights x^2)."""
    cols = np.arange(x.shape[1])
    mx = x[np.abs(x).argmax(axis=0), cols]
    zero = np.abs(mx) < _F32(1e-15)
    mx = np.where(zero, _F32(1), mx)
    q = _round((_F32(-nmax) / mx) * x, -nmax, nmax - 1)
    w = x * x
    sumlx = _seqsum(w * x * q)
    suml2 = _seqsum(w * q * q)
    active = np.ones(x.shape[1], dtype=bool)
    for _ in range(5):
        changed = np.zeros_like(active)
        for i in range(x.shape[0]):
            wi, xi, qi = w[i], x[i], q[i]
            slx = sumlx - wi * xi * qi
            sl2 = suml2 - wi * qi * qi
            new = _round(xi * sl2 / slx, -nmax, nmax - 1)
            new_slx = slx + wi * xi * new
            new_sl2 = sl2 + wi * new * new
            take = active & (slx > 0) & (new != qi) & (new_sl2 > 0)
            take &= new_slx * new_slx * suml2 > sumlx * sumlx * new_sl2
            q[i] = np.where(take, new, qi)
            sumlx = np.where(take, new_slx, sumlx)
            suml2 = np.where(take, new_sl2, suml2)
            changed |= take
        active &= changed
        if not active.any():
            break
    scale = np.where(suml2 > 0, sumlx / suml2, _F32(0))
    return np.where(zero, _F32(0), scale), np.where(zero, _F32(0), q + nmax)


def _subblocks(x: np.ndarray, size: int) -> np.ndarray:
    """(blocks, 256) -> (size, blocks * 256 / size): one column per sub-block, contiguous rows."""
    return np.ascontiguousarray(x.reshape(-1, size).T)


def _scale_bytes(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes holding 8 six-bit scales and 8 six-bit mins (`get_scale_min_k4`)."""
    lo, hi = ls[:, :4], ls[:, 4:]
    mlo, mhi = lm[:, :4], lm[:, 4:]
    return np.concatenate(
        [lo | ((hi >> 4) << 6), mlo | ((mhi >> 4) << 6), (hi & 0xF) | ((mhi & 0xF) << 4)], axis=1
    )


def _superblock_scales(scales: np.ndarray, mins: np.ndarray, top: int, clamp: bool):
    """Sub-block scales and mins (blocks, sub-blocks) as integers against the super-block's
    largest: `(uint8_t)nearest_int(top / max * s)` (then `MIN(top, .)` with `clamp`), and the
    f16 `d = max / top` and `dmin` they multiply (stored, read back)."""
    max_scale = np.maximum(scales.max(axis=1), 0)
    max_min = np.maximum(mins.max(axis=1), 0)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, _F32(top) / max_scale, _F32(0))
        inv_min = np.where(max_min > 0, _F32(top) / max_min, _F32(0))
    ls, lm = (
        np.rint(inv[:, None] * v).astype(np.int64) & 0xFF
        for inv, v in ((inv_scale, scales), (inv_min, mins))
    )
    if clamp:
        ls, lm = np.minimum(ls, top), np.minimum(lm, top)
    return (
        ls.astype(np.uint8),
        lm.astype(np.uint8),
        _f16(max_scale / _F32(top)),
        _f16(max_min / _F32(top)),
    )


def _requantize(x, sub_d, sub_m, nmax: int, levels) -> np.ndarray:
    """Levels again against the stored scales, x ~ sub_d * L - sub_m (sub-blocks whose scale is
    0 keep the search's levels, as the C code's `if (!d) continue`)."""
    safe_d = np.where(sub_d == 0, _F32(1), sub_d)[..., None]
    requant = _round((x.reshape(levels.shape) + sub_m[..., None]) / safe_d, 0, nmax)
    return np.where((sub_d != 0)[..., None], requant, levels).astype(np.uint8)


def _qkx_superblocks(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Q4_K/Q5_K's shared part: 8 sub-blocks of 32 with scale and min, both quantized to 6 bits
    against the super-block's f16 `d` and `dmin`; returns (the d and dmin bytes, the 12 scale
    bytes, the levels)."""
    n = len(x)
    xs = _subblocks(x, 32)  # (32, n * 8)
    av_x = np.sqrt(_seqsum(xs * xs) / _F32(32))
    scales, mins, levels = _make_qkx2(xs, av_x + np.abs(xs), nmax, rmin, rdelta, nstep)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    levels = levels.T.reshape(n, 8, 32)
    ls, lm, (d16, d), (m16, dmin) = _superblock_scales(scales, mins, 63, clamp=True)
    levels = _requantize(x, d[:, None] * ls, dmin[:, None] * lm, nmax, levels).reshape(n, 256)
    head = np.concatenate([d16.view(np.uint8).reshape(n, 2), m16.view(np.uint8).reshape(n, 2)], 1)
    return head, _scale_bytes(ls, lm), levels


def _q4_k(x: np.ndarray) -> np.ndarray:
    head, scales, levels = _qkx_superblocks(x, 15, -1.0, 0.1, 20)
    q = levels.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([head, scales, qs], axis=1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    head, scales, levels = _qkx_superblocks(x, 31, -0.5, 0.1, 15)
    q = levels.reshape(-1, 4, 2, 32)
    qs = ((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    bits = (q >> 4).astype(np.uint8)  # (n, 4, 2, 32): the fifth bit
    shifts = np.arange(8, dtype=np.uint8).reshape(1, 4, 2, 1)
    qh = np.bitwise_or.reduce((bits << shifts).reshape(-1, 8, 32), axis=1)
    return np.concatenate([head, scales, qh, qs], axis=1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    n = len(x)
    scales, levels = _make_qx(_subblocks(x, 16), 32)
    scales = scales.reshape(n, 16)
    levels = levels.T.reshape(n, 16, 16)
    at = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(n), at]
    zero = np.abs(max_scale) < _F32(1e-15)
    iscale = _F32(-128) / np.where(zero, _F32(1), max_scale)
    d16, d = _f16(_F32(1) / iscale)
    sc = np.minimum(127, np.rint(iscale[:, None] * scales)).astype(np.int8)
    sub_d = d[:, None] * sc
    safe_d = np.where(sub_d == 0, _F32(1), sub_d)[..., None]
    requant = _round(x.reshape(n, 16, 16) / safe_d, -32, 31) + 32
    levels = np.where((sub_d != 0)[..., None], requant, levels).astype(np.uint8)
    q = levels.reshape(n, 2, 4, 32)
    ql = np.concatenate(
        [
            (q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4),
            (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4),
        ],
        axis=2,
    ).reshape(n, 128)
    qh = (
        (q[:, :, 0] >> 4)
        | ((q[:, :, 1] >> 4) << 2)
        | ((q[:, :, 2] >> 4) << 4)
        | ((q[:, :, 3] >> 4) << 6)
    )
    out = np.concatenate(
        [ql, qh.reshape(n, 64), sc.view(np.uint8), d16.view(np.uint8).reshape(n, 2)], axis=1
    )
    out[zero] = 0  # an all-zero super-block is written as zeros, d included
    return out


def _q3_k(x: np.ndarray) -> np.ndarray:
    n = len(x)
    scales, levels = _make_q3(_subblocks(x, 16), 4)
    scales = scales.reshape(n, 16)
    levels = levels.T.reshape(n, 16, 16)
    at = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(n), at]
    has = max_scale != 0
    iscale = _F32(-32) / np.where(has, max_scale, _F32(1))
    ls = np.where(has[:, None], _round(iscale[:, None] * scales, -32, 31) + 32, 0).astype(np.uint8)
    d16, d = _f16(np.where(has, _F32(1) / iscale, _F32(0)))
    sub_d = d[:, None] * (ls.astype(_F32) - 32)
    safe_d = np.where(sub_d == 0, _F32(1), sub_d)[..., None]
    requant = _round(x.reshape(n, 16, 16) / safe_d, -4, 3) + 4
    levels = np.where((sub_d != 0)[..., None], requant, levels).astype(np.uint8).reshape(n, 256)
    high = (levels > 3).astype(np.uint8).reshape(n, 8, 32)  # bit m of hmask[j]: value 32 m + j
    hmask = np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8).reshape(1, 8, 1), axis=1)
    q = np.where(levels > 3, levels - 4, levels).reshape(n, 2, 4, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(n, 64)
    lo, hi = ls[:, :8] & 0xF, ls[:, 8:] & 0xF
    top = (ls >> 4).reshape(n, 4, 4)  # scale j's top 2 bits go to byte 8 + j % 4, at 2 * (j // 4)
    packed_top = top[:, 0] | (top[:, 1] << 2) | (top[:, 2] << 4) | (top[:, 3] << 6)
    scale_bytes = np.concatenate([lo | (hi << 4), packed_top], axis=1)
    return np.concatenate([hmask, qs, scale_bytes, d16.view(np.uint8).reshape(n, 2)], axis=1)


def _q2_k(x: np.ndarray) -> np.ndarray:
    n = len(x)
    xs = _subblocks(x, 16)
    scales, mins, levels = _make_qkx2(xs, np.abs(xs), 3, -0.5, 0.1, 15, use_mad=True)
    scales, mins = scales.reshape(n, 16), mins.reshape(n, 16)
    levels = levels.T.reshape(n, 16, 16)
    ls, lm, (d16, d), (m16, dmin) = _superblock_scales(scales, mins, 15, clamp=False)
    packed = ls | (lm << 4)
    levels = _requantize(x, d[:, None] * (packed & 0xF), dmin[:, None] * (packed >> 4), 3, levels)
    q = levels.reshape(n, 2, 4, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate(
        [packed, qs, d16.view(np.uint8).reshape(n, 2), m16.view(np.uint8).reshape(n, 2)], axis=1
    )


_QUANTIZERS: dict[gguf.GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    _T.Q6_K: _q6_k,
    _T.Q5_K: _q5_k,
    _T.Q4_K: _q4_k,
    _T.Q3_K: _q3_k,
    _T.Q2_K: _q2_k,
}
K_TYPES = tuple(_QUANTIZERS)


def quantize_k(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """Quantize `data` (..., n) with n a multiple of 256 to the k-quant `qtype`.

    Returns:
        uint8 blocks shaped (..., n // 256 * block bytes), the layout `gguf.GGUFWriter.add_tensor`
        takes with `raw_dtype=qtype` and `gguf.quants.dequantize` reads back.

    Raises:
        ValueError: rows that are not whole super-blocks, or a type that is not a k-quant.
    """
    if qtype not in _QUANTIZERS:
        raise ValueError(
            f"{qtype.name} is not a k-quant; choose one of {[t.name for t in K_TYPES]}"
        )
    if data.shape[-1] % QK_K:
        raise ValueError(f"rows of {data.shape[-1]} values do not split into blocks of {QK_K}")
    blocks = np.ascontiguousarray(data, dtype=_F32).reshape(-1, QK_K)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        out = [_QUANTIZERS[qtype](blocks[i : i + _CHUNK]) for i in range(0, len(blocks), _CHUNK)]
    packed = (
        np.concatenate(out) if out else np.zeros((0, gguf.GGML_QUANT_SIZES[qtype][1]), np.uint8)
    )
    return packed.reshape(*data.shape[:-1], -1)
