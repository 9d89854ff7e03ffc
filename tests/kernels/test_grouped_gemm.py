"""The grouped GEMM (pallas_kernels/grouped_gemm.py): the Pallas kernel in the interpreter equals the
ragged_dot reference, empty groups and one group taking every row included; the tile work list covers
each group's rows exactly once; the backend's dispatch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import pallas_kernels
from pallas_kernels import grouped_gemm as gg
from pallas_kernels import matmul_mgpu as mm

EXACT = jax.lax.Precision.HIGHEST


def _operands(sizes, k, n, dtype=jnp.float32, extra_rows=3, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    m = sum(sizes) + extra_rows   # rows past the last group: zero in the output
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (len(sizes), k, n), jnp.float32) * k ** -0.5).astype(dtype)
    return x, w, jnp.asarray(sizes, jnp.int32)


@pytest.mark.parametrize("sizes,epilogue", [
    ([3, 0, 1, 20, 0, 40], "none"),         # empty groups, a row block shared by three groups
    ([0, 0, 45, 0], "swiglu"),              # one group takes every row
])
def test_interpreted_kernel_equals_the_reference(sizes, epilogue):
    x, w, group_sizes = _operands(sizes, 64, 128)
    got = gg.grouped_gemm_pallas(x, w, group_sizes, epilogue=epilogue, interpret=True)
    ref = gg.grouped_gemm_reference(x, w, group_sizes, epilogue=epilogue, precision=EXACT)
    assert got.shape == ref.shape == (x.shape[0], 64 if epilogue == "swiglu" else 128)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got[sum(sizes):]), 0)


def test_reference_swiglu_is_silu_gate_times_up_per_group():
    x, w, group_sizes = _operands([4, 0, 6], 32, 96, extra_rows=0)
    gate, up = w[..., :48], w[..., 48:]
    got = gg.grouped_gemm_reference(x, mm.interleave_gate_up(gate, up), group_sizes, epilogue="swiglu",
                                    precision=EXACT)
    rows = np.repeat(np.arange(3), [4, 0, 6])
    want = np.stack([jax.nn.silu(x[r] @ gate[g]) * (x[r] @ up[g]) for r, g in enumerate(rows)])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@given(sizes=st.lists(st.integers(0, 40), min_size=8, max_size=8), block_m=st.sampled_from([16, 32]))
@settings(max_examples=15, deadline=None)
def test_work_list_covers_each_group_row_once(sizes, block_m):
    rows = 8 * 40 + 5   # one shape for every example: compiled once
    groups, blocks = map(np.asarray, gg.tile_work_list(jnp.asarray(sizes, jnp.int32), rows, block_m))
    ends = np.cumsum(sizes)
    covered = np.zeros(rows, int)
    for g, b in zip(groups, blocks):
        if g < 0:
            continue
        r = np.arange(b * block_m, (b + 1) * block_m)
        covered[r[(r >= ends[g] - sizes[g]) & (r < ends[g])]] += 1
    assert (covered[:ends[-1]] == 1).all() and (covered[ends[-1]:] == 0).all()
    assert len(groups) == -(-rows // block_m) + len(sizes) - 1


def test_dispatch_uses_the_kernel_where_it_takes_the_shapes():
    x, w, group_sizes = _operands([8, 8], 64, 128)
    interp = pallas_kernels.PRESETS["interpret"]
    assert interp.grouped_gemm == "pallas" and gg.unsupported_reason(x, w) is None
    np.testing.assert_allclose(pallas_kernels.grouped_matmul(x, w, group_sizes, backend=interp),
                               gg.grouped_gemm_reference(x, w, group_sizes, precision=EXACT), rtol=1e-5, atol=1e-5)
    odd = w[:, :48]   # K not a multiple of the kernel's block: the reference runs
    assert "block_k" in gg.unsupported_reason(x[:, :48], odd)
    np.testing.assert_allclose(pallas_kernels.grouped_matmul(x[:, :48], odd, group_sizes, backend=interp),
                               gg.grouped_gemm_reference(x[:, :48], odd, group_sizes), rtol=1e-6)
    with pytest.raises(ValueError, match="block_k"):
        gg.grouped_gemm_pallas(x[:, :48], odd, group_sizes, interpret=True)
    with pytest.raises(ValueError, match="group_sizes must be"):
        gg.grouped_gemm_reference(x, w, group_sizes[:1])
    with pytest.raises(ValueError, match="grouped_gemm must be one of"):
        pallas_kernels.Backend(grouped_gemm="cutlass")
