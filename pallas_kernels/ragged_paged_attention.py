"""Ragged paged attention: one call serves a batch mixing prefill chunks and decodes over a paged KV cache.

Semantics (DESIGN.md, "Kernel semantics"): sequence s owns the new tokens
`cu_q_lens[s]:cu_q_lens[s+1]` of `q`; its i-th new token sits at position
`p = kv_lens[s] - q_len + i` and attends to every cached position j with `j <= p` and, with a
window W, `p - j < W`. Rows of padding (tokens past `cu_q_lens[num_seqs]`) come out as zeros.

KV layout: `k_pages, v_pages: [num_pages, page_size, Hkv, D]`; page `page_table[s, j // page_size]`
holds position j of sequence s at offset `j % page_size`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


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
) -> jax.Array:
    """Plain-jnp ragged paged attention with the kernel's signature; jittable, no loop over sequences.

    Tokens are processed `token_block` at a time (`lax.map`), so memory stays at
    token_block x max_context instead of T x max_context.
    """
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
