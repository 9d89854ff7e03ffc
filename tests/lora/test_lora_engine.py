"""Multi-LoRA through the engine on CPU: greedy through an adapter equals the merged weights (W + scale B A),
a mixed batch equals each request alone, and adapters load, evict and reload without a recompilation."""
import pytest

from jpaged import compilations
from jpaged.sampling_params import SamplingParams
from tests.hf_reference import hf_greedy
from tests.lora.conftest import lora_engine
from tests.lora.helpers import merged_hf_state

NEW_TOKENS = 6
PROMPT = list(range(5, 25))  # two full pages and a part: the prefix cache would hand them across adapters
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def run(engine, requests):
    """[(prompt, lora_request or None)] all queued at once -> their greedy tokens, in order."""
    for i, (prompt, lora) in enumerate(requests):
        engine.add_request(str(i), prompt, GREEDY, lora_request=lora)
    done = {}
    while engine.has_unfinished():
        done |= {o.request_id: o for o in engine.step() if o.finished}
    return [done[str(i)].outputs[0].token_ids for i in range(len(requests))]


@pytest.fixture(scope="module")
def merged_greedy(tiny_llama, lora_requests):
    """HF greedy of PROMPT with each adapter merged into the weights; index 0: the base model."""
    import copy
    hf, _ = tiny_llama
    out = [hf_greedy(hf, PROMPT, NEW_TOKENS)]
    for req in lora_requests:
        merged = copy.deepcopy(hf)
        merged.load_state_dict(merged_hf_state(hf.state_dict(), req.lora_path))
        out.append(hf_greedy(merged, PROMPT, NEW_TOKENS))
    assert len({tuple(o) for o in out}) == len(out), "every adapter must change the greedy output"
    return out


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return lora_engine(tiny_llama[0])


def test_greedy_through_lora_equals_merged_weights_one_request_at_a_time(engine, lora_requests, merged_greedy):
    # One after another on one engine with prefix caching: a page cached for one adapter is never reused by another.
    got = [run(engine, [(PROMPT, lora)])[0] for lora in [None, *lora_requests]]
    assert got == merged_greedy


def test_mixed_batch_of_four_adapters_and_base_equals_each_alone(engine, lora_requests, merged_greedy):
    a1, a2, a3, a4 = lora_requests
    order = [a3, None, a1, a4, None, a2]
    expected = [merged_greedy[0 if r is None else r.lora_int_id] for r in order]
    assert run(engine, [(PROMPT, r) for r in order]) == expected


def test_lru_eviction_under_max_loras_and_no_recompilation(tiny_llama, lora_requests, merged_greedy):
    compilations.install()
    engine = lora_engine(tiny_llama[0], max_loras=2)
    # Four adapters at once over two slots: the scheduler runs at most two per step, slots are evicted
    # and adapters reloaded from their host copies. The first run compiles its step shapes.
    order = [*lora_requests, None, lora_requests[0]]
    expected = [merged_greedy[r.lora_int_id if r else 0] for r in order]
    assert run(engine, [(PROMPT, r) for r in order]) == expected
    before = compilations.count()
    assert run(engine, [(PROMPT, r) for r in reversed(order)]) == expected[::-1]
    assert engine.lora.num_evictions >= 2 and engine.lora.num_loads >= 4
    assert len(engine.lora.resident) == 2 and engine.lora.resident[-1] == order[0].lora_int_id
    assert compilations.count() == before, "loading, evicting or reloading an adapter must not compile"


def test_request_refusals_keep_no_state(engine, lora_requests):
    free = engine.scheduler.num_free_pages
    with pytest.raises(ValueError, match="prompt_logprobs"):
        engine.add_request("x", PROMPT, SamplingParams(max_tokens=2, prompt_logprobs=1), lora_request=lora_requests[0])
    assert not engine.has_unfinished() and engine.scheduler.num_free_pages == free
