"""A mixed batch split over two kernels (pallas_kernels.mixed_batch): the decodes' rows from a decode-shaped
call, the rest from the prefill call, together equal to the reference over the whole batch."""
from __future__ import annotations

import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from pallas_kernels.mixed_batch import attend_mixed, decode_slots
from pallas_kernels.ragged_paged_attention_kernel import ragged_paged_attention_pallas
from tests.kernels.test_ragged_paged_attention import CASES, NUM_PAGES, SETTINGS, TOL, draw_mixed_batch, reference


def test_decode_slots_are_the_real_sequences_with_one_new_token():
    cu = jnp.array([0, 1, 4, 5, 5, 6], jnp.int32)          # q_lens 1, 3, 1, 0, 1; the last slot is not real
    assert decode_slots(cu, jnp.array(4, jnp.int32)).tolist() == [True, False, True, False, False]


def _poisoning_prefill(semantics):
    """The reference over the whole batch with the excluded sequences' rows set to NaN: those rows are
    undefined in the Mosaic kernel's output, so the split must overwrite every one of them."""
    def prefill(q, k, v, kv_lens, table, cu, num_seqs, exclude):
        out = reference(q, k, v, kv_lens, table, cu, num_seqs, **semantics)
        owner = jnp.searchsorted(cu[1:], jnp.arange(q.shape[0]), side="right")
        excluded = (owner < num_seqs) & exclude[jnp.minimum(owner, exclude.shape[0] - 1)]
        return jnp.where(excluded[:, None, None], jnp.nan, out)
    return prefill


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@SETTINGS
@given(data=st.data())
def test_decodes_split_off_to_the_decode_kernel_match_the_reference(case, data):
    _, _, _, d, _, dtype, window, cap = case
    args = draw_mixed_batch(data, case, num_slots=5, q_len_choices=[0, 1, 1, 1, 2, 9, 17], kv_extra_max=60,
                            num_tokens=64)
    q, k, v, kv_lens, table, cu, ns = args
    semantics = dict(sm_scale=d ** -0.5, sliding_window=window, soft_cap=cap)
    # The reference gathers every table entry: clip the garbage past each sequence's pages.
    safe = (q, k, v, kv_lens, jnp.clip(table, 0, NUM_PAGES - 1), cu, ns)
    decode = functools.partial(ragged_paged_attention_pallas, **semantics, interpret=True)
    out = jax.jit(lambda *a: attend_mixed(*a, prefill=_poisoning_prefill(semantics), decode=decode))(*safe)

    q_ref = jnp.where(jnp.isnan(q), 0, q).astype(jnp.float32)
    ref = reference(q_ref, k.astype(jnp.float32), v.astype(jnp.float32), *safe[3:], **semantics)
    out = np.asarray(out, np.float32)
    real = int(cu[int(ns)])
    assert not np.isnan(out[:real]).any(), "every decode row is overwritten by the decode kernel's"
    np.testing.assert_allclose(out[:real], np.asarray(ref)[:real], rtol=TOL[dtype], atol=TOL[dtype])
