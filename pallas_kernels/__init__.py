"""Pallas GPU kernels for paged attention, each with a plain-jnp reference beside it.

`impl` picks the implementation behind one API:
- "reference": plain jnp, any backend.
- "pallas": the Pallas kernel, Triton lowering on GPU.
- "interpret": the same kernel in Pallas' interpreter (CPU).
- "mosaic" (GPU): prefill-shaped batches (T > S), sliding window and soft-cap included, go to the Mosaic
  GPU wgmma/TMA kernel when it supports the inputs, except their single-token sequences (the decodes of a
  mixed batch), which go to the decode kernel in the same call (`mixed_batch.attend_mixed`;
  SPLIT_MIXED_BATCHES = False sends them to the Mosaic kernel too, for A/B runs); decode-shaped batches
  and the rest go to the Triton kernel, which reads KV 0-4 % faster than the Mosaic decode kernel at the
  engine's decode shapes (README.md).
- "mosaic_full" (GPU, opt-in, for A/B runs): as "mosaic", and decode-shaped batches go to the Mosaic
  GPU decode kernel when it supports them.
The MLP's gate/up GEMM goes through `gate_up_swiglu`: under "mosaic"/"mosaic_full" the Mosaic GPU GEMM
with its SwiGLU epilogue (`matmul_mgpu.py`) where it takes the shapes (rows a multiple of 256), else XLA.
The KV write is in place when the cache is donated (bench/kernels.py measures it flat in the pool size).
It is XLA's scatter for every impl: in the H100 measurements it was as fast as the Pallas kernel
`write_kv_pallas` (bench/README.md); JPAGED_KV_WRITE=pallas selects that kernel (the interpreter under
impl="interpret") for A/B runs.
"""
from __future__ import annotations

import functools
import os

import jax.numpy as jnp

from pallas_kernels.kv_write import write_kv_pallas, write_kv_reference
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention_kernel import ragged_paged_attention_pallas
# The module, not its function of the same name: `pallas_kernels.ragged_paged_attention_mgpu` stays the module.
from pallas_kernels import ragged_paged_attention_mgpu as _mgpu
from pallas_kernels import paged_decode_mgpu as _decode_mgpu
from pallas_kernels.mixed_batch import attend_mixed
from pallas_kernels import matmul_mgpu as _matmul_mgpu

# Read at trace time: whether "mosaic" splits a prefill-shaped batch's decodes off to the decode kernel,
# and whether it runs the MLP's gate/up GEMM as the Mosaic GEMM with the SwiGLU epilogue (A/B switches).
SPLIT_MIXED_BATCHES = True
FUSED_SWIGLU = True

IMPLS = ("reference", "pallas", "interpret", "mosaic", "mosaic_full")


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def mosaic_takes(q, k_pages, page_table, *, sliding_window=None, soft_cap=None) -> bool:
    """Whether "mosaic" and "mosaic_full" send this batch to the Mosaic GPU prefill kernel: prefill-shaped
    (T > S) and supported."""
    prefill_shaped = q.shape[0] > page_table.shape[0]
    return prefill_shaped and _mgpu.unsupported_reason(q, k_pages, sliding_window=sliding_window,
                                                       soft_cap=soft_cap) is None


def mosaic_decode_takes(q, k_pages, page_table, *, sliding_window=None, soft_cap=None) -> bool:
    """Whether impl="mosaic_full" sends this batch to the Mosaic GPU decode kernel: decode-shaped (T <= S)
    and supported."""
    return _decode_mgpu.unsupported_reason(q, k_pages, page_table, sliding_window=sliding_window,
                                           soft_cap=soft_cap) is None


def ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *,
                           sm_scale, sliding_window=None, soft_cap=None, impl="reference",
                           max_prefill_seqs=None):
    """o[T, Hq, D]; semantics in `ragged_paged_attention.py`, shapes in its reference's signature.

    `max_prefill_seqs`: None, or a static bound on the sequences with more than one new token, which the
    caller guarantees (the engine's scheduler does: EngineConfig.max_num_prefill_seqs). The mixed split
    sizes the Mosaic kernel's work list by it; every other path ignores it."""
    _check_impl(impl)
    if impl == "reference":
        return ragged_paged_attention_reference(
            q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs,
            sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    semantics = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    if impl in ("mosaic", "mosaic_full") and mosaic_takes(q, k_pages, page_table, sliding_window=sliding_window,
                                                          soft_cap=soft_cap):
        if not SPLIT_MIXED_BATCHES:
            return _mgpu.ragged_paged_attention_mgpu(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens,
                                                     num_seqs, **semantics)
        return attend_mixed(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs,
                            prefill=functools.partial(_mgpu.ragged_paged_attention_mgpu, **semantics,
                                                      max_seqs=max_prefill_seqs),
                            decode=functools.partial(ragged_paged_attention, **semantics, impl=impl))
    if impl == "mosaic_full" and mosaic_decode_takes(q, k_pages, page_table, sliding_window=sliding_window,
                                                     soft_cap=soft_cap):
        return _decode_mgpu.paged_decode_mgpu(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs,
                                              sm_scale=sm_scale)
    return ragged_paged_attention_pallas(
        q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, sm_scale=sm_scale,
        sliding_window=sliding_window, soft_cap=soft_cap, interpret=impl == "interpret")


def gate_up_swiglu(x, w_gate_up, *, impl="reference"):
    """h [M, F] = silu(gate) * up for x [M, E] and the fused weight [E, 2F] laid out by
    `matmul_mgpu.interleave_gate_up`: the Mosaic GPU GEMM with its SwiGLU epilogue under "mosaic" and
    "mosaic_full" where it takes the shapes, else x @ w in XLA and then the SwiGLU."""
    _check_impl(impl)
    if (impl in ("mosaic", "mosaic_full") and FUSED_SWIGLU
            and _matmul_mgpu.unsupported_reason(x, w_gate_up, epilogue="swiglu") is None):
        return _matmul_mgpu.matmul_mgpu(x, w_gate_up, epilogue="swiglu")
    return _matmul_mgpu.swiglu(*_matmul_mgpu.split_gate_up(jnp.dot(x, w_gate_up)))


def write_kv(k_pages, v_pages, k, v, slot_mapping, *, impl="reference"):
    """(k_pages, v_pages) with k[t], v[t] written at slot_mapping[t] (-1 = skip); donate the pages."""
    _check_impl(impl)
    if impl == "reference" or os.environ.get("JPAGED_KV_WRITE", "xla") != "pallas":
        return write_kv_reference(k_pages, v_pages, k, v, slot_mapping)
    return write_kv_pallas(k_pages, v_pages, k, v, slot_mapping, interpret=impl == "interpret")


__all__ = ["ragged_paged_attention", "gate_up_swiglu", "ragged_paged_attention_reference", "ragged_paged_attention_pallas",
           "mosaic_takes", "mosaic_decode_takes", "write_kv", "write_kv_reference", "write_kv_pallas", "IMPLS"]
