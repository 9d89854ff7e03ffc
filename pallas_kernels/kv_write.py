"""KV write: put a step's new K/V rows into their cache slots, in place (the cache is donated)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def write_kv_reference(
    k_pages: jax.Array,       # [num_pages, page_size, Hkv, D]
    v_pages: jax.Array,       # [num_pages, page_size, Hkv, D]
    k: jax.Array,             # [T, Hkv, D]
    v: jax.Array,             # [T, Hkv, D]
    slot_mapping: jax.Array,  # [T] int32, page * page_size + offset; -1 = padding (not written)
) -> tuple[jax.Array, jax.Array]:
    num_pages, page_size, num_kv_heads, head_dim = k_pages.shape
    num_slots = num_pages * page_size
    # -1 would wrap around; send padding out of bounds and let the scatter drop it.
    slots = jnp.where(slot_mapping < 0, num_slots, slot_mapping)

    def write(pages, new):
        flat = pages.reshape(num_slots, num_kv_heads, head_dim)
        flat = flat.at[slots].set(new.astype(pages.dtype), mode="drop")
        return flat.reshape(pages.shape)

    return write(k_pages, k), write(v_pages, v)
