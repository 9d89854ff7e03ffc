"""The public dispatch in pallas_kernels and the KV write."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels


def test_unknown_impl_is_rejected_by_name():
    with pytest.raises(ValueError, match="impl must be one of"):
        pallas_kernels.write_kv(None, None, None, None, None, impl="cuda")


def test_interpret_impl_matches_reference_through_the_public_api():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((6, 4, 64)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((8, 16, 2, 64)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((8, 16, 2, 64)), jnp.float32)
    args = (q, k, v, jnp.array([20, 9], jnp.int32), jnp.array([[3, 5], [1, 0]], jnp.int32),
            jnp.array([0, 5, 6], jnp.int32), jnp.array(2, jnp.int32))
    out = pallas_kernels.ragged_paged_attention(*args, sm_scale=0.125, impl="interpret")
    ref = pallas_kernels.ragged_paged_attention(*args, sm_scale=0.125, impl="reference")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)


def test_write_kv_puts_rows_in_their_slots_and_skips_padding_in_place():
    k_pages = jnp.zeros((4, 2, 1, 3), jnp.float32)
    new = jnp.arange(9, dtype=jnp.float32).reshape(3, 1, 3) + 1
    slots = jnp.array([5, -1, 0], jnp.int32)
    write = jax.jit(lambda kp, vp: pallas_kernels.write_kv(kp, vp, new, -new, slots, impl="pallas"),
                    donate_argnums=(0, 1))
    k_out, v_out = write(k_pages, jnp.zeros_like(k_pages))
    flat_k, flat_v = np.asarray(k_out).reshape(8, 3), np.asarray(v_out).reshape(8, 3)
    np.testing.assert_array_equal(flat_k[5], [1, 2, 3])
    np.testing.assert_array_equal(flat_k[0], [7, 8, 9])
    np.testing.assert_array_equal(flat_v[0], [-7, -8, -9])
    assert (np.delete(flat_k, [0, 5], axis=0) == 0).all()


def _batch_shapes(num_tokens, num_slots, *, hq=32, d=128, dtype=jnp.bfloat16):
    q = jax.ShapeDtypeStruct((num_tokens, hq, d), dtype)
    k_pages = jax.ShapeDtypeStruct((64, 16, 8, d), dtype)
    return q, k_pages, jax.ShapeDtypeStruct((num_slots, 8), jnp.int32)


def test_mosaic_impl_takes_supported_prefill_batches_only():
    assert pallas_kernels.mosaic_takes(*_batch_shapes(512, 4))
    assert not pallas_kernels.mosaic_takes(*_batch_shapes(4, 4)), "decode-shaped: Triton split-KV"
    assert not pallas_kernels.mosaic_takes(*_batch_shapes(512, 4), sliding_window=128)
    assert not pallas_kernels.mosaic_takes(*_batch_shapes(512, 4), soft_cap=30.0)
    assert not pallas_kernels.mosaic_takes(*_batch_shapes(512, 4, dtype=jnp.float32))


def test_mosaic_full_impl_takes_windowed_and_soft_capped_prefill_batches():
    """The prefill kernel's window / soft-cap paths are CPU-checked only: the opt-in impl alone takes them."""
    batch = _batch_shapes(512, 4)
    assert pallas_kernels.mosaic_takes(*batch, sliding_window=128, impl="mosaic_full")
    assert pallas_kernels.mosaic_takes(*batch, soft_cap=30.0, impl="mosaic_full")
    assert pallas_kernels.mosaic_takes(*batch, sliding_window=4096, soft_cap=50.0, impl="mosaic_full")
    assert not pallas_kernels.mosaic_takes(*batch, sliding_window=128, impl="mosaic")
    assert not pallas_kernels.mosaic_takes(*batch, soft_cap=30.0, impl="mosaic")
    assert not pallas_kernels.mosaic_takes(*_batch_shapes(4, 4), sliding_window=128, impl="mosaic_full")
    assert not pallas_kernels.mosaic_takes(*_batch_shapes(512, 4, dtype=jnp.float32), soft_cap=30.0,
                                           impl="mosaic_full")


