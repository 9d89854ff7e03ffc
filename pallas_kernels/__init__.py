"""Pallas GPU kernels for paged attention, each with a plain-jnp reference beside it.

`impl` picks the implementation behind one API: "reference" (plain jnp, any backend).
"""
from __future__ import annotations

from pallas_kernels.kv_write import write_kv_reference
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference

IMPLS = ("reference",)


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *,
                           sm_scale, sliding_window=None, soft_cap=None, impl="reference"):
    _check_impl(impl)
    return ragged_paged_attention_reference(
        q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs,
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)


def write_kv(k_pages, v_pages, k, v, slot_mapping, *, impl="reference"):
    _check_impl(impl)
    return write_kv_reference(k_pages, v_pages, k, v, slot_mapping)


__all__ = ["ragged_paged_attention", "ragged_paged_attention_reference", "write_kv",
           "write_kv_reference", "IMPLS"]
