"""jpaged.sampling: greedy, the sampling distribution, filters, penalties, seeds and logprobs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jpaged.sampling import (SamplingTensors, apply_penalties, apply_top_k_top_p, apply_min_p, pad_histories,
                             sample)
from jpaged.sampling_params import SamplingParams

V = 8
KEY = jax.random.PRNGKey(0)
# Chi-square critical value at p = 1e-4 for V - 1 = 7 degrees of freedom.
CHI2_CRIT_7DF = 29.88


def tensors_for(params, num_rows=None, vocab_size=V, **kw):
    return SamplingTensors.from_params(params, num_rows=num_rows or len(params), vocab_size=vocab_size, **kw)


def draw_counts(logits_row, params, draws, key=KEY):
    """Samples `draws` rows of the same logits (unseeded rows get independent keys) and counts tokens."""
    logits = jnp.tile(jnp.asarray(logits_row, jnp.float32), (draws, 1))
    out = sample(logits, tensors_for([params] * draws, vocab_size=len(logits_row)), key)
    return np.bincount(np.asarray(out.tokens), minlength=len(logits_row))


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_greedy_rows_take_the_argmax():
    logits = jax.random.normal(KEY, (6, 50))
    params = [SamplingParams(temperature=0.0)] * 4  # rows 4, 5 are bucket padding, greedy too
    out = sample(logits, tensors_for(params, num_rows=6, vocab_size=50), KEY)
    np.testing.assert_array_equal(out.tokens, np.argmax(np.asarray(logits), -1))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampling_follows_the_tempered_softmax(temperature):
    logits = np.array([1.0, 0.5, 0.0, -0.5, 2.0, 0.1, -1.0, 1.5], np.float32)
    draws = 20000
    counts = draw_counts(logits, SamplingParams(temperature=temperature), draws)
    expected = draws * softmax(logits / temperature)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_CRIT_7DF, (counts, expected)


def numpy_top_k_top_p_support(logits, top_k, top_p):
    order = np.argsort(-logits, kind="stable")
    kept = order[:top_k]
    probs = softmax(logits[kept])
    mass_before = np.cumsum(probs) - probs
    return set(kept[mass_before < top_p].tolist()) | {int(order[0])}


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), top_k=st.integers(1, V), top_p=st.floats(0.05, 1.0))
def test_top_k_top_p_keep_exactly_the_expected_support(seed, top_k, top_p):
    logits = np.random.RandomState(seed).randn(V).astype(np.float32) * 2
    out = np.asarray(apply_top_k_top_p(jnp.asarray(logits)[None], jnp.array([top_k]), jnp.array([top_p])))[0]
    assert set(np.flatnonzero(np.isfinite(out)).tolist()) == numpy_top_k_top_p_support(logits, top_k, top_p)
    np.testing.assert_array_equal(out[np.isfinite(out)], logits[np.isfinite(out)])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), min_p=st.floats(0.0, 1.0))
def test_min_p_keeps_tokens_above_the_scaled_maximum(seed, min_p):
    logits = np.random.RandomState(seed).randn(V).astype(np.float32) * 2
    out = np.asarray(apply_min_p(jnp.asarray(logits)[None], jnp.array([min_p], jnp.float32)))[0]
    probs = softmax(logits)
    expected = set(np.flatnonzero(probs >= min_p * probs.max()).tolist())
    assert set(np.flatnonzero(np.isfinite(out)).tolist()) == expected


@pytest.mark.parametrize("params, support", [
    (SamplingParams(temperature=1.0, top_k=3), {4, 7, 0}),
    (SamplingParams(temperature=1.0, top_p=0.5), {4, 7}),
    (SamplingParams(temperature=1.0, min_p=0.3), {4, 7, 0}),
    (SamplingParams(temperature=1.0, top_k=3, top_p=0.6), {4, 7}),
])
def test_draws_cover_exactly_the_filtered_support(params, support):
    logits = np.array([1.0, 0.5, 0.0, -0.5, 2.0, 0.1, -1.0, 1.5], np.float32)
    counts = draw_counts(logits, params, draws=4000)
    assert set(np.flatnonzero(counts).tolist()) == support


def numpy_penalties(logits, prompt, output, presence, frequency, repetition):
    """The HF/vLLM formulas, one row at a time."""
    logits = logits.copy()
    counts = np.bincount(np.asarray(output, np.int64), minlength=len(logits))
    for t in set(prompt) | set(output):
        logits[t] = logits[t] / repetition if logits[t] > 0 else logits[t] * repetition
    return logits - frequency * counts - presence * (counts > 0)


history = st.lists(st.integers(0, V - 1), max_size=12)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), prompts=st.lists(history, min_size=1, max_size=3),
       outputs=st.lists(history, min_size=3, max_size=3),
       presence=st.floats(-2, 2), frequency=st.floats(-2, 2), repetition=st.floats(0.1, 2.0))
def test_penalties_equal_the_hf_vllm_formulas(seed, prompts, outputs, presence, frequency, repetition):
    rows = len(prompts)
    outputs = outputs[:rows]
    logits = np.random.RandomState(seed).randn(rows, V).astype(np.float32)
    params = [SamplingParams(presence_penalty=presence, frequency_penalty=frequency,
                             repetition_penalty=repetition)] * rows
    tensors = tensors_for(params, prompt_token_ids=prompts, output_token_ids=outputs)
    got = np.asarray(apply_penalties(jnp.asarray(logits), tensors))
    want = np.stack([numpy_penalties(logits[i], prompts[i], outputs[i], presence, frequency, repetition)
                     for i in range(rows)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_greedy_with_repetition_penalty_avoids_the_repeated_token():
    logits = jnp.array([[3.0, 2.9, 0.0, 0.0]])
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.5)]
    out = sample(logits, tensors_for(params, vocab_size=4, prompt_token_ids=[[0]], output_token_ids=[[]]), KEY)
    assert int(out.tokens[0]) == 1


def test_seeded_rows_reproduce_across_batch_compositions_and_slots():
    vocab = 64
    row = jax.random.normal(jax.random.PRNGKey(7), (vocab,))
    seeded = SamplingParams(temperature=1.0, seed=1234, top_p=0.95)
    other = SamplingParams(temperature=0.8, top_k=5)
    greedy = SamplingParams(temperature=0.0, repetition_penalty=1.2)

    def run(batch, slot, key, position):
        logits = jax.random.normal(key, (len(batch), vocab)).at[slot].set(row)
        tensors = tensors_for(batch, num_rows=len(batch) + 1, vocab_size=vocab,
                              output_positions=[position] * len(batch),
                              prompt_token_ids=[[1, 2]] * len(batch), output_token_ids=[[3]] * len(batch))
        logits = jnp.concatenate([logits, jnp.zeros((1, vocab))])
        return int(sample(logits, tensors, key).tokens[slot])

    for position in range(3):
        alone = run([seeded], 0, jax.random.PRNGKey(1), position)
        assert run([other, greedy, seeded], 2, jax.random.PRNGKey(2), position) == alone
        assert run([seeded, other, other, greedy], 0, jax.random.PRNGKey(3), position) == alone
    tokens = [run([seeded], 0, jax.random.PRNGKey(1), p) for p in range(40)]
    assert len(set(tokens)) > 1, "the output position must change a seeded row's draw"


def test_unseeded_rows_depend_on_the_passed_key():
    logits = jnp.zeros((64, 32))
    tensors = tensors_for([SamplingParams(temperature=1.0)] * 64, vocab_size=32)
    a = sample(logits, tensors, jax.random.PRNGKey(1)).tokens
    b = sample(logits, tensors, jax.random.PRNGKey(2)).tokens
    np.testing.assert_array_equal(a, sample(logits, tensors, jax.random.PRNGKey(1)).tokens)
    assert (np.asarray(a) != np.asarray(b)).any()


def test_logprobs_ranks_and_top_logprobs_are_of_the_raw_logits():
    logits = jax.random.normal(KEY, (5, 40)) * 3
    params = [SamplingParams(temperature=0.7, top_k=10, repetition_penalty=1.3)] * 5
    tensors = tensors_for(params, vocab_size=40, prompt_token_ids=[[1, 2, 3]] * 5, output_token_ids=[[4]] * 5)
    out = sample(logits, tensors, KEY, num_top_logprobs=20)
    raw = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    tokens = np.asarray(out.tokens)
    chosen = raw[np.arange(5), tokens]
    np.testing.assert_allclose(out.logprobs, chosen, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out.ranks, (raw >= chosen[:, None]).sum(-1))
    order = np.argsort(-raw, axis=-1)[:, :20]
    np.testing.assert_array_equal(out.top_ids, order)
    np.testing.assert_allclose(out.top_logprobs, np.take_along_axis(raw, order, -1), rtol=1e-6, atol=1e-6)


EOS = 2


def test_rows_short_of_min_tokens_never_sample_eos_or_stop_ids():
    # EOS (2) and the stop id 5 dominate every row's logits.
    logits = jnp.tile(jnp.array([0.0, 0.1, 30.0, 0.2, 0.3, 29.0, 0.4, 0.5]), (64, 1))
    short = [SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[5]),
             SamplingParams(temperature=1.0, min_tokens=3, stop_token_ids=[5]),
             SamplingParams(temperature=1.0, min_tokens=3, stop_token_ids=[5], ignore_eos=True)]
    params = short * 20 + [SamplingParams(temperature=0.0, stop_token_ids=[5])] * 4
    for position in range(3):
        tensors = tensors_for(params, output_positions=[position] * 64, eos_token_ids=[EOS])
        tokens = np.asarray(sample(logits, tensors, jax.random.PRNGKey(position)).tokens)
        barred = tokens[:60].reshape(20, 3)
        assert not np.isin(barred[:, :2], [EOS, 5]).any()
        assert (barred[:, 2] == EOS).all(), "ignore_eos bars only the stop ids"
        assert (tokens[60:] == EOS).all(), "rows without min_tokens are unaffected"
    reached = tensors_for(params, output_positions=[3] * 64, eos_token_ids=[EOS])
    assert not reached.use_min_tokens
    assert (np.asarray(sample(logits, reached, KEY).tokens)[::3] == EOS).all()


def test_min_tokens_keeps_raw_logprobs_and_bucketed_shapes():
    logits = jnp.array([[0.0, 0.1, 9.0, 0.2, 0.3, 0.4, 0.5, 0.6]])
    params = [SamplingParams(temperature=0.0, min_tokens=1, stop_token_ids=[4, 5, 6, 7])]
    tensors = tensors_for(params, num_rows=4, eos_token_ids=[EOS])
    assert tensors.barred_ids.shape == (4, 8) and tensors.use_min_tokens
    out = sample(logits.repeat(4, axis=0), tensors, KEY)
    assert int(out.tokens[0]) == 3 and int(out.tokens[1]) == EOS  # row 1 is padding
    np.testing.assert_allclose(out.logprobs[0], jax.nn.log_softmax(logits[0])[3], rtol=1e-6)
    assert tensors_for([SamplingParams(min_tokens=1)], eos_token_ids=[EOS]).barred_ids.shape == (1, 4)
    assert tensors_for([SamplingParams(min_tokens=1)]).barred_ids.shape == (1, 0)


def test_unused_stages_are_compiled_out():
    plain = tensors_for([SamplingParams(temperature=1.0)])
    assert not (plain.use_penalties or plain.use_top_k_top_p or plain.use_min_p)
    assert plain.prompt_tokens.shape == (1, 0)
    # Greedy rows never need the filters, whatever their top-k/top-p say.
    assert not tensors_for([SamplingParams(temperature=0.0, top_k=2, top_p=0.5)]).use_top_k_top_p


def test_histories_pad_to_power_of_two_buckets():
    assert pad_histories([[1] * 17, [2]], 3).shape == (3, 32)
    assert pad_histories([[]], 2).shape == (2, 16)


def test_bad_arguments_raise_value_errors():
    with pytest.raises(ValueError, match="num_rows"):
        tensors_for([SamplingParams()] * 3, num_rows=2)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        tensors_for([SamplingParams(presence_penalty=1.0)])
    with pytest.raises(ValueError, match="logits"):
        sample(jnp.zeros((3, V)), tensors_for([SamplingParams()]), KEY)
    with pytest.raises(ValueError, match="num_top_logprobs"):
        sample(jnp.zeros((1, V)), tensors_for([SamplingParams()]), KEY, num_top_logprobs=21)
