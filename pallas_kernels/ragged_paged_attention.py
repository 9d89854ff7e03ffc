"""Ragged paged attention: one call serves a batch mixing prefill chunks and decodes over a paged KV cache.

Semantics, which every kernel of this package implements: sequence s owns the new tokens
`cu_q_lens[s]:cu_q_lens[s+1]` of `q`; its i-th new token sits at position
`p = kv_lens[s] - q_len + i` and attends to every cached position j with `j <= p` and, with a
window W, `p - j < W`. Rows of padding (tokens past `cu_q_lens[num_seqs]`) come out as zeros.

KV layout: `k_pages, v_pages: [num_pages, page_size, Hkv, D]`; page `page_table[s, j // page_size]`
holds position j of sequence s at offset `j % page_size`. 8-bit pages (`kv_quant`) come with
`k_scale, v_scale: [num_pages, page_size, Hkv]` float32: the value attended to is `page * scale`.

Besides the jnp oracle, this module holds what every kernel shares: `static_validate_inputs` (the
operand checks) and the checks of the page format and of the semantics' options that the kernels'
`unsupported_reason` functions are built from.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import kv_quant

DEFAULT_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


ROW_ALIGN = 8   # the Mosaic kernels' TMA row granularity: the smallest page they take


def static_validate_inputs(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs) -> None:
    """Trace-time checks of every operand; ValueError names the operand, NotImplementedError the limit."""
    if q.ndim != 3:
        raise ValueError(f"q must be [T, Hq, D], got shape {q.shape}")
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages and v_pages must both be [N, page_size, Hkv, D], got {k_pages.shape} "
                         f"and {v_pages.shape}")
    _, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, kv_head_dim = k_pages.shape
    if kv_head_dim != head_dim:
        raise ValueError(f"k_pages head dim {kv_head_dim} must equal q head dim {head_dim}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"q heads ({num_q_heads}) must be a multiple of kv heads ({num_kv_heads})")
    if k_pages.dtype != v_pages.dtype:
        raise ValueError(f"k_pages and v_pages must share a dtype, got {k_pages.dtype}, {v_pages.dtype}")
    if page_table.ndim != 2:
        raise ValueError(f"page_table must be [S, P], got shape {page_table.shape}")
    num_slots = page_table.shape[0]
    if kv_lens.shape != (num_slots,):
        raise ValueError(f"kv_lens must be [S]=[{num_slots}], got shape {kv_lens.shape}")
    if cu_q_lens.shape != (num_slots + 1,):
        raise ValueError(f"cu_q_lens must be [S + 1]=[{num_slots + 1}], got shape {cu_q_lens.shape}")
    if jnp.shape(num_seqs) not in ((), (1,)):
        raise ValueError(f"num_seqs must be a scalar, got shape {jnp.shape(num_seqs)}")
    for name, x in (("kv_lens", kv_lens), ("page_table", page_table), ("cu_q_lens", cu_q_lens)):
        if x.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32, got {x.dtype}")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise NotImplementedError(f"head_dim must be a power of two >= 16, got {head_dim}")
    if page_size & (page_size - 1):
        raise NotImplementedError(f"page_size must be a power of two, got {page_size}")


def validate_scales(k_pages, v_pages, k_scale, v_scale) -> None:
    """Trace-time checks of the scale operands: both None for unquantized pages, float32
    [N, page_size, Hkv] for 8-bit pages."""
    quantized = kv_quant.is_quantized(k_pages.dtype)
    if not quantized:
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"k_scale / v_scale come only with 8-bit pages, got pages of {k_pages.dtype}")
        return
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is None:
            raise ValueError(f"{k_pages.dtype} pages need {name} ([N, page_size, Hkv] float32)")
        if scale.shape != k_pages.shape[:3] or scale.dtype != kv_quant.SCALE_DTYPE:
            raise ValueError(f"{name} must be float32 {k_pages.shape[:3]}, got {scale.dtype} {scale.shape}")


def options_reason(sliding_window, soft_cap) -> str | None:
    """Why these semantics options are invalid (None when they are valid)."""
    if sliding_window is not None and sliding_window < 1:
        return f"sliding_window must be >= 1 or None, got {sliding_window}"
    if soft_cap is not None and not soft_cap > 0:
        return f"soft_cap must be > 0 or None, got {soft_cap}"
    return None


def mosaic_page_format_reason(*, head_dim: int, page_size: int, dtype, block_kv: int) -> str | None:
    """Why a Mosaic GPU kernel streaming `block_kv`-token blocks cannot read pages of this format."""
    if kv_quant.is_quantized(dtype):
        return (f"8-bit pages ({jnp.dtype(dtype)}) are not implemented in the Mosaic kernels (the Triton "
                f"kernels dequantize them)")
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return f"dtype must be bf16 or f16, got {jnp.dtype(dtype)}"
    if head_dim not in (64, 128):
        return f"head_dim must be 64 or 128, got {head_dim}"
    if page_size < ROW_ALIGN or page_size & (page_size - 1) or block_kv % page_size:
        return f"page_size must be a power of two in [{ROW_ALIGN}, {block_kv}], got {page_size}"
    return None


def mosaic_inputs_reason(q, k_pages, *, block_kv: int) -> str | None:
    """`mosaic_page_format_reason` of these pages, and q of the pages' dtype."""
    reason = mosaic_page_format_reason(head_dim=q.shape[2], page_size=k_pages.shape[1], dtype=k_pages.dtype,
                                       block_kv=block_kv)
    if reason is None and k_pages.dtype != q.dtype:
        return f"q and pages must share a dtype, got {q.dtype} and {k_pages.dtype}"
    return reason


