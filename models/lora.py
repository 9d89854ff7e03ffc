"""Where the model adds LoRA updates: each targeted projection's output gains its tokens' adapter deltas.

`lora` is one layer's device slots, {projection: (A [Din, L, R], B [L, R, Dout])} keyed by the model's
own projection names (`qkv_proj`, `gate_up_proj` when fused, else `q_proj` ...; jpaged/lora/manager.py
lays fused ones out so one delta covers all their targets); `step.lora_index` says each token's slot.
With `lora=None` (LoRA off) every function here returns the base result untouched, so a model without
adapters traces exactly as before.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

import pallas_kernels
from models.kv_cache import StepInput
from pallas_kernels import Backend
from pallas_kernels.matmul_mgpu import split_gate_up, swiglu


def add(y: jax.Array, x: jax.Array, lora: dict | None, projection: str, step: StepInput,
        backend: Backend) -> jax.Array:
    """y [T, Dout] (the base output of `projection` for input x [T, Din]) + every token's adapter update."""
    if lora is None:
        return y
    a, b = lora[projection]
    return y + pallas_kernels.lora_delta(x, a, b, step.lora_index, backend=backend)


def gate_up_swiglu(x: jax.Array, w_gate_up: jax.Array, lora: dict, step: StepInput, backend: Backend) -> jax.Array:
    """silu(gate) * up for the fused, interleaved gate/up weight (`matmul_mgpu.interleave_gate_up`) plus its
    adapter update. The update lands before the activation, so this is XLA's GEMM, not the SwiGLU kernel."""
    return swiglu(*split_gate_up(add(jnp.dot(x, w_gate_up), x, lora, "gate_up_proj", step, backend)))
