"""Speculative decoding on the real default model (SmolLM2-135M-Instruct): greedy outputs equal HF
transformers' greedy token for token with the n-gram and draft-model proposers (the draft: the model's
first 10 layers), k = 1..5, under preemption and prefix caching."""
import pytest

from jpaged.config import EngineConfig
from jpaged.engine.llm_engine import Engine
from jpaged.sampling_params import SamplingParams
from tests.hf_reference import hf_greedy
from tests.loader.test_engine_on_default_model import TEXT

NEW_TOKENS = 16


@pytest.fixture(scope="module")
def workload(smollm2_hf, smollm2_jpaged):
    hf, _ = smollm2_hf
    _, tokenizer = smollm2_jpaged
    ids = tokenizer.encode(TEXT * 4)
    # Repetitive text (n-gram hits), two prompts sharing a prefix (cache hits), one short.
    prompts = [ids[:150], ids[:120], ids[40:170], ids[:9]]
    return prompts, [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]


@pytest.mark.slow
@pytest.mark.long  # ~1 min per case on 2 cores
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_speculation_equals_hf_greedy_on_default_model(smollm2_jpaged, workload, method, k):
    model, tokenizer = smollm2_jpaged
    prompts, expected = workload
    spec = ({"method": "ngram", "num_speculative_tokens": k} if method == "ngram" else
            {"method": "draft_model", "model": "default", "num_speculative_tokens": k, "draft_num_layers": 10})
    # 24 pages of 16 tokens: fewer than the four sequences need together (preemption).
    engine = Engine(EngineConfig(model="default", dtype="float32", num_kv_blocks=24, max_model_len=256,
                                 max_num_batched_tokens=128, max_num_seqs=4, speculative_config=spec),
                    model=model, tokenizer=tokenizer, draft=(model, tokenizer) if method == "draft_model" else None)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True))
    done = {}
    while engine.has_unfinished():
        done |= {o.request_id: o for o in engine.step() if o.finished}
        engine.scheduler.check_invariants()
    assert [done[str(i)].outputs[0].token_ids for i in range(len(prompts))] == expected
    stats = engine.stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    assert stats["spec_verify_steps"] > 0 and stats["num_free_pages"] == 24
