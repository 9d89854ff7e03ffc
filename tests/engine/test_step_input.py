"""What the host hands the jitted step: its arrays travel as two flat buffers (every leaf comes back
unchanged and starts on a 256-byte boundary: Mosaic GPU kernels reject operands that XLA hands them as
unaligned slices), padded to a small set of token buckets."""
import jax
import numpy as np

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
