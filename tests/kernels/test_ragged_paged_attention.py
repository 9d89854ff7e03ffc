"""The Pallas ragged paged attention kernel (interpret mode on CPU) against the jnp reference."""
from __future__ import annotations

import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention_kernel import (TuningConfig, choose_config,
                                                          ragged_paged_attention_pallas, work_items)

NUM_PAGES = 24
SETTINGS = settings(max_examples=3, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap"))
def reference(*args, sm_scale, sliding_window, soft_cap):
    return ragged_paged_attention_reference(*args, sm_scale=sm_scale, sliding_window=sliding_window,
                                            soft_cap=soft_cap)


def make_batch(rng, q_lens, kv_extra, *, num_tokens, pages_per_seq, page_size, hq, hkv, d, dtype,
               num_seqs_real):
    """A ragged batch over a shuffled pool; pages nobody uses (and stale slots) hold NaN."""
    num_slots = len(q_lens)
    q_lens = np.array([q if s < num_seqs_real else 0 for s, q in enumerate(q_lens)], np.int32)
    kv_lens = np.minimum(q_lens + np.array(kv_extra), pages_per_seq * page_size).astype(np.int32)
    q_lens = np.minimum(q_lens, kv_lens)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    assert cu[-1] <= num_tokens
    perm = rng.permutation(NUM_PAGES).astype(np.int32)
    table = rng.integers(-5, 10**6, (num_slots, pages_per_seq)).astype(np.int32)  # garbage past the end
    used, offset = [], 0
    for s in range(num_slots):
        n = -(-int(kv_lens[s]) // page_size)
        table[s, :n] = perm[offset:offset + n]
        used += list(perm[offset:offset + n])
        offset += n
    assert offset <= NUM_PAGES
    k = rng.standard_normal((NUM_PAGES, page_size, hkv, d)).astype(np.float32)
    v = rng.standard_normal((NUM_PAGES, page_size, hkv, d)).astype(np.float32)
    for page in set(range(NUM_PAGES)) - set(used):
        k[page], v[page] = np.nan, np.nan
    for s in range(num_slots):  # slots past kv_len in a sequence's last page are stale
        n, tail = divmod(int(kv_lens[s]), page_size)
        if tail:
            k[table[s, n], tail:], v[table[s, n], tail:] = np.nan, np.nan
    q = rng.standard_normal((num_tokens, hq, d)).astype(np.float32)
    q[cu[-1]:] = np.nan  # padding tokens may hold anything
    return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(kv_lens),
            jnp.asarray(table), jnp.asarray(cu),
            jnp.asarray(num_seqs_real, jnp.int32))


def check_against_reference(args, *, sm_scale, sliding_window, soft_cap, config, tol):
    q, k, v, kv_lens, table, cu, num_seqs = args
    safe_table = jnp.clip(table, 0, NUM_PAGES - 1)  # the reference gathers every table entry
    out = ragged_paged_attention_pallas(q, k, v, kv_lens, table, cu, num_seqs, sm_scale=sm_scale,
                                        sliding_window=sliding_window, soft_cap=soft_cap, config=config,
                                        interpret=True)
    q_ref = jnp.where(jnp.isnan(q), 0, q)
    ref = reference(q_ref.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), kv_lens,
                    safe_table, cu, num_seqs, sm_scale=sm_scale, sliding_window=sliding_window,
                    soft_cap=soft_cap)
    out, ref = np.asarray(out, np.float32), np.asarray(ref)
    assert not np.isnan(out).any()
    real = int(cu[int(num_seqs)])
    assert (out[real:] == 0).all(), "padding tokens must come out as zeros"
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol)


