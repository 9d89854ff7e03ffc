"""The public dispatch in pallas_kernels and the KV write."""
from __future__ import annotations

import types

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import pallas_kernels
from models.kv_cache import KVCacheSpec
from pallas_kernels import PRESETS, REFERENCE, Backend, select_backend
from pallas_kernels.kv_write import write_kv_pallas

MOSAIC = PRESETS["mosaic"]


def test_a_backend_that_is_not_a_backend_is_rejected_by_name():
    with pytest.raises(TypeError, match="backend must be a pallas_kernels.Backend"):
        pallas_kernels.write_kv(None, None, None, None, None, backend="mosaic")
    with pytest.raises(ValueError, match="Backend.decode must be one of"):
        Backend(prefill="triton", decode="cuda")


def test_backends_are_hashable_values_so_jit_caches_them_as_static_arguments():
    assert hash(MOSAIC) == hash(Backend(prefill="mosaic", decode="triton", gate_up="mosaic"))
    assert len({MOSAIC, PRESETS["mosaic"], REFERENCE}) == 2


def test_interpret_impl_matches_reference_through_the_public_api():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((6, 4, 64)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((8, 16, 2, 64)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((8, 16, 2, 64)), jnp.float32)
    args = (q, k, v, jnp.array([20, 9], jnp.int32), jnp.array([[3, 5], [1, 0]], jnp.int32),
            jnp.array([0, 5, 6], jnp.int32), jnp.array(2, jnp.int32))
    out = pallas_kernels.ragged_paged_attention(*args, sm_scale=0.125, backend=PRESETS["interpret"])
    ref = pallas_kernels.ragged_paged_attention(*args, sm_scale=0.125, backend=REFERENCE)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)


def test_write_kv_puts_rows_in_their_slots_and_skips_padding_in_place():
    k_pages = jnp.zeros((4, 2, 1, 3), jnp.float32)
    new = jnp.arange(9, dtype=jnp.float32).reshape(3, 1, 3) + 1
    slots = jnp.array([5, -1, 0], jnp.int32)
    write = jax.jit(lambda kp, vp: pallas_kernels.write_kv(kp, vp, new, -new, slots, backend=REFERENCE),
                    donate_argnums=(0, 1))
    k_out, v_out = write(k_pages, jnp.zeros_like(k_pages))
    flat_k, flat_v = np.asarray(k_out).reshape(8, 3), np.asarray(v_out).reshape(8, 3)
    np.testing.assert_array_equal(flat_k[5], [1, 2, 3])
    np.testing.assert_array_equal(flat_k[0], [7, 8, 9])
    np.testing.assert_array_equal(flat_v[0], [-7, -8, -9])
    assert (np.delete(flat_k, [0, 5], axis=0) == 0).all()


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_pallas_kv_write_equals_the_scatter_for_random_slots_padding_and_dtypes(data):
    num_pages = data.draw(st.integers(1, 6), "num_pages")
    page_size = data.draw(st.sampled_from([1, 4, 16]), "page_size")
    num_kv_heads = data.draw(st.sampled_from([1, 2, 8]), "num_kv_heads")
    head_dim = data.draw(st.sampled_from([3, 64, 128]), "head_dim")
    num_slots = num_pages * page_size
    num_tokens = data.draw(st.integers(1, min(num_slots, 40)), "num_tokens")
    block_tokens = data.draw(st.sampled_from([1, 4, 16]), "block_tokens")
    dtype = data.draw(st.sampled_from([jnp.float32, jnp.bfloat16]), "dtype")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), "seed"))
    slots = rng.permutation(num_slots)[:num_tokens].astype(np.int32)
    slots[rng.random(num_tokens) < 0.3] = -1          # padding tokens: never written
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    k_pages, v_pages = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((num_tokens, num_kv_heads, head_dim)), jnp.float32) for _ in range(2))
    got = write_kv_pallas(k_pages, v_pages, k, v, jnp.asarray(slots), block_tokens=block_tokens, interpret=True)
    want = pallas_kernels.write_kv_reference(k_pages, v_pages, k, v, jnp.asarray(slots))
    for g, w in zip(got, want):
        assert g.dtype == dtype
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


def test_pallas_kv_write_names_the_argument_with_the_wrong_shape():
    pages = jnp.zeros((2, 4, 2, 8))
    k = jnp.zeros((3, 2, 8))
    with pytest.raises(ValueError, match="slot_mapping must be"):
        write_kv_pallas(pages, pages, k, k, jnp.zeros((4,), jnp.int32), interpret=True)
    with pytest.raises(ValueError, match="k and v must be"):
        write_kv_pallas(pages, pages, k, jnp.zeros((3, 1, 8)), jnp.zeros((3,), jnp.int32), interpret=True)


def test_kv_write_is_the_scatter_unless_the_backend_names_the_pallas_kernel():
    pages = jax.ShapeDtypeStruct((64, 16, 8, 128), jnp.bfloat16)
    rows = jax.ShapeDtypeStruct((32, 8, 128), jnp.bfloat16)
    slots = jax.ShapeDtypeStruct((32,), jnp.int32)

    def lowered(backend):
        fn = jax.jit(lambda *a: pallas_kernels.write_kv(*a, backend=backend), donate_argnums=(0, 1))
        return fn.trace(pages, pages, rows, rows, slots).lower(lowering_platforms=("cuda",)).as_text()

    text = lowered(MOSAIC)
    assert "jpaged_kv_write" not in text and "scatter" in text
    text = lowered(select_backend(None, None, "mosaic,kv_write=pallas"))
    assert "jpaged_kv_write" in text and "scatter" not in text


