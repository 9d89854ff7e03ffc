"""The Mosaic GPU GEMM and its SwiGLU epilogue: the gate/up layout, the jnp reference, the kernel in Mosaic
GPU's interpreter, and which shapes the model's dispatch sends to it."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import pallas_kernels
from pallas_kernels import matmul_mgpu as mm


@given(f_groups=st.integers(1, 5), ragged=st.booleans(), lead=st.sampled_from([(), (3,)]))
@settings(max_examples=20, deadline=None)
def test_split_gate_up_inverts_interleave_gate_up(f_groups, ragged, lead):
    f = f_groups * mm.GATE_UP_GROUP + (7 if ragged else 0)   # F not a multiple of the group: [gate | up]
    gate = jnp.arange(np.prod(lead, dtype=int) * f, dtype=jnp.float32).reshape(*lead, f)
    up = -gate - 1
    fused = mm.interleave_gate_up(gate, up)
    assert fused.shape == (*lead, 2 * f)
    got_gate, got_up = mm.split_gate_up(fused)
    np.testing.assert_array_equal(got_gate, gate)
    np.testing.assert_array_equal(got_up, up)
    if not ragged:  # groups alternate: gate 0, up 0, gate 1, ...
        g = mm.GATE_UP_GROUP
        np.testing.assert_array_equal(fused[..., g:2 * g], up[..., :g])
        np.testing.assert_array_equal(fused[..., 2 * g:3 * g], gate[..., g:2 * g])


def test_swiglu_reference_on_the_interleaved_weight_is_silu_gate_times_up():
    kx, kg, ku = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (5, 32), jnp.float32)
    wg = jax.random.normal(kg, (32, 128), jnp.float32)
    wu = jax.random.normal(ku, (32, 128), jnp.float32)
    got = mm.matmul_reference(x, mm.interleave_gate_up(wg, wu), epilogue="swiglu")
    np.testing.assert_allclose(got, jax.nn.silu(x @ wg) * (x @ wu), rtol=1e-5, atol=1e-5)


@given(m_tiles=st.integers(1, 2), k_steps=st.integers(1, 5), n_tiles=st.integers(1, 3),
       epilogue=st.sampled_from(mm.EPILOGUES), stages=st.sampled_from([None, 2, 3]),
       max_ctas=st.sampled_from([None, 1, 2]), seed=st.integers(0, 2**16))
@settings(max_examples=4, deadline=None)
def test_interpreted_kernel_matches_the_reference(m_tiles, k_steps, n_tiles, epilogue, stages, max_ctas, seed):
    """K steps fewer and more than the SMEM slots; tiles over M (the fastest tile index) and N; persistent
    CTAs taking several tiles each, their K steps one stream through the slots."""
    m, k, n = m_tiles * mm.CTA_M, k_steps * mm.TILE_K, n_tiles * mm.TILE_N
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(kw, (k, n), jnp.float32) * k ** -0.5).astype(jnp.bfloat16)
    got = mm.matmul_mgpu(x, w, epilogue=epilogue, config=mm.MatmulConfig(num_stages=stages, max_ctas=max_ctas),
                         interpret=True)
    ref = mm.matmul_reference(x, w, epilogue=epilogue)
    assert got.shape == ref.shape == (m, n // 2 if epilogue == "swiglu" else n)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("x_shape,w_shape,dtype,fragment", [
    ((200, 64), (64, 128), jnp.bfloat16, "multiples of 256"),
    ((256, 64), (64, 130), jnp.bfloat16, "multiples of 256"),
    ((256, 64), (64, 128), jnp.float32, "bf16 or f16"),
    ((256, 64), (32, 128), jnp.bfloat16, "x must be [M, K]"),
])
def test_unsupported_shapes_are_named(x_shape, w_shape, dtype, fragment):
    x, w = jax.ShapeDtypeStruct(x_shape, dtype), jax.ShapeDtypeStruct(w_shape, dtype)
    assert fragment in mm.unsupported_reason(x, w)
    with pytest.raises(NotImplementedError, match=re.escape(fragment)):
        mm.matmul_mgpu(jnp.zeros(x_shape, dtype), jnp.zeros(w_shape, dtype))


def test_unknown_epilogue_is_rejected():
    with pytest.raises(ValueError, match="epilogue must be one of"):
        mm.matmul_reference(jnp.zeros((2, 2)), jnp.zeros((2, 2)), epilogue="gelu")


@pytest.mark.parametrize("rows,preset,mosaic", [(512, "mosaic", True), (256, "mosaic", True),
                                                (200, "mosaic", False), (512, "pallas", False)])
def test_gate_up_swiglu_lowers_to_mosaic_only_where_the_kernel_takes_the_shape(rows, preset, mosaic):
    x = jax.ShapeDtypeStruct((rows, 128), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((128, 2 * 256), jnp.bfloat16)
    fn = jax.jit(lambda x, w: pallas_kernels.gate_up_swiglu(x, w, backend=pallas_kernels.PRESETS[preset]))
    text = fn.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    assert ("mosaic_gpu" in text) == mosaic


def test_gate_up_swiglu_falls_back_to_xla_with_the_same_values():
    kx, kw = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (7, 64), jnp.float32)
    w = jax.random.normal(kw, (64, 256), jnp.float32)
    np.testing.assert_allclose(pallas_kernels.gate_up_swiglu(x, w, backend=pallas_kernels.PRESETS["mosaic"]),
                               mm.matmul_reference(x, w, epilogue="swiglu"), rtol=1e-5, atol=1e-5)
