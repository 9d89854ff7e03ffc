"""Multi-LoRA through the engine on CPU: greedy through an adapter equals the merged weights (W + scale B A),
a mixed batch equals each request alone, and adapters load, evict and reload without a recompilation."""
import pytest

from jpaged import compilations
from jpaged.sampling_params import SamplingParams
from tests.lora.conftest import MAX_LORAS, NEW_TOKENS, PROMPT

GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def run(engine, requests):
    """[(prompt, lora_request or None)] all queued at once -> their greedy tokens, in order."""
    for i, (prompt, lora) in enumerate(requests):
        engine.add_request(str(i), prompt, GREEDY, lora_request=lora)
    done = {}
    while engine.has_unfinished():
        done |= {o.request_id: o for o in engine.step() if o.finished}
    return [done[str(i)].outputs[0].token_ids for i in range(len(requests))]


@pytest.fixture
def engine(lora_engine):
    return lora_engine


def test_greedy_through_lora_equals_merged_weights_one_request_at_a_time(engine, lora_requests, merged_greedy):
    # One after another on one engine with prefix caching: a page cached for one adapter is never reused by
    # another (its K/V were computed without that adapter), but is by the same adapter.
    hits = engine.stats()["prefix_cache_hits"]
    got = [run(engine, [(PROMPT, lora)])[0] for lora in [None, *lora_requests]]
    assert got == merged_greedy
    assert engine.stats()["prefix_cache_hits"] == hits
    assert run(engine, [(PROMPT, lora_requests[0])]) == [merged_greedy[1]]
    assert engine.stats()["prefix_cache_hits"] > hits


def test_mixed_batch_of_four_adapters_and_base_equals_each_alone(engine, lora_requests, merged_greedy):
    a1, a2, a3, a4, _ = lora_requests
    order = [a3, None, a1, a4, None, a2]
    expected = [merged_greedy[0 if r is None else r.lora_int_id] for r in order]
    assert run(engine, [(PROMPT, r) for r in order]) == expected


def test_lru_eviction_under_max_loras_and_no_recompilation(engine, lora_requests, merged_greedy):
    compilations.install()
    order = [*lora_requests, None, lora_requests[0]]
    expected = [merged_greedy[r.lora_int_id if r else 0] for r in order]
    engine.warmup()
    before, evictions = compilations.count(), engine.lora.num_evictions
    # Five adapters at once over four slots: the scheduler runs at most four per step, slots are
    # evicted and adapters reloaded from their host copies.
    assert run(engine, [(PROMPT, r) for r in order]) == expected
    assert run(engine, [(PROMPT, r) for r in reversed(order)]) == expected[::-1]
    assert engine.lora.num_evictions > evictions
    assert len(engine.lora.resident) == MAX_LORAS and engine.lora.resident[-1] == order[0].lora_int_id
    assert compilations.count() == before, "loading, evicting or reloading an adapter must not compile"


def test_request_refusals_keep_no_state(engine, tmp_path):
    from jpaged.lora import LoRARequest

    free = engine.scheduler.num_free_pages
    with pytest.raises(ValueError, match="no adapter_config.json"):
        engine.add_request("x", PROMPT, SamplingParams(max_tokens=2), lora_request=LoRARequest("gone", 99, str(tmp_path)))
    assert not engine.has_unfinished() and engine.scheduler.num_free_pages == free


def test_prompt_logprobs_are_scored_through_the_adapter(engine, lora_requests):
    """The scored prefill runs with the request's adapter, so its prompt logprobs differ from the base's."""
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    engine.add_request("base", PROMPT, params)
    engine.add_request("lora", PROMPT, params, lora_request=lora_requests[0])
    outs = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out
    base, lora = ([next(iter(p.values())).logprob for p in outs[r].prompt_logprobs[1:]] for r in ("base", "lora"))
    assert len(base) == len(lora) == len(PROMPT if isinstance(PROMPT, list) else engine.tokenizer.encode(PROMPT)) - 1
    assert base != lora


def test_llm_generate_takes_one_lora_request_per_prompt(engine, lora_requests, merged_greedy):
    import itertools

    from jpaged.llm import LLM

    llm = LLM.__new__(LLM)  # the facade over the shared engine (building another would compile again)
    llm.engine, llm._ids = engine, itertools.count()
    outs = llm.generate([PROMPT] * 3, GREEDY, lora_request=[lora_requests[1], None, lora_requests[0]])
    assert [o.outputs[0].token_ids for o in outs] == [merged_greedy[2], merged_greedy[0], merged_greedy[1]]
    with pytest.raises(ValueError, match="lora_request has 1 entries for 2 prompts"):
        llm.generate([PROMPT] * 2, GREEDY, lora_request=[lora_requests[0]])
