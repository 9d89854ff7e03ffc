"""A mixed batch (prefill chunks beside single-token decodes) split over two kernels in one call.

The Mosaic GPU prefill kernel gives every sequence at least one CTA per kv head with a 2 x 16-token q
tile, so a decode (one new token) fills 4 of its 64 rows and pays the CTA's whole prologue and epilogue to
read its context, where the decode kernel reads the same bytes faster (pallas_kernels/README.md, "Mixed
batches"). So `attend_mixed` sends the decodes' rows to a decode-shaped call (one row per sequence slot)
and the rest to the prefill call with the decodes left out of its work list, then scatters the decode
rows over the prefill output.

Semantics are `ragged_paged_attention.py`'s; the split is exact (each row's attention is computed by one
of the two calls, over the same pages).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def decode_slots(cu_q_lens: jax.Array, num_seqs: jax.Array) -> jax.Array:
    """is_decode[S]: the real sequences with exactly one new token this step."""
    num_slots = cu_q_lens.shape[0] - 1
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    return (q_lens == 1) & (jnp.arange(num_slots, dtype=jnp.int32) < jnp.reshape(num_seqs, ()))


def attend_mixed(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *,
                 prefill: Callable, decode: Callable) -> jax.Array:
    """o[T, Hq, D] of a ragged batch: `decode` for its single-token sequences, `prefill` for the rest.

    `prefill(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, exclude=)` must return every
    row of the sequences not in `exclude` [S] bool and the padding rows (zeros); the rows of excluded
    sequences may hold anything. `decode(q_dec, k_pages, v_pages, kv_lens_dec, page_table, cu_dec,
    num_seqs)` gets a decode-shaped batch: one row per slot (row s = sequence s's first new token) and
    kv length 0 for every slot that is not a decode, whose row it must return as zeros (never read here).
    """
    num_tokens = q.shape[0]
    num_slots = page_table.shape[0]
    is_decode = decode_slots(cu_q_lens, num_seqs)
    first_row = cu_q_lens[:-1]
    q_dec = q[jnp.minimum(first_row, num_tokens - 1)]                                   # [S, Hq, D]
    kv_lens_dec = jnp.where(is_decode, kv_lens, 0)
    cu_dec = jnp.arange(num_slots + 1, dtype=jnp.int32)
    o_dec = decode(q_dec, k_pages, v_pages, kv_lens_dec, page_table, cu_dec, num_seqs)
    o = prefill(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, exclude=is_decode)
    # Distinct targets (the non-decode slots each get their own row past T, dropped), so the scatter
    # may assume unique indices.
    rows = jnp.where(is_decode, first_row, num_tokens + jnp.arange(num_slots, dtype=jnp.int32))
    return o.at[rows].set(o_dec.astype(o.dtype), mode="drop", unique_indices=True)
