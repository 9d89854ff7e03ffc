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
work_items = jax.jit(mgpu.work_items, static_argnums=(3, 4, 7))


@SETTINGS
@given(q_lens=st.lists(st.integers(0, 70), min_size=MAX_SEQS, max_size=MAX_SEQS),
       num_seqs=st.integers(0, MAX_SEQS), group_p=st.sampled_from([1, 2, 4, 8]),
       exclude=st.none() | st.lists(st.booleans(), min_size=MAX_SEQS, max_size=MAX_SEQS),
       bounded=st.booleans())
def test_work_items_store_every_row_once_with_its_sequence(q_lens, num_seqs, group_p, exclude, bounded):
    """...and store no row of an excluded sequence (mixed batches: those rows come from the decode kernel),
    also when the list is sized by the tightest bound on the computed sequences (`max_seqs`)."""
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)   # padding: cu[num_seqs] .. NUM_TOKENS
    block_t = mgpu.ROWS // group_p
    kv_lens = jnp.asarray(np.array(q_lens) + 5, jnp.int32)
    computed = sum(q_lens[s] > 0 and not (exclude and exclude[s]) for s in range(num_seqs))
    max_seqs = computed if bounded else None
    items = np.asarray(work_items(jnp.asarray(cu), jnp.asarray(num_seqs, jnp.int32), kv_lens, NUM_TOKENS,
                                  2 * block_t, None, None if exclude is None else jnp.asarray(exclude), max_seqs))
    assert items.shape[0] == mgpu.max_work_items(NUM_TOKENS, computed if bounded else MAX_SEQS, 2 * block_t)
    assert (items[:, 1] % mgpu.ROW_ALIGN == 0).all(), "q TMA rows must start on an 8-row tile"
    rows = stored_rows(items, block_t)
    owners = np.searchsorted(cu[1:], np.arange(NUM_TOKENS), side="right")
    skipped = [t for t, owner in enumerate(owners) if exclude is not None and owner < num_seqs and exclude[owner]]
    assert sorted(rows) == sorted(set(range(NUM_TOKENS)) - set(skipped)), "every other row written exactly once"
    for t, seq in rows.items():
        assert seq == (owners[t] if owners[t] < num_seqs else -1)


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


@pytest.mark.parametrize("T,hq,hkv,d,page,block_kv,window,cap", [
    (64, 32, 8, 128, 16, 128, 8, None),      # window smaller than a page and a block
    (64, 32, 8, 128, 16, 128, 300, None),    # window cutting across several blocks
    (37, 8, 8, 64, 64, 64, 4096, None),      # window larger than the context (P * page = 384)
    (64, 32, 8, 128, 16, 128, None, 30.0),   # soft-cap alone
    (24, 6, 2, 128, 32, 64, 100, 50.0),      # both, padded group
])
def test_kernel_lowers_for_cuda_with_window_and_soft_cap(T, hq, hkv, d, page, block_kv, window, cap):
    config = mgpu.MosaicConfig(block_kv=block_kv)
    fn = jax.jit(lambda *a: mgpu.ragged_paged_attention_mgpu(*a, sm_scale=0.1, sliding_window=window,
                                                             soft_cap=cap, config=config))
    text = fn.trace(*_shapes(T, hq, hkv, d, page)).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_the_mixed_split_lowers_for_cuda_with_a_static_prefill_bound():
    """The engine's mixed step: decodes to the decode kernel, the rest to the Mosaic kernel, whose work
    list is sized by StepInput.max_prefill_seqs (a static argument all the way down)."""
    import pallas_kernels

    fn = jax.jit(lambda *a: pallas_kernels.ragged_paged_attention(*a, sm_scale=0.1,
                                                                  backend=pallas_kernels.PRESETS["mosaic"],
                                                                  max_prefill_seqs=2))
    text = fn.trace(*_shapes(64, 32, 8, 128, 16)).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_window_and_soft_cap_are_supported_and_checked():
    q, k = _shapes(16, 8, 2, 128, 16)[:2]
    assert mgpu.unsupported_reason(q, k, sliding_window=64, soft_cap=30.0) is None
    assert "sliding_window" in mgpu.unsupported_reason(q, k, sliding_window=0)
    assert "soft_cap" in mgpu.unsupported_reason(q, k, soft_cap=0.0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sliding_window=0), "sliding_window"),
    (dict(soft_cap=-1.0), "soft_cap"),
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


