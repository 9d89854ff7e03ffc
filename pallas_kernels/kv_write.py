"""KV write: put a step's new K/V rows into their cache slots, in place (the cache is donated).

Two implementations of one contract (real slots distinct, as the engine's are; -1 = padding, not written):
- `write_kv_reference`: an XLA scatter with distinct indices, in place under donation (Backend.kv_write="xla").
- `write_kv_pallas`: a Pallas kernel (Triton lowering on GPU, `interpret=True` on CPU). One program copies
  `block_tokens` whole rows (`Hkv * D` contiguous elements each) from k / v to their slots with masked
  vector stores; the pools are aliased to the outputs, so nothing else is read or written
  (Backend.kv_write="pallas"; its timing against the scatter: pallas_kernels/README.md "KV write").

With 8-bit pages (`pallas_kernels.kv_quant`) both also take the [N, page_size, Hkv] scale pools and
quantize each new (token, kv head) row as they write it: the scatter's update is the quantized row
(XLA fuses the quantization into it), and the kernel quantizes in registers between its load and its
store. Nothing else of the cache is read.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import kv_quant

BLOCK_TOKENS = 16   # rows per program: 16 x 1,024 bf16 (Hkv 8, D 128) = 32 KB of K and 32 KB of V
NUM_WARPS = 4


def write_kv_reference(
    k_pages: jax.Array,       # [num_pages, page_size, Hkv, D]
    v_pages: jax.Array,       # [num_pages, page_size, Hkv, D]
    k: jax.Array,             # [T, Hkv, D]
    v: jax.Array,             # [T, Hkv, D]
    slot_mapping: jax.Array,  # [T] int32, page * page_size + offset, distinct; -1 = padding (not written)
) -> tuple[jax.Array, jax.Array]:
    num_pages, page_size, num_kv_heads, head_dim = k_pages.shape
    num_slots = num_pages * page_size
    # -1 would wrap around; send each padding token to its own row past the pool, which the scatter drops.
    # Every index is then distinct, and telling XLA so lets it skip the scatter's collision handling.
    slots = jnp.where(slot_mapping < 0, num_slots + jnp.arange(slot_mapping.shape[0], dtype=slot_mapping.dtype),
                      slot_mapping)

    def write(pages, new):
        flat = pages.reshape(num_slots, num_kv_heads, head_dim)
        flat = flat.at[slots].set(new.astype(pages.dtype), mode="drop", unique_indices=True)
        return flat.reshape(pages.shape)

    return write(k_pages, k), write(v_pages, v)


def write_kv_quantized_reference(k_pages, v_pages, k_scale, v_scale, k, v, slot_mapping):
    """`write_kv_reference` into 8-bit pages: k, v [T, Hkv, D] quantized per (token, kv head); returns
    (k_pages, v_pages, k_scale, v_scale), the scales [N, page_size, Hkv] float32."""
    _check_scales(k_pages, v_pages, k_scale, v_scale)
    kq, ks = kv_quant.quantize(k, k_pages.dtype)
    vq, vs = kv_quant.quantize(v, v_pages.dtype)
    k_pages, v_pages = write_kv_reference(k_pages, v_pages, kq, vq, slot_mapping)
    # The scales as one more [N, page_size, Hkv, 1] pool through the same scatter.
    k_scale, v_scale = write_kv_reference(k_scale[..., None], v_scale[..., None], ks[..., None], vs[..., None],
                                          slot_mapping)
    return k_pages, v_pages, k_scale[..., 0], v_scale[..., 0]


def _check_scales(k_pages, v_pages, k_scale, v_scale) -> None:
    if not kv_quant.is_quantized(k_pages.dtype):
        raise ValueError(f"scales come with 8-bit pages {[str(d) for d in kv_quant.QUANTIZED_DTYPES]}, got "
                         f"k_pages of {k_pages.dtype}")
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is None or scale.shape != k_pages.shape[:3] or scale.dtype != kv_quant.SCALE_DTYPE:
            raise ValueError(f"{name} must be float32 {k_pages.shape[:3]} (the pages' [N, page_size, Hkv]), "
                             f"got {None if scale is None else (scale.shape, scale.dtype)}")


def _kernel(slot_ref, k_ref, v_ref, k_pages_in, v_pages_in, k_pages_ref, v_pages_ref, *,
            num_tokens: int, num_slots: int, block_tokens: int, width: int, width_p: int):
    del k_pages_in, v_pages_in  # aliased to k_pages_ref / v_pages_ref
    t = pl.program_id(0) * block_tokens + lax.iota(jnp.int32, block_tokens)               # [BT]
    slots = pltriton.load(slot_ref.at[t], mask=t < num_tokens, other=-1)                   # [BT]
    cols = lax.iota(jnp.int32, width_p)[None, :]                       # [1, Wp]: Triton tiles are powers of 2
    write = (slots >= 0)[:, None] & (cols < width)                                         # [BT, Wp]
    src = (jnp.minimum(t, num_tokens - 1)[:, None], cols)
    # Skipped rows point past the pool: the GPU never touches a masked element, and Pallas' interpreter
    # (a read-select-scatter) drops out-of-bounds updates, where an in-bounds stand-in such as row 0 would
    # write the old value back over a real token's row.
    dst = (jnp.where(slots >= 0, slots, num_slots)[:, None], cols)
    for new_ref, pages_ref in ((k_ref, k_pages_ref), (v_ref, v_pages_ref)):
        new = pltriton.load(new_ref.at[src], mask=write, other=0)                          # [BT, Wp]
        pltriton.store(pages_ref.at[dst], new.astype(pages_ref.dtype), mask=write)


def write_kv_pallas(k_pages, v_pages, k, v, slot_mapping, *, block_tokens: int = BLOCK_TOKENS,
                    interpret: bool = False):
    """`write_kv_reference`'s contract as one Pallas kernel; donate the pages for an in-place write.

    The pools are viewed as [num_pages * page_size, Hkv * D] and the new rows as [T, Hkv * D] (bitcast
    reshapes): each token is one contiguous row, moved with vector loads and stores. Slots must be
    distinct (the engine's are); -1 marks padding, which is neither read nor written.
    """
    num_pages, page_size, num_kv_heads, head_dim = k_pages.shape
    num_tokens = k.shape[0]
    if k.shape != (num_tokens, num_kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(f"k and v must be [T, Hkv={num_kv_heads}, D={head_dim}], got {k.shape} and {v.shape}")
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"v_pages must match k_pages {k_pages.shape}, got {v_pages.shape}")
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping must be [T={num_tokens}], got {slot_mapping.shape}")
    if num_tokens == 0:
        return k_pages, v_pages
    width = num_kv_heads * head_dim
    flat = (num_pages * page_size, width)
    kernel = functools.partial(_kernel, num_tokens=num_tokens, num_slots=flat[0], block_tokens=block_tokens,
                               width=width,
                               width_p=1 << (width - 1).bit_length())
    new_k, new_v = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(num_tokens, block_tokens),),
        out_shape=(jax.ShapeDtypeStruct(flat, k_pages.dtype), jax.ShapeDtypeStruct(flat, v_pages.dtype)),
        input_output_aliases={3: 0, 4: 1},
        compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
        interpret=interpret,
        name="jpaged_kv_write",
    )(slot_mapping.astype(jnp.int32), k.reshape(num_tokens, width), v.reshape(num_tokens, width),
      k_pages.reshape(flat), v_pages.reshape(flat))
    return new_k.reshape(k_pages.shape), new_v.reshape(v_pages.shape)


def _quantized_kernel(slot_ref, k_ref, v_ref, k_pages_in, v_pages_in, k_scale_in, v_scale_in,
                      k_pages_ref, v_pages_ref, k_scale_ref, v_scale_ref, *, num_tokens: int,
                      num_slots: int, block_tokens: int):
    """One program: `block_tokens` tokens x one kv head, quantized (one scale per row) and stored."""
    del k_pages_in, v_pages_in, k_scale_in, v_scale_in  # aliased to the outputs
    h = pl.program_id(1)
    head_dim = k_ref.shape[2]
    t = pl.program_id(0) * block_tokens + lax.iota(jnp.int32, block_tokens)               # [BT]
    slots = pltriton.load(slot_ref.at[t], mask=t < num_tokens, other=-1)                   # [BT]
    write = slots >= 0
    write2 = jnp.broadcast_to(write[:, None], (block_tokens, head_dim))
    cols = lax.iota(jnp.int32, head_dim)[None, :]
    src = (jnp.minimum(t, num_tokens - 1)[:, None], h, cols)
    dst_row = jnp.where(write, slots, num_slots)           # skipped rows point past the pool (see _kernel)
    for new_ref, pages_ref, scale_ref in ((k_ref, k_pages_ref, k_scale_ref), (v_ref, v_pages_ref, v_scale_ref)):
        new = pltriton.load(new_ref.at[src], mask=write2, other=0)                         # [BT, D]
        values, scale = kv_quant.quantize(new, pages_ref.dtype)
        pltriton.store(pages_ref.at[(dst_row[:, None], h, cols)], values, mask=write2)
        pltriton.store(scale_ref.at[dst_row, h], scale, mask=write)


def write_kv_quantized_pallas(k_pages, v_pages, k_scale, v_scale, k, v, slot_mapping, *,
                              block_tokens: int = BLOCK_TOKENS, interpret: bool = False):
    """`write_kv_quantized_reference`'s contract as one Pallas kernel (a program per token block x kv
    head); donate the pages and scales for an in-place write."""
    _check_scales(k_pages, v_pages, k_scale, v_scale)
    num_pages, page_size, num_kv_heads, head_dim = k_pages.shape
    num_tokens = k.shape[0]
    if k.shape != (num_tokens, num_kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(f"k and v must be [T, Hkv={num_kv_heads}, D={head_dim}], got {k.shape} and {v.shape}")
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping must be [T={num_tokens}], got {slot_mapping.shape}")
    if num_tokens == 0:
        return k_pages, v_pages, k_scale, v_scale
    rows = num_pages * page_size
    flat, flat_scale = (rows, num_kv_heads, head_dim), (rows, num_kv_heads)
    kernel = functools.partial(_quantized_kernel, num_tokens=num_tokens, num_slots=rows,
                               block_tokens=block_tokens)
    outs = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(num_tokens, block_tokens), num_kv_heads),
        out_shape=(jax.ShapeDtypeStruct(flat, k_pages.dtype), jax.ShapeDtypeStruct(flat, v_pages.dtype),
                   jax.ShapeDtypeStruct(flat_scale, k_scale.dtype),
                   jax.ShapeDtypeStruct(flat_scale, v_scale.dtype)),
        input_output_aliases={3: 0, 4: 1, 5: 2, 6: 3},
        compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
        interpret=interpret,
        name="jpaged_kv_write_quantized",
    )(slot_mapping.astype(jnp.int32), k, v, k_pages.reshape(flat), v_pages.reshape(flat),
      k_scale.reshape(flat_scale), v_scale.reshape(flat_scale))
    new_k, new_v, new_ks, new_vs = outs
    return (new_k.reshape(k_pages.shape), new_v.reshape(v_pages.shape), new_ks.reshape(k_scale.shape),
            new_vs.reshape(v_scale.shape))
