"""What the Mosaic GPU kernels (attention: `ragged_paged_attention_mgpu.py`, GEMM: `matmul_mgpu.py`) share.

- Constants of Hopper and of the tiles: wgmma M, the 8-row TMA alignment, SMEM per CTA, the finite mask.
- The jax 0.10.2 (CPU) / 0.11.2 (device) shim. Both versions lower the kernels with Lane semantics
  (0.11 defaults to Warpgroup, whose layout inference rejects them), so the semantics are pinned. The
  interpreter is public only in 0.11; its 0.10 version lacks run_state, transposed wgmma operands and
  layout_cast, which `interpret=True` works around.
- In-kernel helpers that differ between the device and the interpreter: WGMMA-layout iotas, layout casts,
  the softmax state, and zeroing stale V rows in SMEM before P.V.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

# TMA into (8, 64)-tiled SMEM: GMEM row offsets must be multiples of ROW_ALIGN (defined with the page
# format checks in the semantics module).
from pallas_kernels.ragged_paged_attention import ROW_ALIGN

ROWS = 64                 # wgmma M per compute warpgroup
SMEM_BYTES = 227 * 1024   # per CTA (sm_90)
MASK_VALUE = -1e30        # finite: exp2(MASK_VALUE - m) == 0 for any real row max m
LOG2E = math.log2(math.e)
LOWERINGS = {"lane": "Lane", "warpgroup": "Warpgroup"}


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


# --- compatibility shim ------------------------------------------------------------------------------

def check_lowering(lowering: str | None) -> None:
    if lowering is not None and lowering not in LOWERINGS:
        raise ValueError(f"lowering must be one of {tuple(LOWERINGS)} or None, got {lowering!r}")


def interpret_params():
    params = getattr(plgpu, "InterpretGPUParams", None)
    if params is None:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params
    return params()


def compiler_params(lowering: str | None):
    """`lowering`: "lane", "warpgroup" or None (jax's default)."""
    kwargs = dict(approx_math=True)
    if lowering is not None:
        kwargs["lowering_semantics"] = getattr(plgpu.LoweringSemantics, LOWERINGS[lowering])
    return plgpu.CompilerParams(**kwargs)


def tiled_smem(shape, dtype):
    """An SMEM buffer in the (8, 128-byte) tiled, 128-byte swizzled layout that TMA and wgmma want."""
    swizzle = 128
    tile = swizzle // jnp.dtype(dtype).itemsize
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((ROW_ALIGN, tile)),
                                                plgpu.SwizzleTransform(swizzle)))


# --- in-kernel helpers (a compute warpgroup's 64-row tile) -------------------------------------------

def layout_cast(x, layout, interpret: bool):
    # jax 0.10's interpreter has no rule for layout_cast (0.11's treats it as the identity).
    return x if interpret else plgpu.layout_cast(x, layout)


def wgmma_iota(shape, dim: int, interpret: bool):
    if interpret:
        return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def wgmma_row_iota(interpret: bool):
    if interpret:
        return lax.iota(jnp.int32, ROWS)
    return plgpu.broadcasted_iota(jnp.int32, (ROWS,), 0, layout=plgpu.Layout.WGMMA.reduce(1))


def softmax_state(head_dim: int, interpret: bool):
    """(acc [ROWS, D], row max [ROWS], row sum [ROWS]) in the WGMMA layout, ready for the first block."""
    acc = layout_cast(jnp.zeros((ROWS, head_dim), jnp.float32), plgpu.Layout.WGMMA, interpret)
    m_i = layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1), interpret)
    l_i = layout_cast(jnp.zeros((ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1), interpret)
    return acc, m_i, l_i


def zero_stale_v(v_smem, slot, block, kv_end, *, block_kv: int, interpret: bool) -> None:
    """Zero the V rows of kv block `block` (in SMEM slot `slot`) at positions >= kv_end: the slots after
    the last token in its page may hold NaN, and 0 * NaN = NaN in P.V."""
    for r0 in range(0, block_kv, ROWS):
        first_pos = block * block_kv + r0

        @pl.when(first_pos + ROWS > kv_end)
        def _zero_rows():
            rows = v_smem.at[slot, pl.ds(r0, ROWS)]
            v = rows[...]                                 # WGMMA layout (tiled ref)
            keep = lax.broadcast_in_dim(first_pos + wgmma_row_iota(interpret) < kv_end, v.shape, [0])
            rows[...] = jnp.where(keep, v, jnp.zeros_like(v))
    plgpu.commit_smem()



def accumulate_pv(acc, p16, v_smem, slot, v_free, wait_next_k, *, interpret: bool):
    """acc + P.V over the V tile in SMEM slot `slot` (wgmma on the device), waiting for the next K block
    (`wait_next_k`) while the wgmma runs; then releases the slot to the memory warpgroup."""
    def pv(acc_ref):
        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
        wait_next_k()

    if interpret:  # the interpreter has no run_state
        acc = acc + lax.dot(p16, v_smem[slot], preferred_element_type=jnp.float32)
        wait_next_k()
    else:
        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
    plgpu.barrier_arrive(v_free.at[slot])
    return acc
