"""Ragged paged attention as Pallas kernels (Triton lowering on GPU, `interpret=True` on CPU).

Two launches share one set of semantics (`ragged_paged_attention.py`):

- Decode path (`block_q == 1`, what `choose_config` picks for decode-shaped batches, T <= S): one
  program per (token, kv head, kv split). It finds its token's sequence itself (one compare of t against
  `cu_q_lens`, so any q_len mix is exact), reads q straight from `[T, Hq, D]`, the page table with a
  masked load and K/V rows with masked loads (stale slots and pages outside the range are never
  fetched), and stores its `group` rows of the output directly. No work list, no padding copies, no
  zeroed output, no scatter: one launch, and with `num_kv_splits > 1` (flash-decoding) a second tiny
  Pallas kernel merges the splits' partial outputs by log-sum-exp and writes `[T, Hq, D]`.
- Work-list path (`block_q > 1`, prefill-shaped batches): one program per work item (`block_q` new
  tokens of one sequence) x kv head. Rows are packed tokens x q-heads-per-kv-head (GQA). The kv loop walks
  `pages_per_block` pages at a time through the page table; blocks wholly below the causal diagonal take
  an unmasked body.

Both start the kv loop at the first page the window reaches, so pages wholly outside a sliding window
are never read.

8-bit pages (`kv_quant`, with `k_scale`/`v_scale` per token and kv head) are loaded as 8 bits and
converted to q's dtype in registers; the K scales multiply the score columns after the QK^T dot and
the V scales the probabilities before the PV dot, so no dequantized copy of a page exists anywhere.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.ragged_paged_attention import (DEFAULT_MASK_VALUE, options_reason, static_validate_inputs,
                                                   validate_scales)

NUM_SMS = 132                 # SMs of an sm_90 SXM part; the split heuristic aims for a few waves over them
MIN_DOT_ROWS = 16             # Triton's smallest matmul M
DECODE_TARGET_PROGRAMS = 2 * NUM_SMS   # decode splits kv until (tokens x kv heads x splits) reaches this
MIN_BLOCKS_PER_SPLIT = 4               # ... but beyond one program per SM, not into shorter splits
MERGE_NUM_WARPS = 4           # the split-merge kernel (one token x one kv head per program)
_LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """Static launch shape. `block_q` tokens x padded group rows per program; `pages_per_block` pages per kv step."""

    block_q: int
    pages_per_block: int
    num_kv_splits: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_q", "pages_per_block", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two, got {value}")
        if self.num_kv_splits < 1:
            raise ValueError(f"num_kv_splits must be >= 1, got {self.num_kv_splits}")
        if self.num_kv_splits > 1 and self.block_q != 1:
            raise ValueError(f"num_kv_splits > 1 needs block_q == 1 (decode), got block_q={self.block_q}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _prev_pow2(x: int) -> int:
    return 1 << max(0, x.bit_length() - 1)


def padded_group(num_q_heads: int, num_kv_heads: int, block_q: int) -> int:
    """q heads per kv head, padded to a power of two so that block_q x group >= MIN_DOT_ROWS."""
    group = _next_pow2(num_q_heads // num_kv_heads)
    return max(group, MIN_DOT_ROWS // block_q)


def choose_config(num_tokens: int, num_seqs: int, pages_per_seq: int, num_q_heads: int,
                  num_kv_heads: int, page_size: int) -> TuningConfig:
    """Pick the launch from the static shapes (the sweep behind it: pallas_kernels/README.md, v4).

    Decode-shaped batches (T <= S): 64-token kv blocks, 4 warps, 2 stages, and kv split over programs
    (a power of two) until tokens x kv heads x splits reaches 2 per SM, but past one per SM only while
    every split keeps >= MIN_BLOCKS_PER_SPLIT blocks (16 x 512: 2 splits, not 4; 16 x 8k: 4)."""
    if num_tokens <= num_seqs:
        pages_per_block = min(max(1, 64 // page_size), _next_pow2(pages_per_seq))
        programs = num_tokens * num_kv_heads
        blocks = pl.cdiv(pages_per_seq, pages_per_block)
        target = _next_pow2(pl.cdiv(DECODE_TARGET_PROGRAMS, programs))
        fill = _next_pow2(pl.cdiv(NUM_SMS, programs))      # every SM busy once, however short the splits
        splits = min(_prev_pow2(blocks), target,
                     max(fill, _prev_pow2(max(1, blocks // MIN_BLOCKS_PER_SPLIT))))
        return TuningConfig(block_q=1, pages_per_block=pages_per_block, num_kv_splits=splits,
                            num_warps=4, num_stages=2)
    # Prefill: 128 rows x 128 kv tokens, 8 warps, 3 stages (best of the variants in bench/kernels.py).
    group = _next_pow2(num_q_heads // num_kv_heads)
    return TuningConfig(block_q=max(1, 128 // group), pages_per_block=max(1, 128 // page_size),
                        num_warps=8, num_stages=3)


def _dot(a, b, contracting, exact: bool):
    """f32-accumulating matmul (`pl.dot` is gone in jax 0.11); fp32 operands stay fp32, not tf32."""
    precision = lax.Precision.HIGHEST if exact else None
    return lax.dot_general(a, b, (contracting, ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def _kernel(
    # inputs
    work_seq_ref,    # [W] int32, sequence of each work item; -1 = no work
    work_start_ref,  # [W] int32, first token (row of q) of each work item
    kv_lens_ref,     # [S] int32
    cu_q_lens_ref,   # [S + 1] int32
    page_table_ref,  # [S, P + pages_per_block] int32 (padded so a block never reads past the row)
    q_ref,           # [T + block_q, Hkv, Gp, D]
    k_pages_ref,     # [N, page_size, Hkv, D]
    v_pages_ref,     # [N, page_size, Hkv, D]
    *refs,           # quantized: k_scale_ref, v_scale_ref [N, page_size, Hkv] f32; then _o_init_ref
                     # (aliased with o_ref) and the output o_ref [T + block_q, Hkv, Gp, D]
    sm_scale: float, sliding_window: int | None, soft_cap: float | None, block_q: int,
    pages_per_block: int, num_q_heads_per_kv: int, exact: bool, quantized: bool,
):
    if quantized:
        k_scale_ref, v_scale_ref, _, o_ref = refs
    else:
        _, o_ref = refs
    w, h = pl.program_id(0), pl.program_id(1)
    _, page_size, _, head_dim = k_pages_ref.shape
    group_p = q_ref.shape[2]
    rows = block_q * group_p
    block_kv = pages_per_block * page_size

    seq = work_seq_ref[w]
    has_work = seq >= 0
    s = jnp.maximum(seq, 0)
    t0 = work_start_ref[w]
    q_start, q_end = cu_q_lens_ref[s], cu_q_lens_ref[s + 1]
    q_len, kv_len = q_end - q_start, kv_lens_ref[s]
    first_pos = kv_len - q_len + (t0 - q_start)               # position of this item's first token
    last_pos = kv_len - q_len + jnp.minimum(t0 + block_q, q_end) - 1 - q_start
    hi_tok = jnp.where(has_work, last_pos + 1, 0)
    lo_tok = 0 if sliding_window is None else jnp.maximum(first_pos - sliding_window + 1, 0)
    split_lo, split_hi = lo_tok // page_size, pl.cdiv(hi_tok, page_size)

    row = lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
    row_tok = row // group_p
    row_pos = first_pos + row_tok                                          # [M, 1]
    row_valid = has_work & (t0 + row_tok < q_end) & (row % group_p < num_q_heads_per_kv)

    q = q_ref[pl.ds(t0, block_q), h, :, :].reshape(rows, head_dim)       # [M, D]

    def body(j, carry, masked: bool):
        acc, m_prev, l_prev = carry                                        # [M, D], [M, 1], [M, 1]
        page0 = split_lo + j * pages_per_block
        pages = page_table_ref[s, pl.ds(page0, pages_per_block)]          # [npg]
        if masked:
            pages = jnp.where(page0 + lax.iota(jnp.int32, pages_per_block) < split_hi, pages, 0)
        k = k_pages_ref[pages, :, h, :].reshape(block_kv, head_dim)        # [BK, D]
        v = v_pages_ref[pages, :, h, :].reshape(block_kv, head_dim)        # [BK, D]
        if quantized:   # 8 bits -> q's dtype in registers; scales applied to scores and probabilities
            k, v = k.astype(q.dtype), v.astype(q.dtype)
            k_scale = k_scale_ref[pages, :, h].reshape(1, block_kv)
            v_scale = v_scale_ref[pages, :, h].reshape(1, block_kv)

        scores = _dot(q, k, ((1,), (1,)), exact) * sm_scale                # [M, BK]
        if quantized:
            scores = scores * k_scale
        if soft_cap is not None:
            scores = soft_cap * jnp.tanh(scores / soft_cap)
        if masked:
            kv_pos = page0 * page_size + lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)  # [1, BK]
            kv_valid = (kv_pos >= lo_tok) & (kv_pos < jnp.minimum(hi_tok, split_hi * page_size))
            mask = kv_valid & (kv_pos <= row_pos) & row_valid
            if sliding_window is not None:
                mask &= row_pos - kv_pos < sliding_window
            scores = jnp.where(mask, scores, DEFAULT_MASK_VALUE)
        m_next = jnp.maximum(m_prev, scores.max(axis=1, keepdims=True))
        correction = jnp.exp2((m_prev - m_next) * _LOG2E)
        p = jnp.exp2((scores - m_next) * _LOG2E)
        if masked:
            p = jnp.where(mask, p, 0.0)
            # Stale slots may hold NaN and 0 * NaN = NaN: select the V rows, never multiply them away.
            v = jnp.where(kv_valid.reshape(block_kv, 1), v, jnp.zeros_like(v))
            if quantized:
                v_scale = jnp.where(kv_valid, v_scale, 0.0)
        l_next = correction * l_prev + p.sum(axis=1, keepdims=True)
        pv = _dot((p * v_scale if quantized else p).astype(v.dtype), v, ((1,), (0,)), exact)  # [M, D]
        return acc * correction + pv, m_next, l_next

    init = (jnp.zeros((rows, head_dim), jnp.float32),
            jnp.full((rows, 1), DEFAULT_MASK_VALUE, jnp.float32),
            jnp.zeros((rows, 1), jnp.float32))
    num_blocks = pl.cdiv(jnp.maximum(split_hi - split_lo, 0), pages_per_block)
    # Blocks wholly at or before every row's position (and inside the kv range) need no mask; the
    # rest (the causal diagonal, the last partial page, a window's edges) take the masked body.
    if sliding_window is None and block_q > 1:
        full_end = jnp.minimum(jnp.minimum(first_pos + 1, hi_tok), split_hi * page_size)
        full_end = jnp.where(has_work & (t0 < q_end), full_end, 0)  # row 0 is real
        num_full = jnp.clip((full_end - split_lo * page_size) // block_kv, 0, num_blocks)
    else:
        num_full = 0
    carry = lax.fori_loop(0, num_full, functools.partial(body, masked=False), init)
    acc, _, l = lax.fori_loop(num_full, num_blocks, functools.partial(body, masked=True), carry)
    out = acc / jnp.maximum(l, 1e-30)
    mask = jnp.broadcast_to(row_valid, (rows, head_dim)).reshape(block_q, group_p, head_dim)
    pltriton.store(o_ref.at[pl.ds(t0, block_q), h, :, :],
                   out.reshape(block_q, group_p, head_dim).astype(o_ref.dtype), mask=mask)


def work_items(cu_q_lens: jax.Array, num_seqs: jax.Array, num_tokens: int, block_q: int
               ) -> tuple[jax.Array, jax.Array]:
    """(work_seq[W], work_start[W]): one item per block_q new tokens of each real sequence; -1 pads."""
    num_slots = cu_q_lens.shape[0] - 1
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    q_lens = jnp.where(jnp.arange(num_slots) < num_seqs, q_lens, 0)
    blocks = (q_lens + block_q - 1) // block_q                             # [S]
    ends = jnp.cumsum(blocks)
    # Each sequence adds at most one partial block, and there are never more items than tokens.
    num_items = min(num_tokens, pl.cdiv(num_tokens, block_q) + min(num_slots, num_tokens))
    item = jnp.arange(num_items, dtype=jnp.int32)
    # compare_all: one fused op; the default binary search is a device loop with a host round trip each step.
    seq = jnp.searchsorted(ends, item, side="right", method="compare_all").astype(jnp.int32)
    valid = item < ends[-1]
    seq_c = jnp.minimum(seq, num_slots - 1)
    start = cu_q_lens[seq_c] + (item - (ends[seq_c] - blocks[seq_c])) * block_q
    return jnp.where(valid, seq_c, -1), jnp.where(valid, start, 0).astype(jnp.int32)


_SEQ_CHUNK = 256   # cu_q_lens entries compared per vector in the decode kernel's sequence lookup


def _decode_kernel(
    # inputs
    cu_q_lens_ref,   # [S + 1] int32
    kv_lens_ref,     # [S] int32
    num_seqs_ref,    # [1] int32
    page_table_ref,  # [S, P] int32, read with masked loads (entries past a range are never used)
    q_ref,           # [T, Hq, D]
    k_ref,           # [N * page_size, Hkv, D] (the pool, flattened)
    v_ref,           # same as k_ref
    *refs,           # quantized: k_scale_ref, v_scale_ref [N * page_size, Hkv] f32; then the outputs:
                     # one split: o [T, Hq, D]; else o_part [T * Hkv * Kp * Gq, D] f32, lse [T * Hkv * Kp * Gq]
    sm_scale: float, sliding_window: int | None, soft_cap: float | None, page_size: int,
    pages_per_block: int, num_kv_splits: int, splits_p: int, group: int, group_p: int, group_q: int,
    exact: bool, quantized: bool,
):
    """One token x one kv head x one kv split; rows = the kv head's q heads, padded to `group_p`."""
    if quantized:
        k_scale_ref, v_scale_ref, *out_refs = refs
    else:
        out_refs = refs
    t, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    num_slots = kv_lens_ref.shape[0]
    head_dim = q_ref.shape[2]
    num_kv_heads = k_ref.shape[1]
    block_kv = pages_per_block * page_size

    # Token t belongs to sequence #{s' in 1..num_seqs : cu_q_lens[s'] <= t} (cu_q_lens is nondecreasing);
    # that count reaches num_seqs exactly for padding tokens. Any q_len (0, 1 or more) is handled.
    num_seqs = jnp.minimum(num_seqs_ref[0], num_slots)
    chunk = min(_next_pow2(num_slots), _SEQ_CHUNK)
    seq = jnp.int32(0)
    for c in range(0, num_slots, chunk):
        j = c + 1 + lax.iota(jnp.int32, chunk)
        ends = cu_q_lens_ref[jnp.minimum(j, num_slots)]
        seq += jnp.sum(((j <= num_seqs) & (ends <= t)).astype(jnp.int32))
    real = seq < num_seqs
    s = jnp.minimum(seq, num_slots - 1)
    q_start, q_end = cu_q_lens_ref[s], cu_q_lens_ref[s + 1]
    pos = kv_lens_ref[s] - (q_end - q_start) + (t - q_start)              # this token's position
    hi_tok = jnp.where(real, pos + 1, 0)                                   # padding: empty kv range
    lo_tok = 0 if sliding_window is None else jnp.maximum(pos - sliding_window + 1, 0)
    lo_page, hi_page = lo_tok // page_size, pl.cdiv(hi_tok, page_size)
    per_split = pl.cdiv(jnp.maximum(hi_page - lo_page, 0), num_kv_splits)
    split_lo = lo_page + split * per_split                                 # splits >= K get nothing
    split_hi = jnp.minimum(hi_page, split_lo + per_split)
    split_hi_tok = jnp.minimum(hi_tok, split_hi * page_size)

    # q rows h*group .. h*group + group - 1 of token t; the padding rows load zeros and are never stored.
    row = lax.broadcasted_iota(jnp.int32, (group_p, head_dim), 0)
    q = pltriton.load(q_ref.at[t, pl.ds(h * group, group_p), :], mask=row < group, other=0)

    kv_iota = lax.iota(jnp.int32, block_kv)
    d_iota = lax.iota(jnp.int32, head_dim)[None, :]
    in_page = lax.broadcasted_iota(jnp.int32, (pages_per_block, page_size), 1)

    def body(j, carry):
        acc, m_prev, l_prev = carry                                        # [M, D], [M, 1], [M, 1]
        page0 = split_lo + j * pages_per_block
        pages = pltriton.load(page_table_ref.at[s, pl.ds(page0, pages_per_block)],
                              mask=page0 + lax.iota(jnp.int32, pages_per_block) < split_hi, other=0)
        slot = (pages[:, None] * page_size + in_page).reshape(block_kv, 1)  # pool row of each kv token
        kv_pos = page0 * page_size + kv_iota
        kv_valid = (kv_pos >= lo_tok) & (kv_pos < split_hi_tok)            # [BK]
        # Masked loads: rows outside the range (stale slots may hold NaN) are never fetched, they read 0.
        index = (slot, h, d_iota)
        k = pltriton.load(k_ref.at[index], mask=kv_valid[:, None], other=0)     # [BK, D]
        v = pltriton.load(v_ref.at[index], mask=kv_valid[:, None], other=0)     # [BK, D]
        if quantized:   # 8 bits -> q's dtype in registers; scales applied to scores and probabilities
            k, v = k.astype(q.dtype), v.astype(q.dtype)
            scale_index = (slot.reshape(block_kv), h)
            k_scale = pltriton.load(k_scale_ref.at[scale_index], mask=kv_valid, other=0)[None, :]   # [1, BK]
            v_scale = pltriton.load(v_scale_ref.at[scale_index], mask=kv_valid, other=0)[None, :]
        scores = _dot(q, k, ((1,), (1,)), exact) * sm_scale                # [M, BK]
        if quantized:
            scores = scores * k_scale
        if soft_cap is not None:
            scores = soft_cap * jnp.tanh(scores / soft_cap)
        # Every block holds at least one valid column, so masked columns get exp2(-huge) = 0 exactly.
        scores = jnp.where(kv_valid[None, :], scores, DEFAULT_MASK_VALUE)
        m_next = jnp.maximum(m_prev, scores.max(axis=1, keepdims=True))
        correction = jnp.exp2((m_prev - m_next) * _LOG2E)
        p = jnp.exp2((scores - m_next) * _LOG2E)
        l_next = correction * l_prev + p.sum(axis=1, keepdims=True)
        pv = _dot((p * v_scale if quantized else p).astype(v.dtype), v, ((1,), (0,)), exact)  # [M, D]
        return acc * correction + pv, m_next, l_next

    init = (jnp.zeros((group_p, head_dim), jnp.float32),
            jnp.full((group_p, 1), DEFAULT_MASK_VALUE, jnp.float32),
            jnp.zeros((group_p, 1), jnp.float32))
    num_blocks = pl.cdiv(jnp.maximum(split_hi - split_lo, 0), pages_per_block)
    acc, m, l = lax.fori_loop(0, num_blocks, body, init)
    out = acc / jnp.maximum(l, 1e-30)                                      # empty range: zeros

    if num_kv_splits == 1:
        (o_ref,) = out_refs
        pltriton.store(o_ref.at[t, pl.ds(h * group, group_p), :], out.astype(o_ref.dtype),
                       mask=row < group)
    else:
        o_part_ref, lse_ref = out_refs
        base = ((t * num_kv_heads + h) * splits_p + split) * group_q
        pltriton.store(o_part_ref.at[pl.ds(base, group_p), :], out, mask=row < group_q)
        lse = jnp.where(l > 0, m + jnp.log(jnp.maximum(l, 1e-30)), DEFAULT_MASK_VALUE).reshape(group_p)
        pltriton.store(lse_ref.at[pl.ds(base, group_p)], lse,
                       mask=lax.iota(jnp.int32, group_p) < group_q)


