"""Speculative decoding end to end on a tiny Llama: greedy outputs equal HF transformers' greedy token for
token (n-gram and draft-model proposers, under preemption and prefix caching, a stop string and
max_tokens inside accepted runs); the sampled distribution with a bad proposer is the target's
(chi-square). Long profile: k = 1..5 for both proposers, seeded sampling with penalties and logprobs
equal to plain decoding."""
import numpy as np
import pytest
from scipy import stats as scipy_stats

from jpaged.config import EngineConfig
from jpaged.engine.llm_engine import Engine
from jpaged.engine.spec_decode import ngram
from jpaged.sampling_params import SamplingParams
from tests.hf_reference import hf_greedy

# Few shapes (each one a compilation): two token buckets (4, 16), two page buckets.
SMALL = dict(model="test", dtype="float32", block_size=8, max_num_seqs=4, max_num_batched_tokens=16,
             max_model_len=64, num_kv_blocks=12)
NEW = (24, 23, 21, 22)


def engine(model, tokenizer, spec=None, draft=None, **kw):
    return Engine(EngineConfig(**(SMALL | kw), speculative_config=spec), model=model, tokenizer=tokenizer,
                  draft=draft)


def run(eng, prompts, params):
    for i, (p, sp) in enumerate(zip(prompts, params)):
        eng.add_request(str(i), p, sp)
    done = {}
    while eng.has_unfinished():
        done |= {o.request_id: o for o in eng.step() if o.finished}
        eng.scheduler.check_invariants()
    assert eng.stats()["num_free_pages"] == eng.config.num_kv_blocks
    return [done[str(i)] for i in range(len(prompts))]


def prompts_with_repeats():
    """Repetitive prompts (n-gram hits) sharing a 16-token prefix (cache hits), and a random one;
    12 pages of 8 tokens hold fewer than all of them (preemption)."""
    rng = np.random.RandomState(0)
    base = rng.randint(3, 95, size=12).tolist()
    return [base * 3, base * 2 + [5, 6, 7], rng.randint(3, 95, size=30).tolist(), base[:5] * 6]


@pytest.fixture(scope="module")
def hf_outputs(tiny_llama):
    hf, _ = tiny_llama
    return [hf_greedy(hf, p, n) for p, n in zip(prompts_with_repeats(), NEW)]


PROPOSERS = {
    "ngram": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3},
    "draft_model": {"method": "draft_model", "model": "test", "num_speculative_tokens": 2, "draft_num_layers": 1},
}


def speculative_engine(model, tokenizer, spec, **kw):
    draft = (model, tokenizer) if spec["method"] == "draft_model" else None
    return engine(model, tokenizer, spec, draft=draft, **kw)


@pytest.mark.parametrize("name", PROPOSERS)
def test_greedy_with_speculation_equals_hf(tiny_llama, byte_tokenizer, hf_outputs, name):
    _, model = tiny_llama
    eng = speculative_engine(model, byte_tokenizer, PROPOSERS[name])
    text0 = byte_tokenizer.decode(hf_outputs[0])
    stop = text0[9:11]  # lands inside an accepted run more often than not
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in NEW]
    params[0] = SamplingParams(temperature=0.0, max_tokens=NEW[0], ignore_eos=True, stop=[stop])
    requests = run(eng, prompts_with_repeats(), params)
    outs = [o.outputs[0] for o in requests]
    assert [c.token_ids for c in outs[1:]] == hf_outputs[1:]
    assert (outs[0].text, outs[0].finish_reason, outs[0].stop_reason) == (text0[:text0.find(stop)], "stop", stop)
    s = eng.stats()
    assert s["num_preemptions"] > 0 and s["prefix_cache_hits"] > 0
    assert s["spec_accepted_tokens"] > 0 and s["spec_verify_steps"] > 0
    figures = requests[1].spec_decode
    assert figures["verify_steps"] > 0
    assert figures["mean_accepted_length"] == 1 + figures["accepted"] / figures["verify_steps"]


@pytest.mark.long
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("name", PROPOSERS)
def test_every_k_gives_the_tokens_and_logprobs_of_plain_decoding(tiny_llama, byte_tokenizer, hf_outputs, name, k):
    """Greedy equals HF; seeded sampling with top-k, a penalty and logprobs equals plain decoding."""
    _, model = tiny_llama
    sampled = SamplingParams(temperature=0.8, top_k=20, repetition_penalty=1.3, seed=11, max_tokens=20,
                             ignore_eos=True, logprobs=2)
    prompts = prompts_with_repeats()
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in NEW[:3]] + [sampled]
    want = [o.outputs[0] for o in run(engine(model, byte_tokenizer), prompts, params)]
    spec = dict(PROPOSERS[name], num_speculative_tokens=k)
    got = [o.outputs[0] for o in run(speculative_engine(model, byte_tokenizer, spec), prompts, params)]
    assert [c.token_ids for c in got[:3]] == hf_outputs[:3]
    assert got[3].token_ids == want[3].token_ids
    assert [list(d) for d in got[3].logprobs] == [list(d) for d in want[3].logprobs]
    np.testing.assert_allclose(got[3].cumulative_logprob, want[3].cumulative_logprob, rtol=1e-4)


def test_sampled_tokens_follow_the_target_distribution_under_a_bad_proposer(tiny_llama, byte_tokenizer, monkeypatch):
    """2,000 draws of the token at a verified position, with and without speculation, agree by a
    chi-square test of homogeneity at significance 0.001. The proposer always offers token 40, which
    the target rarely draws: most proposals are rejected and the residual is sampled."""
    _, model = tiny_llama
    prompt, n_req, n = [10, 20, 30, 40, 50], 8, 250
    params = SamplingParams(temperature=1.5, max_tokens=3, ignore_eos=True, n=n)
    kw = dict(max_num_seqs=256, max_num_batched_tokens=512, max_num_prefill_seqs=256, num_kv_blocks=512)

    def second_tokens(eng):
        for i in range(n_req):
            eng.add_request(str(i), prompt, params)
        counts = np.zeros(256, np.int64)
        while eng.has_unfinished():
            for out in eng.step():
                if out.finished:
                    for c in out.outputs:
                        counts[c.token_ids[1]] += 1
        return counts

    plain_counts = second_tokens(engine(model, byte_tokenizer, seed=1, **kw))
    monkeypatch.setattr(ngram, "propose", lambda ids, k, max_n, min_n: [40] * k)
    eng = engine(model, byte_tokenizer, {"method": "ngram", "num_speculative_tokens": 1}, seed=2, **kw)
    spec_counts = second_tokens(eng)
    assert eng.stats()["spec_verify_steps"] == n_req * n
    # Tokens with few draws are pooled into one cell, so every expected count is >= 5.
    table = np.stack([plain_counts, spec_counts])
    common = table.sum(0) >= 20
    cells = np.concatenate([table[:, common], table[:, ~common].sum(1, keepdims=True)], axis=1)
    p_value = scipy_stats.chi2_contingency(cells)[1]
    assert p_value > 1e-3, (p_value, cells)
