"""The Mosaic GPU prefill kernel on CPU: its work list, its lowering for CUDA, its limits.

The kernel itself runs on the GPU (bench/kernels_mgpu.py checks it against the reference there). Here:
the work list that decides which rows each CTA loads and stores, the full Mosaic GPU lowering (traced
and lowered for "cuda" without a GPU: catches most kernel errors), and, opt-in because it takes minutes,
the kernel in Mosaic GPU's interpreter against the jnp reference (JPAGED_SLOW_INTERPRET=1).
"""
from __future__ import annotations

import os

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from pallas_kernels import ragged_paged_attention_mgpu as mgpu
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


def stored_rows(items: np.ndarray, block_t: int) -> dict[int, int]:
    """token -> seq for every row a compute warpgroup stores (-1 = zeros), as the kernel's `tile_range`."""
    rows: dict[int, int] = {}
    for seq, start, a, b, _ in items.tolist():
        for w in range(mgpu.NUM_COMPUTE_WGS):
            t0 = start + w * block_t
            for t in range(max(a, t0), min(b, t0 + block_t)):
                assert t not in rows, f"row {t} stored twice"
                rows[t] = seq
    return rows


MAX_SEQS, NUM_TOKENS = 6, 448           # fixed shapes: one compile of the work list per tile size
work_items = jax.jit(mgpu.work_items, static_argnums=(3, 4))


@SETTINGS
@given(q_lens=st.lists(st.integers(0, 70), min_size=MAX_SEQS, max_size=MAX_SEQS),
       num_seqs=st.integers(0, MAX_SEQS), group_p=st.sampled_from([1, 2, 4, 8]))
def test_work_items_store_every_row_once_with_its_sequence(q_lens, num_seqs, group_p):
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)   # padding: cu[num_seqs] .. NUM_TOKENS
    block_t = mgpu.ROWS // group_p
    kv_lens = jnp.asarray(np.array(q_lens) + 5, jnp.int32)
    items = np.asarray(work_items(jnp.asarray(cu), jnp.asarray(num_seqs, jnp.int32), kv_lens, NUM_TOKENS,
                                  2 * block_t))
    assert items.shape[0] == mgpu.max_work_items(NUM_TOKENS, MAX_SEQS, 2 * block_t)
    assert (items[:, 1] % mgpu.ROW_ALIGN == 0).all(), "q TMA rows must start on an 8-row tile"
    rows = stored_rows(items, block_t)
    assert sorted(rows) == list(range(NUM_TOKENS)), "every output row is written exactly once"
    for t, seq in rows.items():
        owner = int(np.searchsorted(cu[1:], t, side="right"))
        assert seq == (owner if owner < num_seqs else -1)


def test_work_items_put_the_longest_kv_ranges_first():
    cu = jnp.array([0, 64, 576], jnp.int32)                 # a 64-token chunk, then a 512-token prefill
    items = np.asarray(mgpu.work_items(cu, jnp.array(2, jnp.int32), jnp.array([4000, 512], jnp.int32),
                                       num_tokens=576, tokens_per_item=32))
    live = items[items[:, 0] >= 0]
    # The chunk at the end of a 4000-token context first (its last tile first), then the prefill's last tile.
    assert live[:3, :2].tolist() == [[0, 32], [0, 0], [1, 576 - 32]]
    assert (items[len(live):, 0] == -1).all()


def test_tile_shape_packs_the_group_into_64_rows():
    assert mgpu.tile_shape(32, 8) == (4, 4, 16)
    assert mgpu.tile_shape(6, 2) == (3, 4, 16)              # padded group
    assert mgpu.tile_shape(8, 8) == (1, 1, 64)


def _shapes(T, hq, hkv, d, page, S=3, P=6, N=30, dtype=jnp.bfloat16):
    sds = jax.ShapeDtypeStruct
    return (sds((T, hq, d), dtype), sds((N, page, hkv, d), dtype), sds((N, page, hkv, d), dtype),
            sds((S,), jnp.int32), sds((S, P), jnp.int32), sds((S + 1,), jnp.int32), sds((), jnp.int32))


@pytest.mark.parametrize("T,hq,hkv,d,page,block_kv", [
    (64, 32, 8, 128, 16, 128),      # the benchmark's shape family
    (37, 8, 8, 64, 64, 64),         # MHA, T not a multiple of 8, one page per kv block
    (24, 6, 2, 128, 32, 128),       # padded group (3 -> 4)
])
def test_kernel_lowers_for_cuda_without_a_gpu(T, hq, hkv, d, page, block_kv):
    config = mgpu.MosaicConfig(block_kv=block_kv)
    fn = jax.jit(lambda *a: mgpu.ragged_paged_attention_mgpu(*a, sm_scale=0.1, config=config))
    text = fn.trace(*_shapes(T, hq, hkv, d, page)).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("kwargs,match", [
    (dict(sliding_window=64), "sliding_window"),
    (dict(soft_cap=30.0), "soft_cap"),
    (dict(dtype=jnp.float32), "dtype"),
    (dict(d=256), "head_dim"),
    (dict(hq=32, hkv=2), "q heads per kv head"),
    (dict(page=4), "page_size"),
    (dict(config=mgpu.MosaicConfig(block_kv=128, num_stages=3)), "SMEM"),
])
def test_unsupported_inputs_raise_not_implemented(kwargs, match):
    shape = dict(T=16, hq=8, hkv=2, d=128, page=16, dtype=jnp.bfloat16)
    kwargs = dict(kwargs)
    call = {k: kwargs.pop(k) for k in ("sliding_window", "soft_cap", "config") if k in kwargs}
    shape.update(kwargs)
    args = [jnp.zeros(s.shape, s.dtype) for s in _shapes(**shape)]
    with pytest.raises(NotImplementedError, match=match):
        mgpu.ragged_paged_attention_mgpu(*args, sm_scale=0.1, **call)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("JPAGED_SLOW_INTERPRET"),
                    reason="minutes in Mosaic GPU's interpreter; set JPAGED_SLOW_INTERPRET=1")
def test_interpreted_kernel_matches_reference_on_a_poisoned_ragged_batch():
    from tests.kernels.test_ragged_paged_attention import NUM_PAGES, make_batch
    args = make_batch(np.random.default_rng(7), [5, 17, 0, 9], [3, 40, 7, 0], num_tokens=40, pages_per_seq=4,
                      page_size=16, hq=8, hkv=2, d=64, dtype=jnp.bfloat16, num_seqs_real=3)
    q, k, v, kv_lens, table, cu, num_seqs = args
    out = np.asarray(mgpu.ragged_paged_attention_mgpu(*args, sm_scale=0.125, interpret=True), np.float32)
    ref = ragged_paged_attention_reference(jnp.nan_to_num(q).astype(jnp.float32), k.astype(jnp.float32),
                                           v.astype(jnp.float32), kv_lens, jnp.clip(table, 0, NUM_PAGES - 1),
                                           cu, num_seqs, sm_scale=0.125)
    assert np.isfinite(out).all()
    assert (out[int(cu[int(num_seqs)]):] == 0).all()
    np.testing.assert_allclose(out, np.asarray(ref), rtol=3e-2, atol=3e-2)
