"""The narrow (persistent, swap-AB) Mosaic GPU decode kernel on CPU: its lowering for CUDA, its limits, and
the kernel in Mosaic GPU's interpreter against the jnp reference.

The interpreter's cost grows with the CTAs, so the cases run 2-3 persistent CTAs over many work items
(token x kv head): items follow each other through one ring of SMEM slots, which is what the device
kernel does at 16-132 CTAs. bench/decode_narrow.py checks the same kernel on the GPU, bigger.
"""
from __future__ import annotations

import os

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import pytest
from hypothesis import HealthCheck, given, settings

from pallas_kernels import paged_decode_narrow_mgpu as nd
from tests.kernels.test_paged_decode_mgpu import _shapes
from tests.kernels.test_paged_decode_mgpu import check_interpreted as decode_mgpu_check


@pytest.mark.parametrize("T,hq,hkv,d,page,config", [
    (64, 32, 8, 128, 16, nd.NarrowDecodeConfig()),                      # the engine's shape, one CTA per SM
    (64, 32, 8, 128, 16, nd.NarrowDecodeConfig(num_ctas=16, num_stages=6)),  # beside a GEMM
    (9, 64, 8, 64, 16, nd.NarrowDecodeConfig(num_ctas=4)),              # GQA 8, head_dim 64
    (5, 6, 2, 128, 8, nd.NarrowDecodeConfig(num_ctas=3, num_stages=2)),  # group 3, Hq % 8 != 0, page 8
    (7, 8, 8, 128, 64, nd.NarrowDecodeConfig(num_ctas=5)),              # MHA, page 64 = one block
    (64, 32, 8, 128, 16, nd.NarrowDecodeConfig(num_ctas=16, num_stages=3, block_kv=128)),  # M = 128 blocks
])
def test_kernel_lowers_for_cuda_without_a_gpu(T, hq, hkv, d, page, config):
    fn = jax.jit(lambda *a: nd.paged_decode_narrow(*a, sm_scale=0.1, config=config))
    text = fn.trace(*_shapes(T, hq, hkv, d, page)).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("kwargs,match", [
    (dict(sliding_window=64), "sliding_window"),
    (dict(soft_cap=30.0), "soft_cap"),
    (dict(dtype=jnp.float32), "dtype"),
    (dict(d=256), "head_dim"),
    (dict(page=128), "page_size"),
    (dict(T=9), "prefill-shaped"),
    (dict(hq=32, hkv=1), "q heads per kv head"),
    (dict(hq=12, hkv=1), "q heads per kv head"),       # group 12 from an offset up to 7: 19 > 16 columns
    (dict(config=nd.NarrowDecodeConfig(num_stages=7)), "SMEM"),
    (dict(config=nd.NarrowDecodeConfig(num_pipes=2)), "num_pipes"),   # wrong on the H200 so far
])
def test_unsupported_inputs_raise_not_implemented(kwargs, match):
    shape = dict(T=8, hq=8, hkv=2, d=128, page=16, S=8, dtype=jnp.bfloat16)
    kwargs = dict(kwargs)
    call = {k: kwargs.pop(k) for k in ("sliding_window", "soft_cap", "config") if k in kwargs}
    shape.update(kwargs)
    args = [jnp.zeros(s.shape, s.dtype) for s in _shapes(**shape)]
    with pytest.raises(NotImplementedError, match=match):
        nd.paged_decode_narrow(*args, sm_scale=0.1, **call)


def test_config_rejects_nonsense():
    with pytest.raises(ValueError, match="num_ctas"):
        nd.NarrowDecodeConfig(num_ctas=0)
    with pytest.raises(ValueError, match="num_stages"):
        nd.NarrowDecodeConfig(num_stages=1)
    with pytest.raises(ValueError, match="block_kv"):
        nd.NarrowDecodeConfig(block_kv=32)
    with pytest.raises(ValueError, match="num_pipes"):
        nd.NarrowDecodeConfig(num_pipes=3)
    with pytest.raises(ValueError, match="probe"):
        nd.NarrowDecodeConfig(probe="fast")


def check_interpreted(*args, **kwargs):
    """test_paged_decode_mgpu's check (NaN-poisoned shuffled pool, f32 reference, padding rows exact zeros)
    with this kernel."""
    decode_mgpu_check(*args, kernel=nd.paged_decode_narrow, **kwargs)