def _batch_shapes(num_tokens, num_slots, *, hq=32, d=128, dtype=jnp.bfloat16):
    q = jax.ShapeDtypeStruct((num_tokens, hq, d), dtype)
    k_pages = jax.ShapeDtypeStruct((64, 16, 8, d), dtype)
    return q, k_pages, jax.ShapeDtypeStruct((num_slots, 8), jnp.int32)


def test_mosaic_impl_takes_supported_prefill_batches_only():
    assert pallas_kernels.mosaic_takes(*_batch_shapes(512, 4))
    assert not pallas_kernels.mosaic_takes(*_batch_shapes(4, 4)), "decode-shaped: Triton split-KV"
    assert not pallas_kernels.mosaic_takes(*_batch_shapes(512, 4, dtype=jnp.float32))


def test_mosaic_impls_take_windowed_and_soft_capped_prefill_batches():
    batch = _batch_shapes(512, 4)
    assert pallas_kernels.mosaic_takes(*batch, sliding_window=128)
    assert pallas_kernels.mosaic_takes(*batch, soft_cap=30.0)
    assert pallas_kernels.mosaic_takes(*batch, sliding_window=4096, soft_cap=50.0)
    assert not pallas_kernels.mosaic_takes(*_batch_shapes(4, 4), sliding_window=128)
    assert not pallas_kernels.mosaic_takes(*_batch_shapes(512, 4, dtype=jnp.float32), soft_cap=30.0)


def _lowered_backends(num_tokens, num_slots, **kwargs) -> set[str]:
    """The kernel backends ("mosaic_gpu", "triton") a batch of this shape lowers to for CUDA."""
    q, k_pages, table = _batch_shapes(num_tokens, num_slots)
    ints = jax.ShapeDtypeStruct((num_slots,), jnp.int32)
    args = (q, k_pages, k_pages, ints, table, jax.ShapeDtypeStruct((num_slots + 1,), jnp.int32),
            jax.ShapeDtypeStruct((), jnp.int32))
    fn = jax.jit(lambda *a: pallas_kernels.ragged_paged_attention(*a, sm_scale=0.1, **kwargs))
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return {backend for backend in ("mosaic_gpu", "triton") if backend in text}


@pytest.mark.parametrize("num_tokens,num_slots,backends", [
    (64, 2, {"mosaic_gpu", "triton"}),      # prefill chunks to Mosaic, the batch's decodes to Triton
    (4, 4, {"triton"})])
def test_mosaic_impl_lowers_prefill_to_mosaic_and_decode_to_triton(num_tokens, num_slots, backends):
    assert _lowered_backends(num_tokens, num_slots, backend=MOSAIC) == backends


def test_mosaic_without_the_mixed_split_lowers_prefill_to_mosaic_alone():
    assert _lowered_backends(64, 2, backend=select_backend(None, None, "mosaic,split_mixed=false")) == {"mosaic_gpu"}


@pytest.mark.parametrize("num_tokens,num_slots,window,soft_cap", [
    (64, 2, 256, None), (64, 2, None, 30.0), (64, 2, 8, 50.0)])
def test_window_and_soft_cap_prefill_go_to_the_mosaic_kernel(num_tokens, num_slots, window, soft_cap):
    assert "mosaic_gpu" in _lowered_backends(num_tokens, num_slots, sliding_window=window, soft_cap=soft_cap,
                                             backend=MOSAIC)


@pytest.mark.parametrize("override", ["mosaic,decode=mosaic", "auto,decode=mosaic"])
def test_there_is_no_mosaic_decode_kernel_to_select(override):
    with pytest.raises(ValueError, match=r"Backend\.decode must be one of \('reference', 'triton'\), got 'mosaic'"):
        select_backend(_gpu("9.0"), None, override)
    with pytest.raises(ValueError, match="Backend.decode must be one of"):
        Backend(prefill="mosaic", decode="mosaic")


def _gpu(cc):
    return types.SimpleNamespace(platform="gpu", compute_capability=cc)


def test_auto_is_mosaic_on_hopper_pallas_on_other_gpus_reference_on_cpu():
    spec = KVCacheSpec(num_layers=2, num_kv_heads=8, head_dim=128, page_size=16, dtype=jnp.bfloat16)
    assert select_backend(_gpu("9.0"), spec) == MOSAIC
    assert select_backend(_gpu("9.0"), spec, "auto") == MOSAIC
    assert select_backend(_gpu("8.0"), spec) == PRESETS["pallas"]
    assert select_backend(types.SimpleNamespace(platform="cpu"), spec) == REFERENCE
    assert select_backend(_gpu("9.0"), spec, "pallas") == PRESETS["pallas"]
    assert select_backend(_gpu("9.0"), spec, "auto,split_mixed=false").split_mixed is False


def test_auto_on_hopper_falls_back_to_triton_for_pages_the_mosaic_kernels_cannot_read():
    fp32 = KVCacheSpec(num_layers=2, num_kv_heads=8, head_dim=128, page_size=16, dtype=jnp.float32)
    assert select_backend(_gpu("9.0"), fp32) == PRESETS["pallas"]
    with pytest.raises(ValueError, match="prefill='mosaic': dtype must be bf16 or f16"):
        select_backend(_gpu("9.0"), fp32, "mosaic")


@pytest.mark.parametrize("text,match", [
    ("cuda", "must start with 'auto' or a preset"), ("mosaic,decode", "must be field=value"),
    ("mosaic,colour=red", "must be field=value"), ("mosaic,split_mixed=yes", "true or false"),
    ("pallas,decode=fast", "Backend.decode must be one of")])
def test_bad_backend_overrides_are_refused_by_name(text, match):
    with pytest.raises(ValueError, match=match):
        select_backend(_gpu("9.0"), None, text)
