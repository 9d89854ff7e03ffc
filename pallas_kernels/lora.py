"""The batched LoRA matmul: each token adds its own adapter's low-rank update, y[t] = (x[t] @ A[i]) @ B[i]
with i = lora_index[t] (-1: none, y[t] = 0), for adapters stacked in device slots.

Layout (jpaged/lora/manager.py writes it): a: [Din, L, R], b: [L, R, Dout] for L slots of rank R (smaller
ranks zero-padded, B already scaled). Two implementations, chosen by `Backend.lora`:
- "masked": x @ A over all L slots as one [Din, L * R] GEMM, each token's other slots zeroed, then one
  [L * R, Dout] GEMM. Dense and gather-free: it costs L * R columns of FLOPs per token (a narrow
  projection for L * R in the low hundreds) and reads every slot's weights once per step.
- "ragged": tokens sorted by slot and `jax.lax.ragged_dot` over the groups: R columns per token, a
  sort and an unsort of the rows.
`lora_delta_reference` is the plain per-token gather, the meaning both must match.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("masked", "ragged")


def _check(x, a, b, lora_index):
    if x.ndim != 2 or a.ndim != 3 or b.ndim != 3:
        raise ValueError(f"lora_delta: x must be [T, Din], a [Din, L, R], b [L, R, Dout]; got x {x.shape}, "
                         f"a {a.shape}, b {b.shape}")
    if a.shape[0] != x.shape[1] or b.shape[:2] != a.shape[1:]:
        raise ValueError(f"lora_delta: shapes do not chain: x {x.shape}, a {a.shape}, b {b.shape}")
    if lora_index.shape != x.shape[:1]:
        raise ValueError(f"lora_delta: lora_index must be [T] = [{x.shape[0]}], got {lora_index.shape}")


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, lora_index: jax.Array, *, impl: str = "masked"
               ) -> jax.Array:
    """[T, Dout] in x's dtype (float32 accumulation): x [T, Din], a [Din, L, R], b [L, R, Dout],
    lora_index [T] int32 in [-1, L)."""
    _check(x, a, b, lora_index)
    if impl == "masked":
        return _masked(x, a, b, lora_index)
    if impl == "ragged":
        return _ragged(x, a, b, lora_index)
    raise ValueError(f"lora_delta: impl must be one of {IMPLEMENTATIONS}, got {impl!r}")


def _masked(x, a, b, lora_index):
    (din, num_slots, rank), t = a.shape, x.shape[0]
    shrunk = jnp.dot(x, a.reshape(din, num_slots * rank), preferred_element_type=jnp.float32)  # [T, L*R]
    own = lora_index[:, None] == jnp.arange(num_slots, dtype=lora_index.dtype)[None, :]           # [T, L]
    shrunk = jnp.where(own[:, :, None], shrunk.reshape(t, num_slots, rank), 0).astype(x.dtype)
    y = jnp.dot(shrunk.reshape(t, num_slots * rank), b.reshape(num_slots * rank, -1),
                preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def _ragged(x, a, b, lora_index):
    num_slots = a.shape[1]
    group = jnp.where(lora_index < 0, num_slots, lora_index)  # base tokens sort last, outside every group
    order = jnp.argsort(group, stable=True)                    # [T]
    sizes = jnp.bincount(group, length=num_slots + 1)[:num_slots].astype(jnp.int32)
    xs = x[order]
    shrink_dims = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(([1], [0]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[1])
    shrunk = jax.lax.ragged_dot_general(xs, a, sizes, shrink_dims, preferred_element_type=jnp.float32)
    y = jax.lax.ragged_dot(shrunk.astype(x.dtype), b, sizes, preferred_element_type=jnp.float32)  # 0 past the groups
    return jnp.zeros_like(y).at[order].set(y, unique_indices=True).astype(x.dtype)


def lora_delta_reference(x, a, b, lora_index):
    """The per-token gather: y[t] = x[t] @ a[:, i] @ b[i] for i = lora_index[t] >= 0, else 0."""
    _check(x, a, b, lora_index)
    i = jnp.maximum(lora_index, 0)
    shrunk = jnp.einsum("ti,tir->tr", x.astype(jnp.float32), jnp.moveaxis(a, 1, 0)[i].astype(jnp.float32))
    y = jnp.einsum("tr,tro->to", shrunk, b[i].astype(jnp.float32))
    return jnp.where(lora_index[:, None] >= 0, y, 0).astype(x.dtype)