def test_interpreted_q_len_mix_with_a_chunk_and_padding_on_two_ctas():
    # slots: q_len 1 (kv 46), 0, 2 (a chunk ending at 100: 2 blocks of 64, the second masked), padding;
    # 4 tokens = 3 real + 1 padding over 2 CTAs, 2 slots in the ring (wraps within and across items).
    check_interpreted(1, [1, 0, 2, 0], [45, 9, 98, 3], num_tokens=4, pages_per_seq=7, page_size=16,
                      hq=4, hkv=1, d=64, num_seqs_real=3, config=nd.NarrowDecodeConfig(num_ctas=2, num_stages=2))


def test_interpreted_group3_columns_off_the_8_row_grid_page8():
    # Hq 6 / Hkv 2: group 3, items' q columns start at tile offsets 0, 3, 6, 1, ... (Hq % 8 != 0).
    check_interpreted(3, [1, 1, 1], [20, 70, 33], num_tokens=3, pages_per_seq=9, page_size=8, hq=6, hkv=2,
                      d=64, num_seqs_real=3, config=nd.NarrowDecodeConfig(num_ctas=2, num_stages=3))


# The interpreter runs each warpgroup as a thread whose XLA computation blocks in callbacks; with fewer CPU
# cores than warpgroups (2 pipes = 4), a compute warpgroup can hold a core while its memory warpgroup waits
# for one: seen hanging on 2 cores. bench/decode_narrow.py checks 2 pipes on the GPU.
MANY_CORES = pytest.mark.skipif((os.cpu_count() or 1) < 4, reason="4 warpgroup threads need >= 4 cores")


@MANY_CORES
def test_interpreted_two_pipelines_per_cta_some_without_items():
    # 3 tokens x 1 kv head over 2 CTAs x 2 pipes: 4 workers for 3 items, the last worker has none.
    check_interpreted(5, [1, 1, 1], [90, 17, 64], num_tokens=3, pages_per_seq=7, page_size=16, hq=4, hkv=1,
                      d=64, num_seqs_real=3, config=nd.NarrowDecodeConfig(num_ctas=2, num_stages=2, num_pipes=2))


def test_interpreted_128_token_blocks_over_a_ring_of_two():
    # kv 200 and 129: 2 blocks of 128 each, the last masked (and its stale V rows zeroed); 2 CTAs, 2 slots.
    check_interpreted(4, [1, 1, 1], [199, 128, 5], num_tokens=3, pages_per_seq=13, page_size=16, hq=8, hkv=2,
                      d=64, num_seqs_real=3, config=nd.NarrowDecodeConfig(num_ctas=2, num_stages=2, block_kv=128))


SETTINGS = settings(max_examples=4, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@SETTINGS
@given(data=st.data())
def test_interpreted_random_decode_batches_match_reference(data):
    """Random GQA ratio, page size, kv lengths (off the page grid), padding slots and tokens, CTAs, stages."""
    hq, hkv = data.draw(st.sampled_from([(4, 1), (8, 2), (2, 2), (16, 2)]))
    page = data.draw(st.sampled_from([8, 16, 32]))
    slots = data.draw(st.integers(1, 3))
    kv_extra = data.draw(st.lists(st.integers(0, 8 * page - 2), min_size=slots, max_size=slots))  # <= 8 pages
    num_seqs = data.draw(st.integers(1, slots))
    pad = data.draw(st.integers(0, 1))
    config = nd.NarrowDecodeConfig(num_ctas=data.draw(st.integers(1, 3)), num_stages=data.draw(st.integers(2, 4)),
                                   num_pipes=data.draw(st.integers(1, 2)) if (os.cpu_count() or 1) >= 4 else 1)
    # a padding token needs a slot of its own (T <= S): an empty one past the real sequences
    check_interpreted(data.draw(st.integers(0, 2**31)), [1] * slots + [0] * pad, kv_extra + [0] * pad,
                      num_tokens=slots + pad,
                      pages_per_seq=8, page_size=page, hq=hq, hkv=hkv, d=64,
                      num_seqs_real=num_seqs, config=config)
