"""jpaged.generate: HF-exact greedy output, exact page accounting, one compilation, determinism."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jpaged.generate import generate
from jpaged.sampling_params import SamplingParams
from tests.hf_reference import hf_greedy, hf_logits, jpaged_from_hf, tiny_hf_model

PAGE = 4
LENS = [12, 5, 9]  # straddle page boundaries, one exactly on one
KEY = jax.random.PRNGKey(0)


@functools.cache
def hf_and_model():
    hf = tiny_hf_model("llama3", seed=3)
    return hf, jpaged_from_hf(hf)


def prompts(seed=0, lens=LENS):
    tokens = np.zeros((len(lens), max(lens)), np.int32)
    rs = np.random.RandomState(seed)
    for i, n in enumerate(lens):
        tokens[i, :n] = rs.randint(0, 256, n)
    return tokens, np.array(lens, np.int32)


def pages_needed(prompt_lens, lengths, page_size):
    """Shared full prompt pages once per prompt, plus each row's own pages for its cached tokens."""
    total = 0
    for n_prompt, row_lengths in zip(prompt_lens, lengths):
        shared = n_prompt // page_size
        total += shared
        for n in row_lengths:
            total += -(-(n_prompt + n - 1) // page_size) - shared
    return total


class CompileCounter:
    def __init__(self):
        self.count = 0

    def __call__(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)


def test_greedy_equals_hf_for_mixed_prompt_lengths_and_several_samples():
    hf, model = hf_and_model()
    tokens, lens = prompts()
    out = generate(model, tokens, lens, max_new_tokens=8, key=KEY, num_samples=2, page_size=PAGE)
    assert out.tokens.shape == (3, 2, 8)
    np.testing.assert_array_equal(out.lengths, 8)
    for b, n in enumerate(LENS):
        expected = hf_greedy(hf, tokens[b, :n], 8)
        for s in range(2):
            assert out.tokens[b, s].tolist() == expected
    assert int(out.pages_in_use) == pages_needed(LENS, [[8, 8]] * 3, PAGE)


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_a_single_row_padded_to_the_smallest_step_still_equals_hf(backend):
    """One row decodes in steps padded to MIN_STEP_TOKENS tokens and sequence slots (empty ones)."""
    hf, model = hf_and_model()
    tokens, lens = prompts()
    out = generate(model, tokens[1:2], lens[1:2], max_new_tokens=6, key=KEY, page_size=PAGE, backend=backend)
    assert out.tokens[0, 0].tolist() == hf_greedy(hf, tokens[1, :LENS[1]], 6)


def test_greedy_with_repetition_penalty_equals_hf():
    hf, model = hf_and_model()
    tokens, lens = prompts(seed=1)
    out = generate(model, tokens, lens, max_new_tokens=8, key=KEY, page_size=PAGE,
                   sampling=SamplingParams(temperature=0.0, repetition_penalty=1.8))
    for b, n in enumerate(LENS):
        with torch.no_grad():
            ref = hf.generate(torch.tensor(tokens[None, b, :n]), max_new_tokens=8, min_new_tokens=8,
                              do_sample=False, repetition_penalty=1.8, pad_token_id=0)
        assert out.tokens[b, 0].tolist() == ref[0, n:].tolist()


def sampled_with_eos(model, key, num_pages=None, **kw):
    tokens, lens = prompts(seed=2)
    return generate(model, tokens, lens, max_new_tokens=12, key=key, num_samples=3, page_size=PAGE,
                    sampling=SamplingParams(temperature=1.0, logprobs=0), eos_token_ids=range(0, 256, 12),
                    num_pages=num_pages, **kw)


def test_pages_in_use_equal_what_the_final_lengths_need():
    _, model = hf_and_model()
    out = sampled_with_eos(model, KEY)
    lengths = np.asarray(out.lengths)
    assert len(set(lengths.ravel().tolist())) > 2, "the EOS ids should end rows at varied points"
    assert int(out.pages_in_use) == int(out.peak_pages) == pages_needed(LENS, lengths.tolist(), PAGE)
    assert not bool(out.out_of_pages)
    tokens = np.asarray(out.tokens)
    for b, s in np.ndindex(*lengths.shape):
        n = lengths[b, s]
        row = tokens[b, s]
        assert (row[n:] == -1).all() and (row[:n] >= 0).all()
        ended_by_eos = row[n - 1] % 12 == 0
        assert ended_by_eos or n == 12
        assert not (row[:n - 1] % 12 == 0).any()


def test_logprobs_are_the_models_raw_log_softmax():
    hf, model = hf_and_model()
    out = sampled_with_eos(model, KEY)
    tokens, lens = prompts(seed=2)
    b, s = 1, 2
    n = int(out.lengths[b, s])
    generated = np.asarray(out.tokens[b, s, :n])
    ids = np.concatenate([tokens[b, :lens[b]], generated])
    ref = jax.nn.log_softmax(hf_logits(hf, ids[:-1])[lens[b] - 1:], axis=-1)
    np.testing.assert_allclose(out.logprobs[b, s, :n], np.asarray(ref)[np.arange(n), generated], atol=1e-4)


def test_same_key_gives_the_same_tokens_and_another_key_other_tokens():
    _, model = hf_and_model()
    a = sampled_with_eos(model, jax.random.PRNGKey(5))
    b = sampled_with_eos(model, jax.random.PRNGKey(5))
    c = sampled_with_eos(model, jax.random.PRNGKey(6))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()


def test_compiled_once_for_repeated_calls_with_the_same_shapes():
    _, model = hf_and_model()
    graphdef, state = nnx.split(model)
    other_state = jax.tree.map(lambda x: x * 1.01, state)
    tokens, lens = prompts(seed=3)
    run = functools.partial(generate, max_new_tokens=5, num_samples=2, page_size=PAGE)
    first = run((graphdef, state), tokens, lens, key=KEY)
    with CompileCounter() as compiles:
        again = run((graphdef, state), tokens[::-1].copy(), lens[::-1].copy(), key=jax.random.PRNGKey(9))
        perturbed = run((graphdef, other_state), tokens, lens, key=KEY)
        jax.block_until_ready((again, perturbed))
    assert compiles.count == 0
    with CompileCounter() as sanity:
        jax.jit(lambda x: x * 3 + 1)(jnp.ones(7))
    assert sanity.count >= 1, "the counter must see compilations"
    assert (np.asarray(perturbed.tokens) != np.asarray(first.tokens)).any(), "weights must be arguments"


def test_runs_inside_the_callers_jit():
    _, model = hf_and_model()
    graphdef, state = nnx.split(model)
    tokens, lens = prompts(seed=4)

    @jax.jit
    def mean_length(state, tokens, lens, key):
        out = generate((graphdef, state), tokens, lens, max_new_tokens=6, key=key, page_size=PAGE,
                       eos_token_ids=range(0, 256, 10), sampling=SamplingParams(temperature=1.0))
        return out.lengths.mean(), out.tokens

    mean, tokens_in_jit = mean_length(state, tokens, lens, KEY)
    direct = generate(model, tokens, lens, max_new_tokens=6, key=KEY, page_size=PAGE,
                      eos_token_ids=range(0, 256, 10), sampling=SamplingParams(temperature=1.0))
    np.testing.assert_array_equal(tokens_in_jit, direct.tokens)
    assert float(mean) == pytest.approx(float(direct.lengths.mean()))


def test_a_pool_too_small_ends_rows_early_without_corrupting_the_others():
    _, model = hf_and_model()
    tokens, lens = prompts()
    full = generate(model, tokens, lens, max_new_tokens=8, key=KEY, num_samples=2, page_size=PAGE)
    small = generate(model, tokens, lens, max_new_tokens=8, key=KEY, num_samples=2, page_size=PAGE,
                     num_pages=16)
    assert bool(small.out_of_pages) and int(small.pages_in_use) == 16
    lengths = np.asarray(small.lengths)
    assert (lengths < 8).any()
    for b, s in np.ndindex(*lengths.shape):
        n = lengths[b, s]
        np.testing.assert_array_equal(small.tokens[b, s, :n], full.tokens[b, s, :n])


def test_bad_arguments_raise_value_errors():
    _, model = hf_and_model()
    tokens, lens = prompts()
    with pytest.raises(ValueError, match="prompt_lens"):
        generate(model, tokens, lens[:2], max_new_tokens=4, key=KEY)
    with pytest.raises(ValueError, match="num_pages"):
        generate(model, tokens, lens, max_new_tokens=4, key=KEY, page_size=PAGE, num_pages=3)
    with pytest.raises(ValueError, match="seed"):
        generate(model, tokens, lens, max_new_tokens=4, key=KEY, sampling=SamplingParams(seed=1))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tokens, lens, max_new_tokens=0, key=KEY)
