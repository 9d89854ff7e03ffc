"""After `Engine.warmup()` mixed traffic compiles nothing (every sampler tier, prompt logprobs, n > 1,
beam search, chunked prompts, swap preemption), and a tier changes no sampled token."""
import numpy as np
import pytest

from jpaged import compilations
from jpaged.engine import step_variants
from jpaged.sampling_params import SamplingParams
from tests.engine.test_engine import make_engine


def run(engine):
    done = {}
    while engine.has_unfinished():
        done |= {o.request_id: o for o in engine.step() if o.finished}
    return done


def test_no_compilation_after_warmup_under_mixed_traffic(tiny_llama, byte_tokenizer):
    _, model = tiny_llama
    # 6 pages of 16 tokens for 4 sequences of up to 64: preemption by swap; 4-token steps (one token bucket): chunked prompts.
    engine = make_engine(model, byte_tokenizer, max_num_seqs=4, max_num_batched_tokens=4, max_model_len=64,
                         num_kv_blocks=6, num_host_kv_blocks=16, preemption_mode="swap", max_scored_prompt_tokens=8)
    compilations.install()
    engine.warmup()
    before = compilations.count()
    rng = np.random.RandomState(0)
    seeded = SamplingParams(temperature=1.0, seed=5, max_tokens=6, ignore_eos=True)
    engine.add_request("alone", [9, 8, 7], seeded)
    alone = run(engine)["alone"].outputs[0].token_ids
    kinds = [SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
             SamplingParams(temperature=0.8, top_p=0.9, top_k=20, min_p=0.05, seed=1, max_tokens=8),
             SamplingParams(temperature=0.0, logprobs=3, prompt_logprobs=2, max_tokens=8),
             SamplingParams(temperature=0.7, presence_penalty=0.5, repetition_penalty=1.2, max_tokens=8),
             SamplingParams(temperature=0.0, min_tokens=4, stop_token_ids=[5], max_tokens=8),
             SamplingParams(temperature=0.9, n=2, max_tokens=8),
             SamplingParams(temperature=0.0, use_beam_search=True, n=2, max_tokens=4)]
    for i in range(9):
        prompt = rng.randint(3, 256, size=rng.randint(2, 50)).tolist()
        engine.add_request(str(i), prompt, kinds[i % len(kinds)])
    engine.add_request("together", [9, 8, 7], seeded)
    done = run(engine)
    assert len(done) == 10 and engine.stats()["num_preemptions"] > 0
    assert done["together"].outputs[0].token_ids == alone  # beside penalties ("full" tier) as alone ("plain")
    assert compilations.count() == before


def test_tiers_cover_their_rows():
    vocab = 100
    assert step_variants.tier_of([SamplingParams(), SamplingParams(temperature=0)], vocab) == "plain"
    assert step_variants.tier_of([SamplingParams(top_p=0.5)], vocab) == "sample"
    assert step_variants.tier_of([SamplingParams(temperature=0, top_p=0.5)], vocab) == "plain"  # greedy ignores it
    assert step_variants.tier_of([SamplingParams(logprobs=1)], vocab, scored=True) == "score"
    assert step_variants.tier_of([SamplingParams(logprobs=0), SamplingParams(frequency_penalty=0.1)], vocab) == "full"


def test_page_moves_pad_to_buckets_and_split():
    buckets = step_variants.move_buckets(20)
    assert buckets == [4, 16, 64]
    pieces = step_variants.padded_moves([(i, i + 100) for i in range(70)], buckets, (0, 999))
    assert [(len(src), n) for src, _, n in pieces] == [(64, 64), (16, 6)]
    assert pieces[1][1][6:].tolist() == [999] * 10


def test_too_many_stop_token_ids_are_refused():
    with pytest.raises(ValueError, match="stop_token_ids must hold at most 64"):
        SamplingParams(stop_token_ids=list(range(65)))
