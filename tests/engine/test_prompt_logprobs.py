"""Prompt logprobs: the scorer equals log_softmax of HF transformers' full forward pass, and the engine
reports them in vLLM's shape (None first, then {token id: Logprob} with the token and the top k)."""
import numpy as np
from scipy.special import log_softmax

from jpaged.engine.prompt_logprobs import PromptScorer, padded_length
from jpaged.sampling_params import SamplingParams
from pallas_kernels import REFERENCE
from tests.engine.test_engine import make_engine
from tests.hf_reference import hf_logits


def reference(hf, prompt):
    """[L-1, V] HF logprobs of the next token at each prompt position but the last."""
    return log_softmax(hf_logits(hf, prompt).astype(np.float64), axis=-1)[:-1]


def test_scores_equal_log_softmax_of_a_full_forward_pass(tiny_llama):
    hf, model = tiny_llama
    length, chunk = 40, 16  # three chunks into the scratch cache (one chunk: the engine test below)
    prompt = np.random.RandomState(length).randint(3, 256, size=length).tolist()
    want = reference(hf, prompt)
    logprobs, ranks, top_ids, top_logprobs = PromptScorer(model, spec=model.kv_cache_spec(16),
                                                          backend=REFERENCE, chunk=chunk).score(prompt)
    nxt = np.asarray(prompt[1:])
    chosen = want[np.arange(length - 1), nxt]
    np.testing.assert_allclose(logprobs, chosen, atol=2e-4)
    np.testing.assert_array_equal(ranks, (want >= chosen[:, None] - 1e-6).sum(-1))
    np.testing.assert_array_equal(top_ids[:, :5], np.argsort(-want, axis=-1)[:, :5])
    np.testing.assert_allclose(top_logprobs, np.take_along_axis(want, top_ids, -1), atol=2e-4)


def test_prompt_lengths_pad_to_powers_of_two():
    assert [padded_length(n) for n in (1, 16, 17, 100, 512, 513)] == [16, 16, 32, 128, 512, 1024]


def test_engine_reports_prompt_logprobs_in_vllm_shape(tiny_llama, byte_tokenizer):
    hf, model = tiny_llama
    prompt = [5, 60, 7, 99, 42, 3, 17]
    want = reference(hf, prompt)
    engine = make_engine(model, byte_tokenizer)
    engine.add_request("lp", prompt, SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2, n=2))
    engine.add_request("plain", prompt, SamplingParams(temperature=0, max_tokens=3))
    first, done = {}, {}
    while engine.has_unfinished():
        for out in engine.step():
            first.setdefault(out.request_id, out)
            if out.finished:
                done[out.request_id] = out
    assert done["plain"].prompt_logprobs is None
    entries = first["lp"].prompt_logprobs
    assert entries is done["lp"].prompt_logprobs and len(entries) == len(prompt) and entries[0] is None
    for i, (token, entry) in enumerate(zip(prompt[1:], entries[1:])):
        top2 = np.argsort(-want[i])[:2].tolist()
        assert set(entry) == {token, *top2}
        assert entry[token].decoded_token == byte_tokenizer.decode([token])
        assert entry[token].rank == int((want[i] >= want[i, token] - 1e-6).sum())
        assert [entry[t].rank for t in top2 if t != token] == [r for r, t in enumerate(top2, 1) if t != token]
        np.testing.assert_allclose([entry[t].logprob for t in entry], want[i, list(entry)], atol=2e-4)
    assert engine.stats()["num_used_pages"] == 0