# --- sliding window and soft-cap in the interpreter ----------------------------------------------------

def window_batch(seed, q_lens, kv_lens, *, num_tokens, window, page=16, hq=4, hkv=1, d=64, num_seqs=None,
                 dtype=jnp.bfloat16):
    """A ragged batch over a shuffled NaN-poisoned pool, as a block manager with a window leaves it:
    pages wholly before the window of each sequence's first new token are freed (NaN in the pool, garbage
    in the table), as are unused pages; stale slots past kv_len hold NaN, padding tokens NaN."""
    rng = np.random.default_rng(seed)
    num_slots = len(q_lens)
    num_seqs = num_slots if num_seqs is None else num_seqs
    q_lens, kv_lens = np.asarray(q_lens), np.asarray(kv_lens)
    pages = -(-kv_lens // page)
    num_pages = int(pages.sum()) + 3
    perm = rng.permutation(num_pages).astype(np.int32)
    table = rng.integers(-5, 10**6, (num_slots, max(1, int(pages.max())))).astype(np.int32)
    k = rng.standard_normal((num_pages, page, hkv, d)).astype(np.float32)
    v = rng.standard_normal((num_pages, page, hkv, d)).astype(np.float32)
    used, offset = [], 0
    for s in range(num_slots):
        first = 0 if window is None else max(int(kv_lens[s] - q_lens[s]) - window + 1, 0) // page
        n = int(pages[s]) - first
        table[s, first:first + n] = perm[offset:offset + n]
        used += list(perm[offset:offset + n])
        offset += n
    for p in set(range(num_pages)) - set(used):
        k[p], v[p] = np.nan, np.nan
    for s in range(num_slots):
        n, tail = divmod(int(kv_lens[s]), page)
        if tail:
            k[table[s, n], tail:], v[table[s, n], tail:] = np.nan, np.nan
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    assert cu[-1] <= num_tokens
    q = rng.standard_normal((num_tokens, hq, d)).astype(np.float32)
    q[cu[num_seqs]:] = np.nan
    return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(kv_lens, jnp.int32),
            jnp.asarray(table), jnp.asarray(cu), jnp.asarray(num_seqs, jnp.int32))


def check_interpreted(args, *, window, cap, config, live_items_only: bool, sm_scale=0.125):
    """The kernel in Mosaic GPU's interpreter against the f32 reference: finite, padding rows exactly 0.

    live_items_only: run `launch` on the work list without its trailing dead items (they store nothing;
    each costs seconds in the interpreter); else the public entry point."""
    q, k, v, kv_lens, table, cu, num_seqs = args
    if live_items_only:
        _, _, block_t = mgpu.tile_shape(q.shape[1], k.shape[2])
        items = np.asarray(mgpu.work_items(cu, num_seqs, kv_lens, q.shape[0], mgpu.NUM_COMPUTE_WGS * block_t,
                                           window))
        items = items[(items[:, 0] >= 0) | (items[:, 3] > items[:, 2])]   # padding items stay
        out = mgpu.launch(jnp.asarray(items), table, q, k, v, sm_scale=sm_scale, config=config, interpret=True,
                          sliding_window=window, soft_cap=cap)
    else:
        out = mgpu.ragged_paged_attention_mgpu(*args, sm_scale=sm_scale, sliding_window=window, soft_cap=cap,
                                               config=config, interpret=True)
    out = np.asarray(out, np.float32)
    ref = ragged_paged_attention_reference(jnp.nan_to_num(q).astype(jnp.float32), k.astype(jnp.float32),
                                           v.astype(jnp.float32), kv_lens, jnp.clip(table, 0, k.shape[0] - 1),
                                           cu, num_seqs, sm_scale=sm_scale, sliding_window=window, soft_cap=cap)
    real = int(cu[int(num_seqs)])
    assert np.isfinite(out).all()
    assert (out[real:] == 0).all()
    np.testing.assert_allclose(out[:real], np.asarray(ref)[:real], rtol=3e-2, atol=3e-2)


