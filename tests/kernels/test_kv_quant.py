"""8-bit KV pages: quantization bounds, the quantizing KV write (scatter and Pallas kernel), and every
attention path (jnp reference, Triton decode and prefill kernels in interpret mode) against a float64
oracle computed on the dequantized values."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from models.kv_cache import KVCacheSpec
from pallas_kernels import REFERENCE, Backend, kv_quant, select_backend
from pallas_kernels.kv_write import (write_kv_quantized_pallas, write_kv_quantized_reference)
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention_kernel import ragged_paged_attention_pallas

DTYPES = [jnp.float8_e4m3fn, jnp.float8_e5m2, jnp.int8]
NUM_PAGES, PAGE, HQ, HKV, D = 12, 8, 4, 2, 32


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_then_dequantize_is_within_the_format_bound(dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3, 128)) * np.exp(rng.uniform(-6, 6, (64, 3, 1)))
    x[0, 0] = 0.0                      # an all-zero row: scale 1, values 0
    x[1, 1, :5] = [1e-9, -1e-9, 0, 3, -3]
    values, scales = kv_quant.quantize(jnp.asarray(x, jnp.float32), dtype)
    assert values.dtype == jnp.dtype(dtype) and scales.shape == (64, 3) and scales.dtype == jnp.float32
    back = np.asarray(kv_quant.dequantize(values, scales), np.float64)
    err = np.abs(back - np.asarray(jnp.asarray(x, jnp.float32), np.float64))
    bound = kv_quant.error_bound(np.asarray(jnp.asarray(x, jnp.float32)), dtype)
    assert (err <= bound).all(), f"worst excess {np.max(err - bound)}"
    assert np.asarray(scales)[0, 0] == 1.0 and (np.asarray(back)[0, 0] == 0).all()
    # the bound is tight enough to mean something: a few times the worst error seen
    assert np.max(err / np.maximum(bound, 1e-30)) > 0.2


def test_kv_cache_dtype_names_and_refusals():
    assert kv_quant.resolve_kv_cache_dtype("auto", jnp.bfloat16) == jnp.bfloat16
    assert kv_quant.resolve_kv_cache_dtype("fp8", jnp.float32) == jnp.float8_e4m3fn
    assert kv_quant.resolve_kv_cache_dtype("fp8_e5m2", jnp.float32) == jnp.float8_e5m2
    assert kv_quant.resolve_kv_cache_dtype("int8", jnp.float32) == jnp.int8
    with pytest.raises(ValueError, match="kv_cache_dtype must be"):
        kv_quant.resolve_kv_cache_dtype("int4", jnp.float32)
    with pytest.raises(ValueError, match="8-bit pages must be one of"):
        KVCacheSpec(num_layers=1, num_kv_heads=2, head_dim=32, page_size=8, dtype=jnp.uint8)
    spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=32, page_size=8, dtype=jnp.int8)
    bf16 = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=32, page_size=8, dtype=jnp.bfloat16)
    assert spec.quantized and not bf16.quantized
    assert spec.bytes_per_page == 2 * 2 * 8 * 2 * (32 + 4)      # values + one f32 scale per token and head
    cache = spec.create(3)
    assert cache.quantized and cache.k_scale[0].shape == (3, 8, 2) and cache.k[0].dtype == jnp.int8
    host = spec.host_pool(2)
    assert isinstance(host.v_scale[1], np.ndarray) and host.v_scale[1].shape == (2, 8, 2)


def _hopper():
    import types
    return types.SimpleNamespace(platform="gpu", compute_capability="9.0")


def test_backend_auto_takes_triton_prefill_for_8bit_pages_and_mosaic_refuses_them_by_name():
    spec = KVCacheSpec(num_layers=2, num_kv_heads=8, head_dim=128, page_size=16, dtype=jnp.float8_e4m3fn)
    backend = select_backend(_hopper(), spec)
    assert (backend.prefill, backend.decode, backend.gate_up) == ("triton", "triton", "mosaic")
    with pytest.raises(ValueError, match="8-bit pages"):
        select_backend(_hopper(), spec, "mosaic")
    q = jnp.zeros((64, 8, 128), jnp.bfloat16)
    pages = jnp.zeros((4, 16, 8, 128), jnp.float8_e4m3fn)
    assert "8-bit pages" in pallas_kernels.ragged_paged_attention_mgpu.unsupported_reason(q, pages)


def _new_rows(rng, t):
    k = rng.standard_normal((t, HKV, D)).astype(np.float32) * rng.uniform(0.01, 30, (t, HKV, 1))
    v = rng.standard_normal((t, HKV, D)).astype(np.float32)
    return jnp.asarray(k), jnp.asarray(v)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantizing_kv_write_kernel_equals_the_scatter(dtype):
    rng = np.random.default_rng(1)
    t = 21
    k, v = _new_rows(rng, t)
    slots = rng.permutation(NUM_PAGES * PAGE)[:t].astype(np.int32)
    slots[[3, 17]] = -1                                               # padding: not written
    spec = KVCacheSpec(num_layers=1, num_kv_heads=HKV, head_dim=D, page_size=PAGE, dtype=dtype)
    cache = spec.create(NUM_PAGES)
    pools = (cache.k[0], cache.v[0], cache.k_scale[0], cache.v_scale[0])
    want = write_kv_quantized_reference(*pools, k, v, jnp.asarray(slots))
    got = write_kv_quantized_pallas(*pools, k, v, jnp.asarray(slots), block_tokens=8, interpret=True)
    for w, g in zip(want, got):
        np.testing.assert_array_equal(np.asarray(w, np.float32), np.asarray(g, np.float32))
    kq, ks = kv_quant.quantize(k, dtype)
    flat_k = np.asarray(want[0], np.float32).reshape(-1, HKV, D)
    flat_s = np.asarray(want[2]).reshape(-1, HKV)
    real = slots >= 0
    np.testing.assert_array_equal(flat_k[slots[real]], np.asarray(kq, np.float32)[real])
    np.testing.assert_array_equal(flat_s[slots[real]], np.asarray(ks)[real])
    untouched = np.setdiff1d(np.arange(NUM_PAGES * PAGE), slots[real])
    assert (flat_s[untouched] == 0).all() and (flat_k[untouched] == 0).all()


def _quantized_batch(rng, dtype, q_lens, kv_lens):
    """A ragged batch over quantized pages; pages and slots nobody may read hold NaN (fp8) / garbage."""
    q_lens, kv_lens = np.array(q_lens, np.int32), np.array(kv_lens, np.int32)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    pages_per_seq = -(-int(kv_lens.max()) // PAGE)
    perm = rng.permutation(NUM_PAGES).astype(np.int32)
    table = np.zeros((len(q_lens), pages_per_seq), np.int32)
    offset = 0
    for s, n in enumerate(-(-kv_lens // PAGE)):
        table[s, :n] = perm[offset:offset + n]
        offset += n
    k, v = (rng.standard_normal((NUM_PAGES, PAGE, HKV, D)) * rng.uniform(0.05, 20, (NUM_PAGES, PAGE, HKV, 1))
            for _ in range(2))
    kq, ks = kv_quant.quantize(jnp.asarray(k, jnp.float32), dtype)
    vq, vs = kv_quant.quantize(jnp.asarray(v, jnp.float32), dtype)
    kq, vq, ks, vs = (np.array(x) for x in (kq, vq, ks, vs))
    live = np.zeros((NUM_PAGES, PAGE), bool)
    for s in range(len(q_lens)):
        for j in range(int(kv_lens[s])):
            live[table[s, j // PAGE], j % PAGE] = True
    garbage = np.array(np.nan if dtype != jnp.int8 else 77).astype(kq.dtype)
    kq[~live], vq[~live], ks[~live], vs[~live] = garbage, garbage, np.nan, np.nan
    q = rng.standard_normal((int(cu[-1]) + 3, HQ, D)).astype(np.float32)   # 3 padding tokens
    return dict(q=q, kq=kq, vq=vq, ks=ks, vs=vs, kv_lens=kv_lens, table=table, cu=cu, num_seqs=len(q_lens))


def _oracle(b, sm_scale):
    """float64 attention on the dequantized values, a loop over sequences and tokens."""
    k = b["kq"].astype(np.float64) * b["ks"][..., None].astype(np.float64)
    v = b["vq"].astype(np.float64) * b["vs"][..., None].astype(np.float64)
    q = b["q"].astype(np.float64)
    out = np.zeros(q.shape)
    group = HQ // HKV
    for s in range(b["num_seqs"]):
        kv_len, start, end = int(b["kv_lens"][s]), int(b["cu"][s]), int(b["cu"][s + 1])
        pos = np.arange(kv_len)
        keys = k[b["table"][s, pos // PAGE], pos % PAGE]                   # [L, Hkv, D]
        vals = v[b["table"][s, pos // PAGE], pos % PAGE]
        for i, t in enumerate(range(start, end)):
            p = kv_len - (end - start) + i
            for h in range(HQ):
                sc = keys[:p + 1, h // group] @ q[t, h] * sm_scale
                w = np.exp(sc - sc.max())
                out[t, h] = (w / w.sum()) @ vals[:p + 1, h // group]
    return out


# decode-shaped (T <= S) and prefill-shaped (chunks over cached context) batches
BATCHES = {"decode": ([1, 1, 1, 0, 0, 0], [37, 5, 16, 0, 0, 0]), "prefill": ([13, 1, 6], [29, 9, 6])}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", list(BATCHES))
def test_attention_on_8bit_pages_equals_a_float64_oracle_on_the_dequantized_values(dtype, shape):
    rng = np.random.default_rng(2)
    q_lens, kv_lens = BATCHES[shape]
    b = _quantized_batch(rng, dtype, q_lens, kv_lens)
    b["num_seqs"] = sum(1 for x in q_lens if x) if shape == "decode" else len(q_lens)
    sm_scale = D ** -0.5
    args = (jnp.asarray(b["q"]), jnp.asarray(b["kq"]), jnp.asarray(b["vq"]), jnp.asarray(b["kv_lens"]),
            jnp.asarray(b["table"]), jnp.asarray(b["cu"]), jnp.asarray(b["num_seqs"], jnp.int32))
    scales = dict(k_scale=jnp.asarray(b["ks"]), v_scale=jnp.asarray(b["vs"]))
    want = _oracle(b, sm_scale)
    real = int(b["cu"][b["num_seqs"]])
    outs = {
        "reference": ragged_paged_attention_reference(*args, sm_scale=sm_scale, **scales),
        "triton": ragged_paged_attention_pallas(*args, sm_scale=sm_scale, interpret=True, **scales),
    }
    for name, out in outs.items():
        out = np.asarray(out, np.float64)
        assert not np.isnan(out).any(), name
        assert (out[real:] == 0).all(), name
        np.testing.assert_allclose(out, want, rtol=2e-4, atol=2e-4, err_msg=name)


def test_attention_refuses_missing_or_misshapen_scales_by_name():
    q = jnp.zeros((4, HQ, D), jnp.float32)
    pages = jnp.zeros((NUM_PAGES, PAGE, HKV, D), jnp.int8)
    meta = (jnp.zeros(4, jnp.int32), jnp.zeros((4, 2), jnp.int32), jnp.zeros(5, jnp.int32), jnp.int32(0))
    with pytest.raises(ValueError, match="need k_scale"):
        ragged_paged_attention_reference(q, pages, pages, *meta, sm_scale=1.0)
    with pytest.raises(ValueError, match="v_scale must be float32"):
        ragged_paged_attention_pallas(q, pages, pages, *meta, sm_scale=1.0, interpret=True,
                                      k_scale=jnp.ones(pages.shape[:3]), v_scale=jnp.ones((1, 2)))
    with pytest.raises(ValueError, match="come only with 8-bit pages"):
        ragged_paged_attention_reference(q, pages.astype(jnp.float32), pages.astype(jnp.float32), *meta,
                                         sm_scale=1.0, k_scale=jnp.ones(pages.shape[:3]))


@pytest.mark.long
def test_routed_write_and_attend_through_the_backends():
    rng = np.random.default_rng(3)
    spec = KVCacheSpec(num_layers=1, num_kv_heads=HKV, head_dim=D, page_size=PAGE, dtype=jnp.float8_e4m3fn)
    k, v = _new_rows(rng, 10)
    q = jnp.asarray(rng.standard_normal((10, HQ, D)), jnp.float32)
    slots = jnp.arange(10, dtype=jnp.int32) + 3
    meta = (jnp.array([13], jnp.int32), jnp.array([[0, 1]], jnp.int32), jnp.array([0, 10], jnp.int32),
            jnp.int32(1))
    outs = []
    for backend in (REFERENCE, Backend(prefill="triton", decode="triton", kv_write="pallas", interpret=True)):
        c = spec.create(2)
        kp, vp, ks, vs = pallas_kernels.write_kv_quantized(c.k[0], c.v[0], c.k_scale[0], c.v_scale[0], k, v,
                                                           slots, backend=backend)
        outs.append(np.asarray(pallas_kernels.ragged_paged_attention(
            q, kp, vp, *meta, sm_scale=0.2, backend=backend, k_scale=ks, v_scale=vs)))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)


from tests.multihost.devices import on_cpu_devices  # noqa: E402


@pytest.mark.long
@on_cpu_devices(2)
def test_tensor_parallel_pages_and_scales_split_over_kv_heads_and_attend_as_one_device():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jpaged import sharding
    from models.kv_cache import KVCacheSpec, contiguous_step_input
    from models.layers import paged_attention
    from pallas_kernels import REFERENCE

    spec = KVCacheSpec(num_layers=1, num_kv_heads=2, head_dim=16, page_size=8, dtype=jnp.int8, kv_shards=2)
    mesh = sharding.make_mesh(2)
    cache = sharding.new_kv_cache(spec, mesh, num_pages=4)
    assert cache.k_scale[0].sharding.spec[2] == "model" and cache.k[0].sharding.spec[2] == "model"
    assert cache.k_scale[0].addressable_shards[0].data.shape == (4, 8, 1)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((12, h, 16)), jnp.float32) for h in (4, 2, 2))
    step = contiguous_step_input(np.arange(12), 0, page_size=8, num_pages=2)
    args = dict(sm_scale=0.25, sliding_window=None, backend=REFERENCE)
    one = spec.create(4)
    want = paged_attention(q, k, v, one.k[0], one.v[0], step, k_scale=one.k_scale[0], v_scale=one.v_scale[0],
                           **args)
    with jax.set_mesh(mesh):
        got = jax.jit(lambda c: paged_attention(q, k, v, c.k[0], c.v[0], step, k_scale=c.k_scale[0],
                                                v_scale=c.v_scale[0], **args))(cache)
    for w, g in zip(want, got):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=1e-5, atol=1e-6)
