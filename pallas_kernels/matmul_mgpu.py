"""A Hopper GEMM for the MLP (Mosaic GPU: TMA into swizzled SMEM, wgmma, a memory warpgroup feeding two
compute warpgroups), whose SwiGLU epilogue writes silu(gate) * up straight from the accumulator.

Why: XLA runs x @ [gate | up] as cuBLAS, writes the [T, 2F] product, and a separate fusion reads it
back for silu(gate) * up. Here a CTA
computes a [256, 128] tile whose columns are 64 of gate and the same 64 of up (`interleave_gate_up`), so
the epilogue has both in registers and writes the [256, 64] tile of h = silu(gate) * up: the product
never reaches HBM. Numbers and the versions measured: pallas_kernels/README.md "GEMMs".

Layout. x [M, K] and w [K, N] row-major, bf16; the accumulator is float32. Tile (i, j) is rows
[256 i, 256 i + 256) and columns [128 j, 128 j + 128) of x @ w; compute warpgroup g takes its rows
[128 g, 128 g + 128). Tiles are numbered with i fastest. The CTAs are persistent, one per SM: CTA c
takes tiles c, c + num_ctas, ..., so the CTAs resident at once share their w tiles in L2, and its
memory warpgroup streams all their K steps ([256, 64] of x, [64, 128] of w) through `num_stages` SMEM
slots as one sequence, loading the next tile while the compute warpgroups run this one's epilogue.

The reference beside it is `matmul_reference` (plain jnp, the same interleaved layout). On the CPU the
kernel runs in Mosaic GPU's interpreter (`interpret=True`), where the wgmma is a `lax.dot` on the same
SMEM tiles (jax 0.10's interpreter has no run_state); on the GPU `bench/matmul_mgpu.py` checks it
against the reference.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mgpu_common import (SMEM_BYTES, check_lowering, compiler_params, interpret_params, layout_cast,
                                        tiled_smem)

TILE_M = 128                      # rows of one compute warpgroup (two wgmma M = 64 row blocks)
TILE_N = 128                      # accumulator columns of a CTA
TILE_K = 64                       # one 128-byte swizzled row of bf16
NUM_COMPUTE_WGS = 2
CTA_M = NUM_COMPUTE_WGS * TILE_M  # rows of a CTA
GATE_UP_GROUP = TILE_N // 2       # gate and up columns alternate in groups of this many (SwiGLU)
EPILOGUES = ("none", "swiglu")


@dataclasses.dataclass(frozen=True)
class MatmulConfig:
    num_stages: int | None = None    # SMEM slots of (x tile, w tile), 48 KiB each; None: as many as fit, <= 4
    max_ctas: int | None = None      # persistent CTAs; None: one per SM (one tile per CTA if there are more)
    lowering: str | None = "lane"

    def __post_init__(self):
        if self.num_stages is not None and self.num_stages < 2:
            raise ValueError(f"num_stages must be >= 2, got {self.num_stages}")
        if self.max_ctas is not None and self.max_ctas < 1:
            raise ValueError(f"max_ctas must be >= 1, got {self.max_ctas}")
        check_lowering(self.lowering)


# --- the gate/up layout ------------------------------------------------------------------------------

def gate_up_group(intermediate_size: int) -> int:
    """Columns per gate (or up) group of the fused weight: GATE_UP_GROUP where it divides F, else F (the
    plain [gate | up] concatenation)."""
    return GATE_UP_GROUP if intermediate_size % GATE_UP_GROUP == 0 else intermediate_size


def interleave_gate_up(gate: jax.Array, up: jax.Array) -> jax.Array:
    """[..., F] gate and up (weights [K, F] or biases [F]) -> [..., 2F] with groups of `gate_up_group(F)`
    columns alternating: gate 0, up 0, gate 1, up 1, ..."""
    *lead, f = gate.shape
    g = gate_up_group(f)
    stacked = jnp.stack([gate.reshape(*lead, f // g, g), up.reshape(*lead, f // g, g)], axis=-2)
    return stacked.reshape(*lead, 2 * f)


def split_gate_up(y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inverse of `interleave_gate_up` on the last axis: [..., 2F] -> (gate [..., F], up [..., F])."""
    *lead, two_f = y.shape
    f = two_f // 2
    g = gate_up_group(f)
    grouped = y.reshape(*lead, f // g, 2, g)
    return grouped[..., 0, :].reshape(*lead, f), grouped[..., 1, :].reshape(*lead, f)


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    return jax.nn.silu(gate) * up


def matmul_reference(x: jax.Array, w: jax.Array, *, epilogue: str = "none") -> jax.Array:
    """x @ w, or for "swiglu" silu(gate) * up of x @ w with w's columns as `interleave_gate_up` lays them
    out. float32 accumulation, the result in x's dtype."""
    _check_epilogue(epilogue)
    y = jnp.dot(x, w, preferred_element_type=jnp.float32)
    if epilogue == "swiglu":
        y = swiglu(*split_gate_up(y))
    return y.astype(x.dtype)


# --- the kernel --------------------------------------------------------------------------------------

def _check_epilogue(epilogue: str) -> None:
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")


MAX_STAGES = 4
DEFAULT_NUM_SMS = 132                                  # an sm_90 SXM part, when the device does not say


def out_tiles(epilogue: str) -> int:
    """[TILE_M, TILE_K] output tiles per compute warpgroup and CTA tile."""
    return 1 if epilogue == "swiglu" else TILE_N // TILE_K


def smem_bytes(itemsize: int, num_stages: int, epilogue: str) -> int:
    stages = num_stages * (CTA_M * TILE_K + TILE_K * TILE_N) * itemsize
    out = NUM_COMPUTE_WGS * out_tiles(epilogue) * TILE_M * TILE_K * itemsize
    return stages + out + 8 * 2 * num_stages + 1024


def num_stages_for(itemsize: int, epilogue: str, config: MatmulConfig) -> int:
    if config.num_stages is not None:
        return config.num_stages
    fits = [s for s in range(2, MAX_STAGES + 1) if smem_bytes(itemsize, s, epilogue) <= SMEM_BYTES]
    return fits[-1] if fits else 2


def num_ctas_for(num_tiles: int, config: MatmulConfig) -> int:
    if config.max_ctas is not None:
        return min(config.max_ctas, num_tiles)
    cores = getattr(jax.devices()[0], "core_count", None) or DEFAULT_NUM_SMS
    return min(cores, num_tiles)


def unsupported_reason(x, w, *, epilogue: str = "none", config: MatmulConfig | None = None) -> str | None:
    """Why the kernel cannot take these operands (None: it can)."""
    config = config or MatmulConfig()
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        return f"x must be [M, K] and w [K, N], got {x.shape} and {w.shape}"
    (m, k), n = x.shape, w.shape[1]
    if x.dtype not in (jnp.bfloat16, jnp.float16) or w.dtype != x.dtype:
        return f"dtype must be bf16 or f16 for x and w alike, got {x.dtype} and {w.dtype}"
    if m % CTA_M or k % TILE_K or n % TILE_N:
        return f"M, K, N must be multiples of {CTA_M}, {TILE_K}, {TILE_N}, got {m}, {k}, {n}"
    if epilogue == "swiglu" and gate_up_group(n // 2) != GATE_UP_GROUP:
        return f"swiglu needs N / 2 to be a multiple of {GATE_UP_GROUP}, got N = {n}"
    itemsize = jnp.dtype(x.dtype).itemsize
    stages = num_stages_for(itemsize, epilogue, config)
    if (smem := smem_bytes(itemsize, stages, epilogue)) > SMEM_BYTES:
        return f"{stages} stages need {smem} bytes of SMEM, more than {SMEM_BYTES}"
    return None


def _kernel(x_ref, w_ref, o_ref, x_smem, w_smem, o_smem, full, free, *, m_tiles: int, num_tiles: int,
            num_ctas: int, k_steps: int, num_stages: int, epilogue: str, interpret: bool):
    """A persistent CTA: tiles cta, cta + num_ctas, ... The memory warpgroup streams their K steps as one
    sequence (step s of the CTA in slot s % num_stages), so it loads the next tile while the compute
    warpgroups run the epilogue of this one."""
    cta = lax.axis_index("cta")
    wg = lax.axis_index("wg")
    my_tiles = (num_tiles - cta + num_ctas - 1) // num_ctas

    def tile_origin(i):
        tile = cta + i * num_ctas
        return lax.rem(tile, m_tiles) * CTA_M, tile // m_tiles     # (first row, column tile)

    @pl.when(wg < NUM_COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        rows = pl.ds(wg * TILE_M, TILE_M)

        def release(s):
            plgpu.barrier_arrive(free.at[lax.rem(s, num_stages)])

        def tile_product(s0):
            """acc [TILE_M, TILE_N] f32 of this warpgroup's rows over K steps s0 .. s0 + k_steps."""
            if interpret:  # jax 0.10's interpreter has no run_state: the same SMEM tiles through lax.dot
                def step(s, acc):
                    slot = lax.rem(s, num_stages)
                    plgpu.barrier_wait(full.at[slot])
                    acc = acc + lax.dot(x_smem[slot, rows], w_smem[slot], preferred_element_type=jnp.float32)
                    release(s)
                    return acc

                return lax.fori_loop(s0, s0 + k_steps, step, jnp.zeros((TILE_M, TILE_N), jnp.float32))

            def mainloop(acc_ref):
                def step(s, _):
                    slot = lax.rem(s, num_stages)
                    plgpu.barrier_wait(full.at[slot])
                    plgpu.wgmma(acc_ref, x_smem.at[slot, rows], w_smem.at[slot])
                    plgpu.wgmma_wait(1)       # step s - 1's wgmma is done: its slot may be refilled
                    pl.when(s > s0)(lambda: release(s - 1))

                lax.fori_loop(s0, s0 + k_steps, step, None)
                plgpu.wgmma_wait(0)
                release(s0 + k_steps - 1)

            zeros = layout_cast(jnp.zeros((TILE_M, TILE_N), jnp.float32), plgpu.Layout.WGMMA, interpret)
            return pl.run_state(mainloop)(plgpu.ACC.init(zeros))

        @pl.loop(0, my_tiles)
        def _tile(i):
            m0, n_tile = tile_origin(i)
            acc = tile_product(i * k_steps)
            if epilogue == "swiglu":
                gate, up = acc[:, :GATE_UP_GROUP], acc[:, GATE_UP_GROUP:]
                outs = [gate / (1.0 + jnp.exp(-gate)) * up]
                col0 = n_tile * GATE_UP_GROUP
            else:
                outs = [acc[:, j * TILE_K:(j + 1) * TILE_K] for j in range(out_tiles(epilogue))]
                col0 = n_tile * TILE_N
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the last tile's stores have read o_smem
            for j, out in enumerate(outs):
                o_smem[wg, j] = out.astype(o_ref.dtype)
            plgpu.commit_smem()
            for j in range(len(outs)):
                plgpu.copy_smem_to_gmem(o_smem.at[wg, j], o_ref.at[pl.ds(m0 + wg * TILE_M, TILE_M),
                                                                   pl.ds(col0 + j * TILE_K, TILE_K)])

        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == NUM_COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")

        @pl.loop(0, my_tiles)
        def _tile(i):
            m0, n_tile = tile_origin(i)

            @pl.loop(0, k_steps)
            def _stream(k):
                s = i * k_steps + k
                slot = lax.rem(s, num_stages)
                pl.when(s >= num_stages)(lambda: plgpu.barrier_wait(free.at[slot]))
                plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(m0, CTA_M), pl.ds(k * TILE_K, TILE_K)], x_smem.at[slot],
                                        full.at[slot])
                plgpu.copy_gmem_to_smem(w_ref.at[pl.ds(k * TILE_K, TILE_K), pl.ds(n_tile * TILE_N, TILE_N)],
                                        w_smem.at[slot], full.at[slot])

        total = my_tiles * k_steps

        @pl.loop(jnp.maximum(total - num_stages, 0), total)
        def _drain(s):  # observe the last releases too (the interpreter checks every phase)
            plgpu.barrier_wait(free.at[lax.rem(s, num_stages)])


@functools.partial(jax.jit, static_argnames=("epilogue", "config", "interpret"))
def matmul_mgpu(x: jax.Array, w: jax.Array, *, epilogue: str = "none", config: MatmulConfig | None = None,
                interpret: bool = False) -> jax.Array:
    """x [M, K] @ w [K, N] -> [M, N] in x's dtype; epilogue "swiglu" -> [M, N / 2], silu(gate) * up with
    w's columns laid out by `interleave_gate_up`. float32 accumulation. NotImplementedError for shapes
    `unsupported_reason` names."""
    _check_epilogue(epilogue)
    config = config or MatmulConfig()
    if (reason := unsupported_reason(x, w, epilogue=epilogue, config=config)) is not None:
        raise NotImplementedError(reason)
    (m, k), n = x.shape, w.shape[1]
    m_tiles, n_tiles = m // CTA_M, n // TILE_N
    stages = num_stages_for(jnp.dtype(x.dtype).itemsize, epilogue, config)
    out_n = n // 2 if epilogue == "swiglu" else n
    num_ctas = num_ctas_for(m_tiles * n_tiles, config)
    kernel = functools.partial(_kernel, m_tiles=m_tiles, num_tiles=m_tiles * n_tiles, num_ctas=num_ctas,
                               k_steps=k // TILE_K, num_stages=stages, epilogue=epilogue, interpret=interpret)
    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((m, out_n), x.dtype),
        scratch_types=(
            tiled_smem((stages, CTA_M, TILE_K), x.dtype),
            tiled_smem((stages, TILE_K, TILE_N), w.dtype),
            tiled_smem((NUM_COMPUTE_WGS, out_tiles(epilogue), TILE_M, TILE_K), x.dtype),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),               # x and w tiles landed
            plgpu.Barrier(num_arrivals=NUM_COMPUTE_WGS, num_barriers=stages),  # both warpgroups done
        ),
        grid=(num_ctas,),
        grid_names=("cta",),
        num_threads=NUM_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=compiler_params(config.lowering),
        interpret=interpret_params() if interpret else None,
    )(x, w)
