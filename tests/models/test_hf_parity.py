"""Every model family matches HF transformers: logits (fp32 and bf16) and greedy continuations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.kv_cache import contiguous_step_input
from tests.hf_reference import FAMILIES, hf_greedy, hf_logits, jpaged_from_hf, tiny_hf_model

PAGE = 16


def jpaged_logits(model, ids, chunks=(None,)):
    """All-position logits, computing the prompt in the given chunk boundaries (prefill then more)."""
    num_pages = -(-len(ids) // PAGE) + 1
    cache = model.new_kv_cache(num_pages=num_pages, page_size=PAGE)
    out, start = [], 0
    for end in [*(c for c in chunks if c is not None), len(ids)]:
        logits, cache = model(cache, contiguous_step_input(ids[start:end], start, PAGE, num_pages, all_logits=True))
        out.append(np.asarray(logits))
        start = end
    return np.concatenate(out)


def jpaged_greedy(model, ids, num_new):
    num_pages = -(-(len(ids) + num_new) // PAGE)
    cache = model.new_kv_cache(num_pages=num_pages, page_size=PAGE)
    step = jax.jit(lambda m, c, s: m(c, s))
    logits, cache = model(cache, contiguous_step_input(ids, 0, PAGE, num_pages))
    tokens = [int(jnp.argmax(logits[-1]))]
    for i in range(num_new - 1):
        logits, cache = step(model, cache, contiguous_step_input([tokens[-1]], len(ids) + i, PAGE, num_pages))
        tokens.append(int(jnp.argmax(logits[-1])))
    return tokens


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fp32_logits_match_hf(family):
    hf = tiny_hf_model(family)
    model = jpaged_from_hf(hf)
    ids = np.random.RandomState(1).randint(0, 256, size=50)
    ref = hf_logits(hf, ids)
    np.testing.assert_allclose(jpaged_logits(model, ids), ref, atol=1e-4, rtol=0)
    # The same logits when the prompt arrives in chunks over the paged cache (chunked prefill).
    np.testing.assert_allclose(jpaged_logits(model, ids, chunks=(7, 16, 33)), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_continuation_matches_hf(family):
    hf = tiny_hf_model(family, seed=3)
    model = jpaged_from_hf(hf)
    ids = np.random.RandomState(2).randint(0, 256, size=19)
    assert jpaged_greedy(model, ids, 32) == hf_greedy(hf, ids, 32)


def test_mistral_window_shorter_than_sequence_changes_logits():
    """The window matters at this length: a windowless model gives other logits, ours gives HF's."""
    hf = tiny_hf_model("mistral")
    assert hf.config.sliding_window < 50
    ids = np.random.RandomState(4).randint(0, 256, size=50)
    windowed = hf_logits(hf, ids)
    hf.config.sliding_window = None
    full = hf_logits(hf, ids)
    assert np.abs(windowed[-1] - full[-1]).max() > 1e-3
    hf.config.sliding_window = 24
    np.testing.assert_allclose(jpaged_logits(jpaged_from_hf(hf), ids), windowed, atol=1e-4, rtol=0)


# bf16 weights and activations vs HF fp32: bf16 keeps 8 mantissa bits (relative error 2^-9 ~ 0.4%
# per rounding); through 2 layers the logits (magnitude ~1) agree to 0.05 absolute.
BF16_ATOL = 5e-2


@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_bf16_logits_match_hf_within_bf16_tolerance(family):
    hf = tiny_hf_model(family)
    model = jpaged_from_hf(hf, dtype=jnp.bfloat16)
    ids = np.random.RandomState(5).randint(0, 256, size=40)
    ref = hf_logits(hf, ids)
    got = jpaged_logits(model, ids)
    assert np.abs(got - ref).max() < BF16_ATOL
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_fused_projections_give_the_same_logits(family):
    """fuse_projections (what the one-device engine does) only regroups the q/k/v and gate/up GEMMs."""
    model = jpaged_from_hf(tiny_hf_model(family, seed=4))
    step = contiguous_step_input(np.arange(3, 40), 0, 16, 8, all_logits=True)
    separate, _ = model(model.new_kv_cache(8, 16), step)
    model.fuse_projections()
    model.fuse_projections()  # idempotent
    fused, _ = model(model.new_kv_cache(8, 16), step)
    assert model.layers[0].self_attn.q_proj is None and model.layers[0].mlp.gate_proj is None
    np.testing.assert_allclose(np.asarray(fused), np.asarray(separate), rtol=1e-5, atol=1e-5)
