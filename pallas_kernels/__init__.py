"""Pallas GPU kernels for paged attention, the KV write and the MLP's gate/up GEMM, each with a plain-jnp
reference beside it, behind one API routed by a `Backend` (pallas_kernels/backend.py).

- `write_kv`: Backend.kv_write "xla" (a scatter, in place when the cache is donated) or "pallas";
  `write_kv_quantized` the same into 8-bit pages with their scales (`kv_quant`), quantizing as it writes.
- `ragged_paged_attention`: prefill-shaped batches (T > S) go to Backend.prefill, decode-shaped ones
  (T <= S) to Backend.decode. Under prefill="mosaic" with split_mixed, a prefill-shaped batch's
  single-token sequences go to the decode kernel in the same call (`mixed_batch.attend_mixed`). A Mosaic
  kernel that cannot take a call (its `unsupported_reason`) leaves it to the Triton kernel.
- `gate_up_swiglu`: Backend.gate_up "mosaic" runs the Mosaic GEMM with its SwiGLU epilogue where it
  takes the shapes (rows a multiple of 256), else XLA.
- `lora_delta`: the per-token LoRA update of multi-LoRA steps, Backend.lora "masked" or "ragged" (lora.py).
- `grouped_matmul`: the MoE experts' GEMM over rows sorted by expert; Backend.grouped_gemm "pallas" runs
  the Pallas kernel where it takes the shapes, else `jax.lax.ragged_dot`.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp

from pallas_kernels.backend import PRESETS, REFERENCE, Backend, select_backend
from pallas_kernels.kv_write import (write_kv_pallas, write_kv_quantized_pallas, write_kv_quantized_reference,
                                     write_kv_reference)
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention_kernel import ragged_paged_attention_pallas
# The module, not its function of the same name: `pallas_kernels.ragged_paged_attention_mgpu` stays the module.
from pallas_kernels import ragged_paged_attention_mgpu as _mgpu
from pallas_kernels.mixed_batch import attend_mixed
from pallas_kernels import matmul_mgpu as _matmul_mgpu
from pallas_kernels import lora as _lora
from pallas_kernels import grouped_gemm as _grouped_gemm


def _check_backend(backend) -> None:
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be a pallas_kernels.Backend, got {backend!r}")


def mosaic_takes(q, k_pages, page_table, *, sliding_window=None, soft_cap=None) -> bool:
    """Whether prefill="mosaic" sends this batch to the Mosaic GPU prefill kernel: prefill-shaped (T > S)
    and supported."""
    prefill_shaped = q.shape[0] > page_table.shape[0]
    return prefill_shaped and _mgpu.unsupported_reason(q, k_pages, sliding_window=sliding_window,
                                                       soft_cap=soft_cap) is None


def ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *,
                           sm_scale, sliding_window=None, soft_cap=None, backend: Backend = REFERENCE,
                           max_prefill_seqs=None, k_scale=None, v_scale=None):
    """o[T, Hq, D]; semantics in `ragged_paged_attention.py`, shapes in its reference's signature.
    `k_scale`, `v_scale`: the [N, page_size, Hkv] float32 scales of 8-bit pages, else None (the Mosaic
    kernel does not read 8-bit pages, so they always take the Triton kernels).

    `max_prefill_seqs`: None, or a static bound on the sequences with more than one new token, which the
    caller guarantees (the engine's scheduler does: EngineConfig.max_num_prefill_seqs). The mixed split
    sizes the Mosaic kernel's work list by it; every other path ignores it."""
    _check_backend(backend)
    if not backend.uses_kernels:
        return ragged_paged_attention_reference(
            q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs,
            sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, k_scale=k_scale,
            v_scale=v_scale)
    semantics = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    if backend.prefill == "mosaic" and mosaic_takes(q, k_pages, page_table, sliding_window=sliding_window,
                                                    soft_cap=soft_cap):
        if not backend.split_mixed:
            return _mgpu.ragged_paged_attention_mgpu(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens,
                                                     num_seqs, **semantics)
        return attend_mixed(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs,
                            prefill=functools.partial(_mgpu.ragged_paged_attention_mgpu, **semantics,
                                                      max_seqs=max_prefill_seqs),
                            decode=functools.partial(ragged_paged_attention, **semantics, backend=backend))
    return ragged_paged_attention_pallas(
        q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, sm_scale=sm_scale,
        sliding_window=sliding_window, soft_cap=soft_cap, interpret=backend.interpret, k_scale=k_scale,
        v_scale=v_scale)


def gate_up_swiglu(x, w_gate_up, *, backend: Backend = REFERENCE):
    """h [M, F] = silu(gate) * up for x [M, E] and the fused weight [E, 2F] laid out by
    `matmul_mgpu.interleave_gate_up`: the Mosaic GPU GEMM with its SwiGLU epilogue under gate_up="mosaic"
    where it takes the shapes, else x @ w in XLA and then the SwiGLU."""
    _check_backend(backend)
    if backend.gate_up == "mosaic" and _matmul_mgpu.unsupported_reason(x, w_gate_up, epilogue="swiglu") is None:
        return _matmul_mgpu.matmul_mgpu(x, w_gate_up, epilogue="swiglu")
    return _matmul_mgpu.swiglu(*_matmul_mgpu.split_gate_up(jnp.dot(x, w_gate_up)))


def grouped_matmul(x, w, group_sizes, *, epilogue: str = "none", backend: Backend = REFERENCE):
    """y [M, N] (or [M, N / 2] with epilogue="swiglu") with y[r] = x[r] @ w[g] for the rows of group g,
    groups consecutive by `group_sizes` [G]; rows past the last group are zero (grouped_gemm.py; named
    apart from that module, which stays `pallas_kernels.grouped_gemm`)."""
    _check_backend(backend)
    if backend.grouped_gemm == "pallas" and _grouped_gemm.unsupported_reason(x, w, epilogue=epilogue) is None:
        return _grouped_gemm.grouped_gemm_pallas(x, w, group_sizes, epilogue=epilogue, interpret=backend.interpret)
    return _grouped_gemm.grouped_gemm_reference(x, w, group_sizes, epilogue=epilogue)


def write_kv(k_pages, v_pages, k, v, slot_mapping, *, backend: Backend = REFERENCE):
    """(k_pages, v_pages) with k[t], v[t] written at slot_mapping[t] (-1 = skip); donate the pages."""
    _check_backend(backend)
    if backend.kv_write == "xla":
        return write_kv_reference(k_pages, v_pages, k, v, slot_mapping)
    return write_kv_pallas(k_pages, v_pages, k, v, slot_mapping, interpret=backend.interpret)


def write_kv_quantized(k_pages, v_pages, k_scale, v_scale, k, v, slot_mapping, *, backend: Backend = REFERENCE):
    """`write_kv` into 8-bit pages: (k_pages, v_pages, k_scale, v_scale) with k[t], v[t] quantized per
    (token, kv head) and written at slot_mapping[t] (-1 = skip); donate the pages and scales."""
    _check_backend(backend)
    if backend.kv_write == "xla":
        return write_kv_quantized_reference(k_pages, v_pages, k_scale, v_scale, k, v, slot_mapping)
    return write_kv_quantized_pallas(k_pages, v_pages, k_scale, v_scale, k, v, slot_mapping,
                                     interpret=backend.interpret)


def lora_delta(x, a, b, lora_index, *, backend: Backend = REFERENCE):
    """[T, Dout]: x[t] @ a[:, i] @ b[i] for each token's slot i = lora_index[t] (-1: zeros), by Backend.lora."""
    _check_backend(backend)
    return _lora.lora_delta(x, a, b, lora_index, impl=backend.lora)


__all__ = ["Backend", "PRESETS", "REFERENCE", "select_backend", "ragged_paged_attention", "gate_up_swiglu",
           "lora_delta", "grouped_matmul",
           "ragged_paged_attention_reference", "ragged_paged_attention_pallas", "mosaic_takes",
           "write_kv", "write_kv_reference", "write_kv_pallas", "write_kv_quantized",
           "write_kv_quantized_reference", "write_kv_quantized_pallas"]