# (name, Hq, Hkv, D, page_size, dtype, window, soft_cap): MHA, GQA 3:1 (padded group), MQA, D 256, bf16.
CASES = [
    ("mha_d64_p16", 2, 2, 64, 16, jnp.float32, None, None),
    ("gqa3_d64_p32_window", 6, 2, 64, 32, jnp.float32, 37, None),
    ("mqa_d128_p16_softcap", 4, 1, 128, 16, jnp.float32, None, 3.0),
    ("gqa2_d256_p64_window_softcap", 4, 2, 256, 64, jnp.float32, 70, 5.0),
    ("gqa4_bf16_p16", 8, 2, 64, 16, jnp.bfloat16, None, None),
]
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def draw_mixed_batch(data, case, *, num_slots: int, q_len_choices, kv_extra_max: int, num_tokens: int):
    """A `make_batch` batch of the case's shape with hypothesis-drawn q lengths, prefixes and num_seqs."""
    _, hq, hkv, d, page_size, dtype, _, _ = case
    q_lens = data.draw(st.lists(st.sampled_from(q_len_choices), min_size=num_slots, max_size=num_slots))
    kv_extra = data.draw(st.lists(st.integers(0, kv_extra_max), min_size=num_slots, max_size=num_slots))
    num_seqs = data.draw(st.integers(1, num_slots))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    return make_batch(rng, q_lens, kv_extra, num_tokens=num_tokens, pages_per_seq=max(2, 96 // page_size),
                      page_size=page_size, hq=hq, hkv=hkv, d=d, dtype=dtype, num_seqs_real=num_seqs)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@SETTINGS
@given(data=st.data())
def test_mixed_prefill_and_decode_batch_matches_reference(case, data):
    _, _, _, d, _, dtype, window, cap = case
    args = draw_mixed_batch(data, case, num_slots=4, q_len_choices=[0, 1, 1, 2, 5, 9, 17], kv_extra_max=70,
                            num_tokens=72)
    config = TuningConfig(block_q=4, pages_per_block=2)
    check_against_reference(args, sm_scale=d ** -0.5, sliding_window=window, soft_cap=cap, config=config,
                            tol=TOL[dtype])


@pytest.mark.parametrize("case", CASES[:3] + CASES[4:], ids=[c[0] for c in CASES[:3] + CASES[4:]])
@SETTINGS
@given(data=st.data())
def test_decode_split_over_kv_matches_reference(case, data):
    _, hq, hkv, d, page_size, dtype, window, cap = case
    pages_per_seq = max(2, 96 // page_size)
    kv_extra = data.draw(st.lists(st.integers(0, 95), min_size=4, max_size=4))
    num_seqs = data.draw(st.integers(1, 4))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    args = make_batch(rng, [1, 1, 1, 1], kv_extra, num_tokens=4, pages_per_seq=pages_per_seq,
                      page_size=page_size, hq=hq, hkv=hkv, d=d, dtype=dtype, num_seqs_real=num_seqs)
    config = TuningConfig(block_q=1, pages_per_block=1, num_kv_splits=3)
    check_against_reference(args, sm_scale=0.3, sliding_window=window, soft_cap=cap, config=config,
                            tol=TOL[dtype])


def test_default_config_decode_batch_uses_split_kv_and_matches_reference():
    config = choose_config(num_tokens=2, num_seqs=2, pages_per_seq=6, num_q_heads=4, num_kv_heads=2,
                           page_size=16)
    assert config.block_q == 1 and config.num_kv_splits > 1
    args = make_batch(np.random.default_rng(0), [1, 1], [90, 13], num_tokens=2, pages_per_seq=6,
                      page_size=16, hq=4, hkv=2, d=64, dtype=jnp.float32, num_seqs_real=2)
    check_against_reference(args, sm_scale=0.125, sliding_window=None, soft_cap=None, config=None,
                            tol=2e-5)


# The decode path (block_q == 1): one program per token finds its own sequence, reads q, the page table
# and K/V with masked loads and stores its rows; split kv goes through the merge kernel.
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@SETTINGS
@given(data=st.data())
def test_decode_path_q_len_mixes_padding_and_splits_match_reference(case, data):
    _, hq, hkv, d, page_size, dtype, window, cap = case
    pages_per_seq = max(2, 96 // page_size)
    num_slots = 6
    # Mostly decodes (q_len 1), empty slots (q_len 0) and now and then a short chunk: T <= S still.
    q_lens = data.draw(st.lists(st.sampled_from([0, 1, 1, 1, 2, 3]), min_size=num_slots, max_size=num_slots))
    kv_extra = data.draw(st.lists(st.integers(0, 95), min_size=num_slots, max_size=num_slots))
    num_seqs = data.draw(st.integers(0, num_slots))
    real = sum(q_lens[:num_seqs])
    num_tokens = data.draw(st.integers(max(1, real), max(num_slots, real)))  # padding tokens after the real ones
    config = TuningConfig(block_q=1, pages_per_block=data.draw(st.sampled_from([1, 2, 4])),
                          num_kv_splits=data.draw(st.sampled_from([1, 2, 3, 4])))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    args = make_batch(rng, q_lens, kv_extra, num_tokens=num_tokens, pages_per_seq=pages_per_seq,
                      page_size=page_size, hq=hq, hkv=hkv, d=d, dtype=dtype, num_seqs_real=num_seqs)
    check_against_reference(args, sm_scale=d ** -0.5, sliding_window=window, soft_cap=cap, config=config,
                            tol=TOL[dtype])


def test_decode_path_serves_prefill_chunks_token_by_token():
    """block_q=1 on a prefill-shaped batch (T > S): per-token programs with causal positions."""
    args = make_batch(np.random.default_rng(3), [9, 0, 17, 1], [5, 30, 0, 60], num_tokens=30,
                      pages_per_seq=6, page_size=16, hq=4, hkv=2, d=64, dtype=jnp.float32, num_seqs_real=4)
    check_against_reference(args, sm_scale=0.125, sliding_window=20, soft_cap=None,
                            config=TuningConfig(block_q=1, pages_per_block=2, num_kv_splits=2), tol=2e-5)


@pytest.mark.parametrize("splits, launches", [(1, 1), (4, 2)])
def test_decode_path_lowers_to_its_kernels_and_nothing_else(splits, launches):
    """No work list, padding copy, zeroed output or scatter around the decode kernel(s) (CUDA lowering)."""
    shape = lambda *dims, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(dims, dtype)
    args = (shape(64, 32, 128), shape(512, 16, 8, 128), shape(512, 16, 8, 128), shape(64, dtype=jnp.int32),
            shape(64, 32, dtype=jnp.int32), shape(65, dtype=jnp.int32), shape(dtype=jnp.int32))
    fn = jax.jit(functools.partial(ragged_paged_attention_pallas, sm_scale=0.1,
                                   config=TuningConfig(block_q=1, pages_per_block=4, num_kv_splits=splits)))
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    ops = {line.split("=", 1)[1].split()[0] for line in text.splitlines() if "= stablehlo." in line}
    assert text.count("@__gpu$xla.gpu.triton") == launches
    assert ops <= {"stablehlo.reshape", "stablehlo.custom_call", "stablehlo.convert"}, ops


@pytest.mark.parametrize("tokens, pages", [(1, 32), (1, 2048), (16, 32), (16, 512), (64, 128), (256, 32),
                                           (256, 128), (3, 5)])
def test_choose_config_decode_splits_are_powers_of_two_within_the_kv_blocks(tokens, pages):
    """Any decode shape: a power-of-two split count, never more splits than kv blocks."""
    config = choose_config(num_tokens=tokens, num_seqs=tokens, pages_per_seq=pages, num_q_heads=32,
                           num_kv_heads=8, page_size=16)
    splits = config.num_kv_splits
    assert config.block_q == 1 and splits & (splits - 1) == 0
    assert splits <= -(-pages // config.pages_per_block)


@pytest.mark.parametrize("batch, ctx, splits", [(16, 512, 2), (16, 8192, 4), (64, 512, 1), (64, 2048, 1),
                                                (128, 1024, 1), (256, 512, 1), (256, 1024, 1), (256, 2048, 1),
                                                (1, 512, 8), (1, 32768, 64)])
def test_choose_config_follows_the_h100_decode_sweep(batch, ctx, splits):
    """bench/results/kernels_h100_v4.json: 64-token blocks, 4 warps, 2 stages; the split counts below
    (16 x 512 ran 2.0 TB/s chained at 2 splits against 1.1 at 4; 64..256 seqs: 1 split within 2.4 %)."""
    config = choose_config(num_tokens=batch, num_seqs=batch, pages_per_seq=ctx // 16, num_q_heads=32,
                           num_kv_heads=8, page_size=16)
    assert (config.pages_per_block, config.num_kv_splits, config.num_warps, config.num_stages) == (4, splits, 4, 2)


def test_work_items_cover_each_sequence_in_blocks_and_pad_with_minus_one():
    cu = jnp.array([0, 5, 5, 6, 14], jnp.int32)       # q_lens 5, 0, 1, 8
    seq, start = work_items(cu, jnp.array(4, jnp.int32), num_tokens=16, block_q=4)
    items = [(int(s), int(t)) for s, t in zip(seq, start) if s >= 0]
    assert items == [(0, 0), (0, 4), (2, 5), (3, 6), (3, 10)]
    assert (np.asarray(seq)[len(items):] == -1).all()


def test_num_seqs_excludes_trailing_sequences_from_work():
    cu = jnp.array([0, 3, 7], jnp.int32)
    seq, _ = work_items(cu, jnp.array(1, jnp.int32), num_tokens=8, block_q=2)
    assert sorted(set(np.asarray(seq).tolist())) == [-1, 0]


def test_unsupported_head_dim_raises_not_implemented():
    q = jnp.zeros((4, 2, 48), jnp.float32)
    pages = jnp.zeros((4, 16, 2, 48), jnp.float32)
    ints = jnp.zeros((1,), jnp.int32)
    with pytest.raises(NotImplementedError, match="head_dim"):
        ragged_paged_attention_pallas(q, pages, pages, ints, jnp.zeros((1, 2), jnp.int32),
                                      jnp.zeros((2,), jnp.int32), jnp.array(1, jnp.int32), sm_scale=1.0,
                                      interpret=True)


@pytest.mark.parametrize("bad, match", [
    (dict(q=jnp.zeros((4, 3, 64))), "multiple of kv heads"),
    (dict(kv_lens=jnp.zeros((2,), jnp.int32)), "kv_lens"),
    (dict(cu_q_lens=jnp.zeros((3,), jnp.float32)), "cu_q_lens"),
    (dict(v_pages=jnp.zeros((4, 16, 2, 32))), "k_pages and v_pages"),
])
def test_bad_operands_raise_value_error_naming_them(bad, match):
    args = dict(q=jnp.zeros((4, 4, 64)), k_pages=jnp.zeros((4, 16, 2, 64)), v_pages=jnp.zeros((4, 16, 2, 64)),
                kv_lens=jnp.zeros((1,), jnp.int32), page_table=jnp.zeros((1, 2), jnp.int32),
                cu_q_lens=jnp.zeros((2,), jnp.int32), num_seqs=jnp.array(1, jnp.int32))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        ragged_paged_attention_pallas(**args, sm_scale=1.0, interpret=True)


@pytest.mark.parametrize("kwargs", [dict(block_q=3, pages_per_block=1), dict(block_q=4, pages_per_block=1,
                                    num_kv_splits=2), dict(block_q=1, pages_per_block=1, num_kv_splits=0)])
def test_tuning_config_rejects_invalid_launch_shapes(kwargs):
    with pytest.raises(ValueError):
        TuningConfig(**kwargs)