@pytest.mark.parametrize("num_tokens,num_slots,backend", [(64, 2, "mosaic_gpu"), (4, 4, "triton")])
def test_mosaic_impl_lowers_prefill_to_mosaic_and_decode_to_triton(num_tokens, num_slots, backend):
    q, k_pages, table = _batch_shapes(num_tokens, num_slots)
    ints = jax.ShapeDtypeStruct((num_slots,), jnp.int32)
    args = (q, k_pages, k_pages, ints, table, jax.ShapeDtypeStruct((num_slots + 1,), jnp.int32),
            jax.ShapeDtypeStruct((), jnp.int32))
    fn = jax.jit(lambda *a: pallas_kernels.ragged_paged_attention(*a, sm_scale=0.1, impl="mosaic"))
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert backend in text and ({"mosaic_gpu", "triton"} - {backend}).pop() not in text


@pytest.mark.parametrize("num_tokens,num_slots,window,soft_cap,impl,backend", [
    (64, 2, 256, None, "mosaic", "triton"), (64, 2, None, 30.0, "mosaic", "triton"),
    (64, 2, 256, None, "mosaic_full", "mosaic_gpu"), (64, 2, None, 30.0, "mosaic_full", "mosaic_gpu"),
    (64, 2, 8, 50.0, "mosaic_full", "mosaic_gpu")])
def test_window_and_soft_cap_prefill_go_to_mosaic_only_under_mosaic_full(num_tokens, num_slots, window, soft_cap,
                                                                         impl, backend):
    q, k_pages, table = _batch_shapes(num_tokens, num_slots)
    ints = jax.ShapeDtypeStruct((num_slots,), jnp.int32)
    args = (q, k_pages, k_pages, ints, table, jax.ShapeDtypeStruct((num_slots + 1,), jnp.int32),
            jax.ShapeDtypeStruct((), jnp.int32))
    fn = jax.jit(lambda *a: pallas_kernels.ragged_paged_attention(*a, sm_scale=0.1, sliding_window=window,
                                                                  soft_cap=soft_cap, impl=impl))
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert backend in text and ({"mosaic_gpu", "triton"} - {backend}).pop() not in text


@pytest.mark.parametrize("num_tokens,num_slots,window,backend", [
    (64, 2, None, "mosaic_gpu"), (4, 4, None, "mosaic_gpu"), (4, 4, 128, "triton")])
def test_mosaic_full_impl_sends_decode_to_the_mosaic_decode_kernel_when_supported(num_tokens, num_slots, window,
                                                                                  backend):
    q, k_pages, table = _batch_shapes(num_tokens, num_slots)
    ints = jax.ShapeDtypeStruct((num_slots,), jnp.int32)
    args = (q, k_pages, k_pages, ints, table, jax.ShapeDtypeStruct((num_slots + 1,), jnp.int32),
            jax.ShapeDtypeStruct((), jnp.int32))
    fn = jax.jit(lambda *a: pallas_kernels.ragged_paged_attention(*a, sm_scale=0.1, sliding_window=window,
                                                                  impl="mosaic_full"))
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert backend in text and ({"mosaic_gpu", "triton"} - {backend}).pop() not in text


def test_auto_attention_impl_is_mosaic_on_hopper_pallas_on_other_gpus_reference_on_cpu():
    import types

    from jpaged.engine.llm_engine import resolve_attn_impl

    gpu = lambda cc: types.SimpleNamespace(platform="gpu", compute_capability=cc)  # noqa: E731
    assert resolve_attn_impl("auto", gpu("9.0")) == "mosaic"
    assert resolve_attn_impl("auto", gpu("8.0")) == "pallas"
    assert resolve_attn_impl("auto", types.SimpleNamespace(platform="cpu")) == "reference"
    assert resolve_attn_impl("pallas", gpu("9.0")) == "pallas"
