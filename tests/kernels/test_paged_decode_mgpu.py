"""The Mosaic GPU paged decode kernel on CPU: its lowering for CUDA, its limits, its token metadata, and
the kernel in Mosaic GPU's interpreter against the jnp reference.

The interpreter costs ~2.3 s per CTA (grid point) on 2 cores, whatever the context length, so the default
cases keep grids of 3-4 CTAs (one kv head, few tokens, long contexts); the larger mixes run with
JPAGED_SLOW_INTERPRET=1. On the GPU, bench/decode_mgpu.py checks the same cases, bigger.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import paged_decode_mgpu as dec
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference
from tests.kernels.test_ragged_paged_attention import NUM_PAGES, make_batch

SLOW = pytest.mark.skipif(not os.environ.get("JPAGED_SLOW_INTERPRET"),
                          reason="minutes in Mosaic GPU's interpreter; set JPAGED_SLOW_INTERPRET=1")


def _shapes(T, hq, hkv, d, page, S=None, P=6, N=30, dtype=jnp.bfloat16):
    sds = jax.ShapeDtypeStruct
    S = T if S is None else S
    return (sds((T, hq, d), dtype), sds((N, page, hkv, d), dtype), sds((N, page, hkv, d), dtype),
            sds((S,), jnp.int32), sds((S, P), jnp.int32), sds((S + 1,), jnp.int32), sds((), jnp.int32))


@pytest.mark.parametrize("T,hq,hkv,d,page,config", [
    (64, 32, 8, 128, 16, dec.DecodeConfig()),                                  # the engine's shape family
    (16, 32, 8, 128, 16, dec.DecodeConfig(num_kv_splits=4)),                   # flash-decoding + merge
    (7, 8, 8, 64, 64, dec.DecodeConfig(block_kv=128, num_stages=3)),           # MHA, 2 pages per block
    (5, 6, 2, 128, 8, dec.DecodeConfig(block_kv=64, num_stages=4, num_kv_splits=2)),  # group 3, Hq % 8 != 0
    (3, 32, 1, 128, 32, dec.DecodeConfig(block_kv=128)),                       # MQA 32:1
    (9, 64, 8, 64, 16, dec.DecodeConfig()),                                    # GQA 8
])
def test_kernel_lowers_for_cuda_without_a_gpu(T, hq, hkv, d, page, config):
    fn = jax.jit(lambda *a: dec.paged_decode_mgpu(*a, sm_scale=0.1, config=config))
    text = fn.trace(*_shapes(T, hq, hkv, d, page)).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_default_config_lowers_and_splits_only_to_fill_the_sms_once():
    fn = jax.jit(lambda *a: dec.paged_decode_mgpu(*a, sm_scale=0.1))
    text = fn.trace(*_shapes(16, 32, 8, 128, 16, P=512)).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    # The H100 sweep's picks: 16 x 8k -> 2 splits (256 CTAs), 256 x 512 -> 1, 1 x 32k -> 32 (256 CTAs of 8 blocks).
    assert dec.choose_config(16, 16, 512, 32, 8, 16) == dec.DecodeConfig(block_kv=128, num_stages=2, num_kv_splits=2)
    assert dec.choose_config(256, 256, 32, 32, 8, 16).num_kv_splits == 1
    assert dec.choose_config(1, 1, 2048, 32, 8, 16).num_kv_splits == 32
    assert dec.choose_config(1, 1, 4, 32, 8, 16).num_kv_splits == 1     # one block: nothing to split


def test_q_rows_cover_every_group_inside_its_tile():
    for hq, hkv in ((32, 8), (8, 8), (64, 8), (32, 1), (6, 2), (12, 4), (40, 8), (10, 1), (56, 1)):
        group, qrows = hq // hkv, dec.q_rows(hq, hkv)
        assert qrows % dec.ROW_ALIGN == 0 and qrows <= dec.ROWS, (hq, hkv)
        for t in range(9):
            for h in range(hkv):
                first = t * hq + h * group
                assert first % dec.ROW_ALIGN + group <= qrows, (hq, hkv, t, h)
    assert dec.q_rows(32, 8) == 8 and dec.q_rows(6, 2) == 16 and dec.q_rows(32, 1) == 32


def test_token_info_finds_each_tokens_sequence_and_kv_range():
    # slots: q_len 1, 0, 2 (a chunk), 1; num_seqs = 4 of S = 5; 2 padding tokens; garbage past num_seqs.
    cu = jnp.array([0, 1, 1, 3, 4, 99], jnp.int32)
    kv_lens = jnp.array([10, 7, 33, 16, 5], jnp.int32)
    info = np.asarray(dec.token_info(cu, jnp.array(4, jnp.int32), kv_lens, num_tokens=6, max_kv=64))
    assert info.tolist() == [[0, 10], [2, 32], [2, 33], [3, 16], [4, 0], [4, 0]]


@pytest.mark.parametrize("kwargs,match", [
    (dict(sliding_window=64), "sliding_window"),
    (dict(soft_cap=30.0), "soft_cap"),
    (dict(dtype=jnp.float32), "dtype"),
    (dict(d=256), "head_dim"),
    (dict(page=4), "page_size"),
    (dict(T=9), "prefill-shaped"),
    (dict(hq=72, hkv=1), "q heads per kv head"),
    (dict(config=dec.DecodeConfig(block_kv=256, num_stages=4)), "SMEM"),
])
def test_unsupported_inputs_raise_not_implemented(kwargs, match):
    shape = dict(T=8, hq=8, hkv=2, d=128, page=16, S=8, dtype=jnp.bfloat16)
    kwargs = dict(kwargs)
    call = {k: kwargs.pop(k) for k in ("sliding_window", "soft_cap", "config") if k in kwargs}
    shape.update(kwargs)
    args = [jnp.zeros(s.shape, s.dtype) for s in _shapes(**shape)]
    with pytest.raises(NotImplementedError, match=match):
        dec.paged_decode_mgpu(*args, sm_scale=0.1, **call)


def check_interpreted(seed, q_lens, kv_extra, *, num_tokens, pages_per_seq, page_size, hq, hkv, d,
                      num_seqs_real, config, tol=3e-2, kernel=dec.paged_decode_mgpu):
    """`kernel` (a decode kernel with `paged_decode_mgpu`'s signature) in the interpreter against the f32
    reference on a NaN-poisoned, shuffled pool with garbage table entries past each sequence's pages;
    padding rows must be exact zeros."""
    args = make_batch(np.random.default_rng(seed), q_lens, kv_extra, num_tokens=num_tokens,
                      pages_per_seq=pages_per_seq, page_size=page_size, hq=hq, hkv=hkv, d=d,
                      dtype=jnp.bfloat16, num_seqs_real=num_seqs_real)
    q, k, v, kv_lens, table, cu, num_seqs = args
    sm_scale = 1 / np.sqrt(d)
    out = np.asarray(kernel(*args, sm_scale=sm_scale, config=config, interpret=True), np.float32)
    ref = ragged_paged_attention_reference(jnp.nan_to_num(q).astype(jnp.float32), k.astype(jnp.float32),
                                           v.astype(jnp.float32), kv_lens, jnp.clip(table, 0, NUM_PAGES - 1),
                                           cu, num_seqs, sm_scale=sm_scale)
    assert np.isfinite(out).all()
    real = int(cu[int(num_seqs)])
    assert (out[real:] == 0).all(), "padding tokens must come out as exact zeros"
    np.testing.assert_allclose(out, np.asarray(ref), rtol=tol, atol=tol)


# Default cases: 3-4 CTAs each (~10 s). kv_lens = q_len + extra; none is a multiple of the page size
# except where named, so every last page has NaN-poisoned stale slots.
def test_interpreted_gqa4_q_len_mix_with_a_chunk_and_padding():
    # slots: q_len 1 (kv 46), 0 (kv 9, no token), 2 (a chunk: positions 98, 99 of 100), padding slot;
    # 4 tokens = 3 real + 1 padding; 2 blocks of 64 for the chunk, the second one masked.
    check_interpreted(1, [1, 0, 2, 0], [45, 9, 98, 3], num_tokens=4, pages_per_seq=7, page_size=16,
                      hq=4, hkv=1, d=64, num_seqs_real=3, config=dec.DecodeConfig())


def test_interpreted_gqa8_splits_with_an_empty_split():
    # 2 splits over kv 61 and 193 (1 and 4 blocks of 64): the short sequence's second split is empty.
    check_interpreted(2, [1, 1], [60, 192], num_tokens=2, pages_per_seq=13, page_size=16, hq=8, hkv=1,
                      d=64, num_seqs_real=2, config=dec.DecodeConfig(num_kv_splits=2))


def test_interpreted_group3_rows_off_the_8_row_grid():
    # Hq = 3, Hkv = 1: token t's rows 3t .. 3t + 2 start at tile offsets 0, 3, 6 (the last straddles two
    # 8-row tiles: qrows 16); page 8, 2 splits (the merge picks the rows at those offsets).
    check_interpreted(3, [1, 1, 1], [20, 70, 33], num_tokens=3, pages_per_seq=9, page_size=8, hq=3, hkv=1,
                      d=64, num_seqs_real=3, config=dec.DecodeConfig(num_kv_splits=2))


@pytest.mark.slow
@SLOW
@pytest.mark.parametrize("name,q_lens,kv_extra,T,P,page,hq,hkv,d,nreal,config", [
    ("mha_p32_d128", [1, 1, 0, 1], [100, 31, 4, 63], 4, 4, 32, 2, 2, 128, 3, dec.DecodeConfig()),
    ("gqa2_p8_stages3", [1, 1, 1], [7, 100, 64], 3, 13, 8, 4, 2, 64, 3,
     dec.DecodeConfig(num_stages=3)),
    ("gqa4_p64_bkv128_splits2", [1, 1, 1, 1], [300, 5, 127, 64], 4, 5, 64, 8, 2, 64, 3,
     dec.DecodeConfig(block_kv=128, num_kv_splits=2)),
    ("gqa8_padding_num_seqs_lt_S", [1, 1, 1, 1, 1], [200, 16, 1, 40, 3], 5, 14, 16, 16, 2, 64, 3,
     dec.DecodeConfig(num_kv_splits=4)),
    ("chunk_beside_decodes_stages4", [3, 1, 1, 0, 0], [60, 0, 47, 0, 0], 5, 5, 16, 8, 2, 64, 3,
     dec.DecodeConfig(num_stages=4)),
    ("mqa_8to1_pagefull", [1, 1], [31, 95], 2, 6, 16, 8, 1, 128, 2, dec.DecodeConfig(num_kv_splits=2)),
])
def test_interpreted_kernel_matches_reference_slow(name, q_lens, kv_extra, T, P, page, hq, hkv, d, nreal,
                                                   config):
    check_interpreted(11, q_lens, kv_extra, num_tokens=T, pages_per_seq=P, page_size=page, hq=hq,
                      hkv=hkv, d=d, num_seqs_real=nreal, config=config)
