"""Prompt logprobs scored inside the scheduled prefill equal log_softmax of HF transformers' full
forward pass, in vLLM's shape (None first, then {token id: Logprob} with the token and the top k),
over several chunks, beside other requests, after a prefix-cache hit, and abortable mid-prompt."""
import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import log_softmax

from jpaged.engine.prompt_logprobs import blockwise_top_k, plan_scores
from jpaged.engine.scheduler import ScheduledSeq
from jpaged.engine.sequence import Sequence
from jpaged.sampling_params import SamplingParams
from tests.engine.test_engine import make_engine
from tests.hf_reference import hf_logits


def reference(hf, prompt):
    """[L-1, V] HF logprobs of the next token at each prompt position but the last."""
    return log_softmax(hf_logits(hf, prompt).astype(np.float64), axis=-1)[:-1]


def run(engine):
    first, done = {}, {}
    while engine.has_unfinished():
        for out in engine.step():
            first.setdefault(out.request_id, out)
            if out.finished:
                done[out.request_id] = out
    return first, done


def check_entries(entries, prompt, want, k, decode):
    assert len(entries) == len(prompt) and entries[0] is None
    for i, (token, entry) in enumerate(zip(prompt[1:], entries[1:])):
        top = np.argsort(-want[i])[:k].tolist()
        assert set(entry) == {token, *top}
        assert entry[token].decoded_token == decode([token])
        assert entry[token].rank == int((want[i] >= want[i, token] - 1e-6).sum())
        assert [entry[t].rank for t in top if t != token] == [r for r, t in enumerate(top, 1) if t != token]
        np.testing.assert_allclose([entry[t].logprob for t in entry], want[i, list(entry)], atol=2e-4)


def test_scored_in_chunks_beside_other_requests_after_a_prefix_hit_and_abortable(tiny_llama, byte_tokenizer):
    hf, model = tiny_llama
    prompt = np.random.RandomState(3).randint(3, 256, size=40).tolist()
    want = reference(hf, prompt)
    # 10 scored positions a step: the 40-token prompt takes 4 chunks, beside a plain request.
    engine = make_engine(model, byte_tokenizer, max_scored_prompt_tokens=10, max_num_batched_tokens=64,
                         max_model_len=128, num_kv_blocks=64)
    engine.add_request("warm", prompt, SamplingParams(temperature=0, max_tokens=2))  # fills the prefix cache
    run(engine)
    engine.add_request("lp", prompt, SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2, n=2))
    engine.add_request("plain", prompt[:20], SamplingParams(temperature=0, max_tokens=3))
    engine.add_request("one", [7], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3))
    steps = engine.stats()["num_steps"]
    first, done = run(engine)
    assert engine.stats()["num_steps"] - steps >= 4
    assert done["plain"].prompt_logprobs is None and done["one"].prompt_logprobs == [None]
    assert first["lp"].prompt_logprobs is done["lp"].prompt_logprobs
    check_entries(done["lp"].prompt_logprobs, prompt, want, 2, byte_tokenizer.decode)
    assert engine.stats()["num_used_pages"] == 0
    # Cancellable at any chunk: an abort after two steps leaves no request and no page behind.
    engine.add_request("cut", list(range(3, 60)), SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1))
    engine.step()
    engine.step()
    engine.abort("cut")
    run(engine)
    engine.step()  # reads back the step in flight
    assert not engine.requests and engine.stats()["num_used_pages"] == 0


def test_plan_scores_every_prompt_position_but_the_last():
    seq = Sequence(seq_id=0, request_id="a", token_ids=[10, 11, 12, 13, 14])
    other = Sequence(seq_id=1, request_id="b", token_ids=[1, 2])
    seq.scores_pending = True
    plan = plan_scores([ScheduledSeq(other, 1, 1, 1), ScheduledSeq(seq, 2, 3, 1)])
    assert plan.token_index == [1, 2] and plan.positions == [2, 3] and plan.targets == [13, 14]
    assert plan_scores([ScheduledSeq(other, 0, 2, 1)]) is None


def test_blockwise_top_k_equals_top_k():
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 100))
    values, idx = blockwise_top_k(x, 7, block=16)
    want_values, want_idx = jax.lax.top_k(x, 7)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(values, want_values)
    assert jnp.all(jnp.isfinite(values))