@pytest.mark.long  # Mosaic interpreter; the plain interpreted cases stay in the short profile
def test_interpreted_kernel_matches_reference_with_window_and_soft_cap():
    """~25 s: 4 CTAs. GQA 4, block_kv 64, window 150, cap 20. Sequence 0 (positions 272..300): its first tile
    takes blocks 1-2 masked (window edge), 3 unmasked, 4 masked (diagonal); its second tile skips block 1;
    pages 0-6 are freed (4-6 sit in block 1 beside live page 7). Sequence 1 starts at token 29 (off the
    8-row grid, positions 48..79): a tile inside block 0 skips block 1. Then 5 padding tokens."""
    args = window_batch(1, [29, 32], [301, 80], num_tokens=66, window=150)
    check_interpreted(args, window=150, cap=20.0, config=mgpu.MosaicConfig(block_kv=64), live_items_only=True)


SLOW_WINDOW_CASES = [
    # q_lens, kv_lens, num_tokens, window, cap, batch kwargs, block_kv
    ([20, 9, 33], [300, 140, 33], 70, 8, None, {}, 64),            # window < page < block, fresh prefill
    ([40, 17], [130, 200], 64, 70, 30.0, dict(hq=8, hkv=2), 128),  # GQA 4 x 2 kv heads, window across blocks
    ([12, 30], [100, 30], 48, 4096, None, dict(hq=6, hkv=2, page=32), 64),  # window > context, padded group
    ([21, 5], [90, 200], 32, None, 5.0, dict(hq=8, hkv=8), 64),    # soft-cap alone, MHA
    ([16, 7], [500, 7], 30, 64, 30.0, dict(hq=8, hkv=1, num_seqs=1), 64),  # GQA 8, num_seqs < S, padding
]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("JPAGED_SLOW_INTERPRET"),
                    reason="minutes in Mosaic GPU's interpreter; set JPAGED_SLOW_INTERPRET=1")
@pytest.mark.parametrize("case", range(len(SLOW_WINDOW_CASES)))
def test_interpreted_kernel_matches_reference_with_window_or_soft_cap_slow(case):
    q_lens, kv_lens, num_tokens, window, cap, kw, block_kv = SLOW_WINDOW_CASES[case]
    args = window_batch(10 + case, q_lens, kv_lens, num_tokens=num_tokens, window=window, **kw)
    check_interpreted(args, window=window, cap=cap, config=mgpu.MosaicConfig(block_kv=block_kv),
                      live_items_only=False)


def test_work_items_with_a_window_cap_the_cost_but_keep_the_items():
    cu = jnp.array([0, 64, 576], jnp.int32)                 # a 64-token chunk at ctx 4000, a 512-token prefill
    args = (cu, jnp.array(2, jnp.int32), jnp.array([4000, 512], jnp.int32))
    plain = np.asarray(mgpu.work_items(*args, num_tokens=576, tokens_per_item=32))
    windowed = np.asarray(mgpu.work_items(*args, num_tokens=576, tokens_per_item=32, sliding_window=64))
    assert sorted(map(tuple, plain.tolist())) == sorted(map(tuple, windowed.tolist()))
    # Heaviest first, the kv range capped at window + tokens per item (ties keep the plain order).
    seq, start, a, b, kv = windowed.T
    cost = np.where(seq >= 0, np.minimum(kv - (b - a) + np.minimum(b, start + 32) - a, 64 + 32), -1)
    assert (np.diff(cost) <= 0).all()
    assert cost[0] == 96 and (cost == 96).sum() > 2, "the 4000-token context no longer outranks the rest"
