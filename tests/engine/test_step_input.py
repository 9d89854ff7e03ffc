"""What the host hands the jitted step: its arrays travel as two flat buffers (every leaf comes back
unchanged and starts on a 256-byte boundary: Mosaic GPU kernels reject operands that XLA hands them as
unaligned slices), padded to a small set of token buckets."""
import jax
import numpy as np
import pytest

import pallas_kernels

from jpaged.engine import packing


def test_pack_round_trips_every_leaf_and_aligns_offsets():
    rng = np.random.default_rng(0)
    tree = dict(a=rng.integers(-5, 5, (3, 7)).astype(np.int32), b=rng.random(5).astype(np.float32),
                c=np.array([True, False, True]), d=np.int32(9), e=rng.integers(0, 2**32, 4, dtype=np.uint32),
                f=rng.integers(0, 9, 130).astype(np.int32))
    int_buf, float_buf, layout = packing.pack(tree)
    assert all(offset % packing.ALIGN == 0 for _, offset, _, _ in layout[1])
    out = jax.jit(packing.unpack, static_argnums=2)(int_buf, float_buf, layout)
    for key, value in tree.items():
        np.testing.assert_array_equal(np.asarray(out[key]), value)
        assert np.asarray(out[key]).dtype == np.asarray(value).dtype


def test_token_buckets_are_powers_of_four_from_4_to_256_then_powers_of_two():
    from jpaged.engine.model_runner import token_buckets

    assert token_buckets(2048) == [4, 16, 64, 256, 512, 1024, 2048]
    assert token_buckets(64) == [4, 16, 64]
    assert token_buckets(300) == [4, 16, 64, 256, 300]
    assert token_buckets(3) == [3]


def test_the_prefill_cap_rides_in_the_step_layout_and_an_over_cap_batch_is_refused(tiny_llama):
    """StepInput.max_prefill_seqs is static: it survives pack/unpack (a jit cache key, no buffer element)."""
    from jpaged.config import EngineConfig
    from jpaged.engine.model_runner import ModelRunner, SampleRow
    from jpaged.engine.scheduler import ScheduledSeq
    from jpaged.engine.sequence import Sequence
    from jpaged.sampling_params import SamplingParams

    _, model = tiny_llama
    config = EngineConfig(block_size=16, max_num_batched_tokens=64, max_num_seqs=8, max_num_prefill_seqs=2)
    runner = ModelRunner(config, model, spec=model.kv_cache_spec(16), backend=pallas_kernels.REFERENCE,
                         num_pages=32, max_model_len=128)
    seqs = [Sequence(i, f"r{i}", list(range(1, 6)), SamplingParams()) for i in range(3)]
    for i, seq in enumerate(seqs):
        seq.block_table = [i]
    entries = [ScheduledSeq(seq, 0, 5, num_samples=1) for seq in seqs]
    rows = [SampleRow(5 * i + 4, seq) for i, seq in enumerate(seqs)]
    step, _ = runner.build_step_input(entries[:2], rows[:2])
    assert step.max_prefill_seqs == 2
    int_buf, float_buf, layout = packing.pack(step)
    assert jax.jit(packing.unpack, static_argnums=2)(int_buf, float_buf, layout).max_prefill_seqs == 2
    with pytest.raises(ValueError, match="max_prefill_seqs"):
        runner.build_step_input(entries, rows)