def token_sequence_ids(cu_q_lens: jax.Array, num_tokens: int) -> jax.Array:
    """seq_ids[T]: the sequence each flattened token belongs to (padding tokens get num_seqs or more)."""
    return jnp.searchsorted(cu_q_lens[1:], jnp.arange(num_tokens, dtype=jnp.int32), side="right")


def ragged_paged_attention_reference(
    q: jax.Array,           # [T, Hq, D]
    k_pages: jax.Array,     # [num_pages, page_size, Hkv, D]
    v_pages: jax.Array,     # [num_pages, page_size, Hkv, D]
    kv_lens: jax.Array,     # [S] int32
    page_table: jax.Array,  # [S, P] int32
    cu_q_lens: jax.Array,   # [S + 1] int32
    num_seqs: jax.Array,    # [] int32
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    token_block: int = 64,
    k_scale: jax.Array | None = None,   # [num_pages, page_size, Hkv] float32 with 8-bit pages
    v_scale: jax.Array | None = None,
) -> jax.Array:
    """Plain-jnp ragged paged attention with the kernel's signature; jittable, no loop over sequences.

    Tokens are processed `token_block` at a time (`lax.map`), so memory stays at
    token_block x max_context instead of T x max_context. 8-bit pages are gathered as 8 bits and
    dequantized per block (values x their scale) in float32.
    """
    validate_scales(k_pages, v_pages, k_scale, v_scale)
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    num_seqs_max, pages_per_seq = page_table.shape
    group = num_q_heads // num_kv_heads
    max_len = pages_per_seq * page_size

    seq_ids = token_sequence_ids(cu_q_lens, num_tokens)
    valid = seq_ids < jnp.minimum(num_seqs, num_seqs_max)
    seq_ids = jnp.where(valid, seq_ids, 0)
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    token_idx = jnp.arange(num_tokens, dtype=jnp.int32)
    positions = kv_lens[seq_ids] - q_lens[seq_ids] + (token_idx - cu_q_lens[seq_ids])

    def attend(args):
        q_t, seq_t, pos_t, valid_t = args  # [B, Hq, D], [B], [B], [B]
        pages = page_table[seq_t]                                    # [B, P]
        k = k_pages[pages].reshape(-1, max_len, num_kv_heads, head_dim)  # [B, L, Hkv, D]
        v = v_pages[pages].reshape(-1, max_len, num_kv_heads, head_dim)
        if k_scale is not None:
            k = kv_quant.dequantize(k, k_scale[pages].reshape(-1, max_len, num_kv_heads))
            v = kv_quant.dequantize(v, v_scale[pages].reshape(-1, max_len, num_kv_heads))
        q_g = q_t.reshape(-1, num_kv_heads, group, head_dim).astype(jnp.float32)
        s = jnp.einsum("bkgd,blkd->bkgl", q_g, k.astype(jnp.float32)) * sm_scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        j = jnp.arange(max_len, dtype=jnp.int32)
        mask = (j[None, :] <= pos_t[:, None]) & valid_t[:, None]
        if sliding_window is not None:
            mask &= pos_t[:, None] - j[None, :] < sliding_window
        s = jnp.where(mask[:, None, None, :], s, DEFAULT_MASK_VALUE)
        p = jnp.exp(s - s.max(axis=-1, keepdims=True))
        p = jnp.where(mask[:, None, None, :], p, 0.0)
        denom = jnp.maximum(p.sum(axis=-1, keepdims=True), 1e-30)
        # Masked V rows may hold anything (NaN in stale pages): select, never multiply by zero.
        v = jnp.where(mask[:, :, None, None], v.astype(jnp.float32), 0.0)
        o = jnp.einsum("bkgl,blkd->bkgd", p / denom, v)
        o = jnp.where(valid_t[:, None, None, None], o, 0.0)
        return o.reshape(-1, num_q_heads, head_dim).astype(q.dtype)

    block = max(1, min(token_block, num_tokens))
    pad = (-num_tokens) % block

    def blocks(x):
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape(-1, block, *x.shape[1:])

    out = jax.lax.map(attend, (blocks(q), blocks(seq_ids), blocks(positions), blocks(valid)))
    return out.reshape(-1, num_q_heads, head_dim)[:num_tokens]
