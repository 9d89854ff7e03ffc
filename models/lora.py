"""Where the model adds LoRA updates: each targeted projection's output gains its tokens' adapter deltas.

`lora` is one layer's device slots, {target: (A [Din, L, R], B [L, R, Dout])} (jpaged/lora/manager.py
fills them); `step.lora_index` says each token's slot. With `lora=None` (LoRA off) every function here
returns the base result untouched, so a model without adapters traces exactly as before. The fused
q/k/v and gate/up projections take the concatenation (gate/up: the interleaving) of their targets' deltas.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

import pallas_kernels
from models.kv_cache import StepInput
from pallas_kernels import Backend
from pallas_kernels.matmul_mgpu import interleave_gate_up, split_gate_up, swiglu


def delta(x: jax.Array, lora: dict, target: str, step: StepInput, backend: Backend) -> jax.Array:
    """[T, Dout]: every token's own adapter update of `target` for input x [T, Din]."""
    a, b = lora[target]
    return pallas_kernels.lora_delta(x, a, b, step.lora_index, backend=backend)


def add(y: jax.Array, x: jax.Array, lora: dict | None, targets: tuple[str, ...], step: StepInput,
        backend: Backend) -> jax.Array:
    """y + the deltas of `targets` (concatenated along y's columns, in order) for input x."""
    if lora is None:
        return y
    parts = [delta(x, lora, t, step, backend) for t in targets]
    return y + (parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1))


def gate_up_swiglu(x: jax.Array, w_gate_up: jax.Array, lora: dict, step: StepInput, backend: Backend) -> jax.Array:
    """silu(gate) * up for the fused, interleaved gate/up weight (`matmul_mgpu.interleave_gate_up`) plus the
    gate and up deltas. The update lands before the activation, so this is XLA's GEMM, not the SwiGLU kernel."""
    y = jnp.dot(x, w_gate_up)
    y = y + interleave_gate_up(delta(x, lora, "gate_proj", step, backend), delta(x, lora, "up_proj", step, backend))
    return swiglu(*split_gate_up(y))
