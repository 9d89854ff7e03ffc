"""One transfer each way per step: host pytrees of small arrays packed into two flat buffers.

A step's inputs (StepInput and SamplingTensors) are ~20 small arrays; sending each on its own, and
fetching the sampler's 5 outputs one by one, costs milliseconds of host time per step. `pack` flattens any pytree
of numpy arrays into one int32 and one float32 buffer plus a hashable layout (a static jit argument);
`unpack` rebuilds the pytree inside the jitted step. Outputs travel back as one int32 array.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_INT_KINDS = "biu"  # bool, signed and unsigned ints travel as int32


ALIGN = 64  # elements (256 bytes): XLA may hand a slice of a buffer to a kernel as a pointer into it,
            # and Mosaic GPU kernels reject operands that are not 256-byte aligned.


def pack(tree) -> tuple[np.ndarray, np.ndarray, tuple]:
    """(int32 buffer, float32 buffer, layout) for a pytree of numpy arrays (32-bit or bool).

    Each leaf starts at a multiple of ALIGN elements."""
    leaves, treedef = jax.tree.flatten(tree)
    parts = {"i": [], "f": []}
    sizes = {"i": 0, "f": 0}
    specs = []
    for leaf in leaves:
        leaf = np.asarray(leaf)
        if leaf.dtype.kind in _INT_KINDS:
            kind = "i"
            flat = leaf.view(np.int32).ravel() if leaf.dtype == np.uint32 else leaf.astype(np.int32, copy=False).ravel()
        else:
            kind = "f"
            flat = leaf.astype(np.float32, copy=False).ravel()
        specs.append((kind, sizes[kind], leaf.shape, leaf.dtype.str))
        pad = -flat.size % ALIGN
        parts[kind] += [flat, np.zeros(pad, flat.dtype)] if pad else [flat]
        sizes[kind] += flat.size + pad
    int_buf = np.concatenate(parts["i"]) if parts["i"] else np.zeros(0, np.int32)
    float_buf = np.concatenate(parts["f"]) if parts["f"] else np.zeros(0, np.float32)
    return int_buf, float_buf, (treedef, tuple(specs))


def unpack(int_buf: jax.Array, float_buf: jax.Array, layout: tuple):
    """The pytree `pack` flattened, inside jit (static slices of the two buffers)."""
    treedef, specs = layout
    leaves = []
    for kind, offset, shape, dtype_str in specs:
        size = int(np.prod(shape, dtype=np.int64))
        flat = (int_buf if kind == "i" else float_buf)[offset:offset + size].reshape(shape)
        dtype = np.dtype(dtype_str)
        if dtype == np.bool_:
            flat = flat != 0
        elif dtype == np.uint32:
            flat = jax.lax.bitcast_convert_type(flat, jnp.uint32)
        else:
            flat = flat.astype(dtype)
        leaves.append(flat)
    return jax.tree.unflatten(treedef, leaves)


def pack_outputs(tokens, logprobs, ranks, top_ids, top_logprobs) -> jax.Array:
    """[S, 3 + 2K] int32: tokens, ranks, logprobs (bits), top ids, top logprobs (bits)."""
    bits = lambda x: jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)  # noqa: E731
    return jnp.concatenate([tokens[:, None].astype(jnp.int32), ranks[:, None].astype(jnp.int32),
                            bits(logprobs)[:, None], top_ids.astype(jnp.int32), bits(top_logprobs)], axis=1)


def unpack_outputs(packed: np.ndarray) -> dict[str, np.ndarray]:
    k = (packed.shape[1] - 3) // 2
    return dict(tokens=packed[:, 0], ranks=packed[:, 1], logprobs=packed[:, 2].view(np.float32),
                top_ids=packed[:, 3:3 + k], top_logprobs=np.ascontiguousarray(packed[:, 3 + k:]).view(np.float32))