def _merge_kernel(o_part_ref, lse_ref, o_ref, *, num_kv_heads: int, splits_p: int, group: int,
                  group_q: int):
    """One token x one kv head: log-sum-exp merge of the splits' normalised outputs, stored as [T, Hq, D]."""
    t, h = pl.program_id(0), pl.program_id(1)
    head_dim = o_ref.shape[2]
    n = splits_p * group_q
    base = (t * num_kv_heads + h) * n
    lse = lse_ref[pl.ds(base, n)].reshape(splits_p, group_q)
    parts = o_part_ref[pl.ds(base, n), :].reshape(splits_p, group_q, head_dim)
    weights = jnp.exp(lse - lse.max(axis=0, keepdims=True))               # empty splits: exp(-huge) = 0
    out = (weights[:, :, None] * parts).sum(axis=0) / weights.sum(axis=0)[:, None]
    row = lax.broadcasted_iota(jnp.int32, (group_q, head_dim), 0)
    pltriton.store(o_ref.at[t, pl.ds(h * group, group_q), :], out.astype(o_ref.dtype), mask=row < group)


def _decode_call(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *, sm_scale: float,
                 sliding_window: int | None, soft_cap: float | None, config: TuningConfig,
                 interpret: bool, k_scale=None, v_scale=None) -> jax.Array:
    """The decode path: one launch (plus the merge launch when kv is split) over `[N, page_size, Hkv, D]` pools."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k_pages.shape
    flat = (num_pages * page_size, num_kv_heads, head_dim)
    group = num_q_heads // num_kv_heads
    group_p = padded_group(num_q_heads, num_kv_heads, 1)
    group_q = _next_pow2(group)
    splits = config.num_kv_splits
    splits_p = _next_pow2(splits)
    if splits == 1:
        out_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
    else:
        rows = num_tokens * num_kv_heads * splits_p * group_q
        out_shape = (jax.ShapeDtypeStruct((rows, head_dim), jnp.float32),
                     jax.ShapeDtypeStruct((rows,), jnp.float32))
    kernel = functools.partial(
        _decode_kernel, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
        page_size=page_size, pages_per_block=config.pages_per_block, num_kv_splits=splits,
        splits_p=splits_p, group=group, group_p=group_p, group_q=group_q,
        exact=q.dtype == jnp.float32, quantized=k_scale is not None)
    scales = () if k_scale is None else (k_scale.reshape(flat[:2]), v_scale.reshape(flat[:2]))
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(num_tokens, num_kv_heads, splits_p if splits > 1 else 1),
        compiler_params=pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="jpaged_paged_decode",
    )(cu_q_lens, kv_lens, jnp.reshape(num_seqs, (1,)).astype(jnp.int32), page_table, q,
      k_pages.reshape(flat), v_pages.reshape(flat), *scales)
    if splits == 1:
        return out
    merge = functools.partial(_merge_kernel, num_kv_heads=num_kv_heads, splits_p=splits_p, group=group,
                              group_q=group_q)
    return pl.pallas_call(
        merge,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(num_tokens, num_kv_heads),
        compiler_params=pltriton.CompilerParams(num_warps=MERGE_NUM_WARPS, num_stages=1),
        interpret=interpret,
        name="jpaged_paged_decode_merge",
    )(*out)


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "config",
                                              "interpret"))
def ragged_paged_attention_pallas(
    q: jax.Array,           # [T, Hq, D]
    k_pages: jax.Array,     # [N, page_size, Hkv, D]
    v_pages: jax.Array,     # [N, page_size, Hkv, D]
    kv_lens: jax.Array,     # [S] int32
    page_table: jax.Array,  # [S, P] int32
    cu_q_lens: jax.Array,   # [S + 1] int32
    num_seqs: jax.Array,    # [] int32
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    config: TuningConfig | None = None,
    interpret: bool = False,
    k_scale: jax.Array | None = None,   # [N, page_size, Hkv] float32 with 8-bit pages
    v_scale: jax.Array | None = None,
) -> jax.Array:
    """Ragged paged attention (semantics in `ragged_paged_attention.py`) as a Pallas kernel.

    Args:
      q: [T, Hq, D] new tokens of all sequences, flattened; rows past cu_q_lens[num_seqs] are padding.
      k_pages, v_pages: [N, page_size, Hkv, D] page pools.
      kv_lens: [S] context length of each sequence after this step (new tokens included).
      page_table: [S, P] physical page of each logical page.
      cu_q_lens: [S + 1] boundaries of each sequence's tokens in q.
      num_seqs: [] number of real sequences.
      sm_scale, sliding_window, soft_cap: as the reference.
      config: launch shape; None picks one from the static shapes (`choose_config`).
      interpret: run the same kernel in Pallas' interpreter (CPU).
      k_scale, v_scale: with 8-bit pages, their [N, page_size, Hkv] float32 scales (else None).

    Returns:
      o: [T, Hq, D] in q's dtype; padding rows are zeros.
    """
    static_validate_inputs(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs)
    validate_scales(k_pages, v_pages, k_scale, v_scale)
    if (reason := options_reason(sliding_window, None)) is not None:
        raise ValueError(reason)
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    num_slots, pages_per_seq = page_table.shape
    if config is None:
        config = choose_config(num_tokens, num_slots, pages_per_seq, num_q_heads, num_kv_heads, page_size)
    if num_tokens == 0:
        return jnp.zeros(q.shape, q.dtype)
    if config.block_q == 1:
        return _decode_call(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs,
                            sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                            config=config, interpret=interpret, k_scale=k_scale, v_scale=v_scale)
    block_q = config.block_q
    group = num_q_heads // num_kv_heads
    group_p = padded_group(num_q_heads, num_kv_heads, block_q)

    work_seq, work_start = work_items(cu_q_lens, jnp.reshape(num_seqs, ()), num_tokens, block_q)
    num_items = work_seq.shape[0]
    q4 = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    q4 = jnp.pad(q4, ((0, block_q), (0, 0), (0, group_p - group), (0, 0)))  # [T + bq, Hkv, Gp, D]
    table = jnp.pad(page_table, ((0, 0), (0, config.pages_per_block)))

    kernel = functools.partial(
        _kernel, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, block_q=block_q,
        pages_per_block=config.pages_per_block, num_q_heads_per_kv=group, exact=q.dtype == jnp.float32,
        quantized=k_scale is not None)
    scales = () if k_scale is None else (k_scale, v_scale)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(q4.shape, q.dtype),
        grid=(num_items, num_kv_heads),
        input_output_aliases={8 + len(scales): 0},
        compiler_params=pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="jpaged_ragged_paged_attention",
    )(work_seq, work_start, kv_lens, cu_q_lens, table, q4, k_pages, v_pages, *scales,
      jnp.zeros(q4.shape, q.dtype))
    return out[:num_tokens, :, :group, :].reshape(num_tokens, num_q_heads, head_dim)
