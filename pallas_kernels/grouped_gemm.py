"""Grouped GEMM: rows of `x` sorted by group, each group multiplied by its own weight (the MoE experts).

`y[r] = x[r] @ w[g]` for the rows r of group g, groups laid out one after another (`group_sizes` rows
each, in order); rows past the last group are zero. Two implementations of that contract:

- `grouped_gemm_reference`: `jax.lax.ragged_dot` (XLA), Backend.grouped_gemm "xla".
- `grouped_gemm_pallas`: a Pallas kernel (Triton lowering on GPU, `interpret=True` on CPU),
  Backend.grouped_gemm "pallas". A work list of (group, row block) tiles covers every group's rows; a
  block that two groups share is computed once per group with the other group's rows masked off the
  store, so a tile only ever reads its own expert's weights. Empty groups cost nothing.

`epilogue="swiglu"` takes a weight whose gate and up columns alternate in groups
(`matmul_mgpu.interleave_gate_up`) and returns `silu(gate) * up` ([M, N / 2]); the Pallas kernel
computes it in registers from one gate and one up tile.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import matmul_mgpu

EPILOGUES = ("none", "swiglu")


def _check(x, w, group_sizes, epilogue):
    if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x must be [M, K] and w [G, K, N] with the same K, got {x.shape} and {w.shape}")
    if group_sizes.shape != (w.shape[0],):
        raise ValueError(f"group_sizes must be [G={w.shape[0]}], got {group_sizes.shape}")
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")


def grouped_gemm_reference(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, epilogue: str = "none",
                           precision=None) -> jax.Array:
    """[M, N] (or [M, N / 2] with epilogue="swiglu") in x's dtype, accumulated in float32."""
    _check(x, w, group_sizes, epilogue)
    y = lax.ragged_dot(x, w, group_sizes.astype(jnp.int32), precision=precision,
                       preferred_element_type=jnp.float32)
    if epilogue == "swiglu":
        y = matmul_mgpu.swiglu(*matmul_mgpu.split_gate_up(y))
    return y.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class GroupedGemmConfig:
    """Static launch shape: `block_m` rows x `block_n` output columns per program, `block_k` per K step."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"GroupedGemmConfig.{name} must be a power of two, got {value}")
        if self.block_m < 16:
            raise ValueError(f"GroupedGemmConfig.block_m must be >= 16 (Triton's smallest dot), got {self.block_m}")


def choose_config(num_rows: int, num_groups: int, epilogue: str = "none") -> GroupedGemmConfig:
    """Row blocks sized to the rows a group gets on average (16 for decode, up to 128 for prefill);
    swiglu tiles are 64 columns of gate and 64 of up."""
    per_group = max(1, num_rows // max(num_groups, 1))
    block_m = min(128, max(16, 1 << (per_group - 1).bit_length()))
    wide = block_m >= 64 and epilogue == "none"
    return GroupedGemmConfig(block_m=block_m, block_n=128 if wide else 64)


def unsupported_reason(x, w, *, epilogue: str = "none", config: GroupedGemmConfig | None = None) -> str | None:
    """Why the Pallas kernel cannot take these shapes (None when it can)."""
    config = config or choose_config(x.shape[0], w.shape[0], epilogue)
    k, n = w.shape[1], w.shape[2]
    if k % config.block_k:
        return f"K ({k}) must be a multiple of block_k ({config.block_k})"
    if epilogue == "swiglu":
        group = matmul_mgpu.gate_up_group(n // 2)
        if n % 2 or (n // 2) % group or group % config.block_n:
            return (f"swiglu needs gate/up groups of a multiple of block_n ({config.block_n}) columns, got "
                    f"N={n} (groups of {group})")
    elif n % config.block_n:
        return f"N ({n}) must be a multiple of block_n ({config.block_n})"
    return None


def tile_work_list(group_sizes: jax.Array, num_rows: int, block_m: int) -> tuple[jax.Array, jax.Array]:
    """(tile_group[W], tile_block[W]): each non-empty group's row blocks, in order; -1 pads the list.

    W = cdiv(num_rows, block_m) + G - 1 bounds the tiles: a group adds at most one block it shares."""
    num_groups = group_sizes.shape[0]
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    first = starts // block_m
    tiles = jnp.where(group_sizes > 0, (ends - 1) // block_m - first + 1, 0)
    tile_ends = jnp.cumsum(tiles)
    item = jnp.arange(pl.cdiv(num_rows, block_m) + num_groups - 1, dtype=jnp.int32)
    group = jnp.searchsorted(tile_ends, item, side="right", method="compare_all").astype(jnp.int32)
    valid = item < tile_ends[-1]
    group = jnp.minimum(group, num_groups - 1)
    block = first[group] + item - (tile_ends[group] - tiles[group])
    return jnp.where(valid, group, -1), jnp.where(valid, block, 0).astype(jnp.int32)


def _dot(a, b, exact: bool):
    precision = lax.Precision.HIGHEST if exact else None
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def _kernel(tile_group_ref, tile_block_ref, starts_ref, ends_ref, x_ref, w_ref, o_ref, *,
            config: GroupedGemmConfig, num_k: int, swiglu: bool, gate_up_group: int, exact: bool):
    item, j = pl.program_id(0), pl.program_id(1)
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    group = tile_group_ref[item]
    valid = group >= 0
    g = jnp.maximum(group, 0)
    row0 = pl.multiple_of(tile_block_ref[item] * bm, bm)
    rows = row0 + lax.iota(jnp.int32, bm)
    keep = valid & (rows >= starts_ref[g]) & (rows < ends_ref[g])                  # [BM]
    # swiglu: output columns j*bn.. are columns of gate group c // G, whose up group follows it.
    c = j * bn
    col0 = (c // gate_up_group) * 2 * gate_up_group + c % gate_up_group if swiglu else c

    def body(step, accs):
        k0 = pl.multiple_of(step * bk, bk)
        x = x_ref[pl.ds(row0, bm), pl.ds(k0, bk)]                                  # [BM, BK]
        first = _dot(x, w_ref[g, pl.ds(k0, bk), pl.ds(col0, bn)], exact)
        if not swiglu:
            return (accs[0] + first,)
        up = _dot(x, w_ref[g, pl.ds(k0, bk), pl.ds(col0 + gate_up_group, bn)], exact)
        return accs[0] + first, accs[1] + up

    init = tuple(jnp.zeros((bm, bn), jnp.float32) for _ in range(2 if swiglu else 1))
    accs = lax.fori_loop(0, jnp.where(valid, num_k, 0), body, init)
    out = accs[0] * jax.nn.sigmoid(accs[0]) * accs[1] if swiglu else accs[0]
    mask = jnp.broadcast_to(keep[:, None], (bm, bn))
    pltriton.store(o_ref.at[pl.ds(row0, bm), pl.ds(j * bn, bn)], out.astype(o_ref.dtype), mask=mask)


def grouped_gemm_pallas(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, epilogue: str = "none",
                        config: GroupedGemmConfig | None = None, interpret: bool = False) -> jax.Array:
    """`grouped_gemm_reference`'s contract as one Pallas kernel; ValueError on shapes it cannot take
    (`unsupported_reason`)."""
    _check(x, w, group_sizes, epilogue)
    m, k = x.shape
    num_groups, _, n = w.shape
    config = config or choose_config(m, num_groups, epilogue)
    reason = unsupported_reason(x, w, epilogue=epilogue, config=config)
    if reason is not None:
        raise ValueError(f"grouped_gemm_pallas: {reason}")
    swiglu = epilogue == "swiglu"
    n_out = n // 2 if swiglu else n
    group_sizes = group_sizes.astype(jnp.int32)
    m_pad = pl.cdiv(m, config.block_m) * config.block_m          # whole row blocks: loads stay in bounds
    x_p = jnp.pad(x, ((0, m_pad - m), (0, 0))) if m_pad != m else x
    tile_group, tile_block = tile_work_list(group_sizes, m_pad, config.block_m)
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    exact = x.dtype == jnp.float32
    kernel = functools.partial(_kernel, config=config, num_k=k // config.block_k, swiglu=swiglu,
                               gate_up_group=matmul_mgpu.gate_up_group(n // 2) if swiglu else n, exact=exact)
    out = pl.pallas_call(
        kernel,
        grid=(tile_group.shape[0], n_out // config.block_n),
        out_shape=jax.ShapeDtypeStruct((m_pad, n_out), x.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="jpaged_grouped_gemm",
    )(tile_group, tile_block, starts, ends, x_p, w)
    # Rows no tile stores (past the last group) hold whatever the buffer held: zero them.
    return jnp.where((jnp.arange(m) < ends[-1])[:, None], out[:m], jnp.zeros((), out.dtype))


__all__ = ["EPILOGUES", "GroupedGemmConfig", "choose_config", "grouped_gemm_pallas", "grouped_gemm_reference",
           "tile_work_list", "unsupported_reason"]
