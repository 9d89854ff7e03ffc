"""The engine end to end on CPU: greedy output equals HF transformers token for token, whatever the
scheduling (preemption by recompute or swap, chunked prefill, prefix caching, sliding windows)."""
import numpy as np
import pytest

from jpaged.config import EngineConfig
from jpaged.engine.llm_engine import Engine
from jpaged.sampling_params import SamplingParams
from tests.hf_reference import hf_greedy

NEW_TOKENS = 12


def mixed_prompts(num=32, seed=0, max_len=1000):
    """Prompts of 1..max_len tokens; a third of them share a 200-token prefix (prefix-cache hits)."""
    rng = np.random.RandomState(seed)
    shared = rng.randint(3, 256, size=200).tolist()
    lengths = [1, 2, 15, 16, 17, max_len] + rng.randint(1, max_len, size=num - 6).tolist()
    prompts = []
    for i, n in enumerate(lengths):
        body = rng.randint(3, 256, size=n).tolist()
        prompts.append((shared + body)[:max(n, 1)] if i % 3 == 0 and n > 200 else body)
    return prompts


def run_engine(engine, prompts, params, on_step=None):
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        if on_step:
            on_step(engine)
    return [done[str(i)] for i in range(len(prompts))]


def make_engine(model, tokenizer, **kw):
    cfg = dict(model="test", dtype="float32", block_size=16, max_num_seqs=16, max_num_batched_tokens=256,
               max_model_len=1024, num_kv_blocks=512)
    return Engine(EngineConfig(**(cfg | kw)), model=model, tokenizer=tokenizer)


GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_llama):
    hf, _ = tiny_llama
    prompts = mixed_prompts()
    return prompts, [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_greedy_equals_hf_under_preemption_chunking_and_prefix_caching(tiny_llama, byte_tokenizer, reference, mode):
    _, model = tiny_llama
    prompts, expected = reference
    # 160 pages hold ~2.5k tokens: far less than the 32 prompts need at once, so sequences get preempted.
    engine = make_engine(model, byte_tokenizer, num_kv_blocks=160, preemption_mode=mode,
                         num_host_kv_blocks=160 if mode == "swap" else 0, max_num_prefill_seqs=3)
    outs = run_engine(engine, prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected
    stats = engine.stats()
    assert stats["num_preemptions"] > 0
    assert stats["prefix_cache_hits"] > 0
    assert stats["num_used_pages"] == 0 and stats["num_free_pages"] == 160


@pytest.mark.long  # the preemption/chunking/prefix-caching equality tests cover the engine in the short profile
def test_greedy_equals_hf_with_everything_off(tiny_llama, byte_tokenizer, reference):
    _, model = tiny_llama
    prompts, expected = reference
    engine = make_engine(model, byte_tokenizer, enable_chunked_prefill=False, enable_prefix_caching=False,
                         max_num_batched_tokens=1024, num_kv_blocks=2048, max_num_prefill_seqs=None)
    outs = run_engine(engine, prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert engine.stats()["num_preemptions"] == 0


def test_sliding_window_matches_hf_and_bounds_pages_per_sequence(tiny_mistral, byte_tokenizer):
    hf, model = tiny_mistral
    rng = np.random.RandomState(3)
    prompts = [rng.randint(3, 256, size=n).tolist() for n in (390, 250, 100, 388)]
    expected = [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
    engine = make_engine(model, byte_tokenizer, num_kv_blocks=256, max_num_batched_tokens=64)
    bound = -(-64 // 16) + 1
    peak = []

    def check(eng):
        for seq in eng.scheduler.running:
            peak.append(sum(1 for page in seq.block_table if page >= 0))

    outs = run_engine(engine, prompts, GREEDY, on_step=check)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert peak and max(peak) <= bound


def test_steady_state_serving_never_recompiles(tiny_llama, byte_tokenizer):
    _, model = tiny_llama
    engine = make_engine(model, byte_tokenizer, num_kv_blocks=96, max_model_len=256, max_num_batched_tokens=64)
    engine.warmup("plain")  # every sampler tier: tests/engine/test_step_variants.py
    compiled = engine.stats()["num_compilations"]
    assert compiled == len(engine.runner.token_buckets()) * len(engine.runner.page_buckets())
    # A long mixed run: prompts of 1..240 tokens, chunked prefill, preemption, prefix hits.
    rng = np.random.RandomState(5)
    prompts = [rng.randint(3, 256, size=n).tolist() for n in rng.randint(1, 240, size=40)]
    run_engine(engine, prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    assert engine.stats()["num_compilations"] == compiled


def test_seeded_sampling_is_reproducible_across_batch_compositions(tiny_llama, byte_tokenizer):
    _, model = tiny_llama
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    alone = run_engine(make_engine(model, byte_tokenizer), [[5, 6, 7, 8]], params)[0].outputs[0].token_ids
    crowd = [[9] * 30, [5, 6, 7, 8], [4] * 7]
    other = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    engine = make_engine(model, byte_tokenizer)
    engine.add_request("a", crowd[0], other)
    engine.add_request("b", crowd[1], params)
    engine.add_request("c", crowd[2], other)
    outs = {}
    while engine.has_unfinished():
        outs |= {o.request_id: o for o in engine.step() if o.finished}
    assert outs["b"].outputs[0].token_ids == alone


def test_n_samples_share_the_prompts_pages(tiny_llama, byte_tokenizer):
    _, model = tiny_llama
    engine = make_engine(model, byte_tokenizer)
    prompt = list(range(3, 3 + 40))  # 2 full pages + a partial one
    engine.add_request("r", prompt, SamplingParams(n=4, temperature=1.0, max_tokens=8, ignore_eos=True, seed=1))
    while not any(len(o.outputs) == 4 for o in engine.step()):
        pass
    seqs = [s for s in engine.scheduler.running if s.request_id == "r"]
    assert len(seqs) == 4
    full_pages = seqs[0].block_table[:2]
    assert all(s.block_table[:2] == full_pages for s in seqs)
    assert all(engine.scheduler.block_manager.ref_count(p) == 4 for p in full_pages)
    outs = None
    while engine.has_unfinished():
        outs = engine.step() or outs
    texts = [tuple(c.token_ids) for c in outs[0].outputs]
    assert len(texts) == 4 and len(set(texts)) > 1
    assert engine.stats()["num_used_pages"] == 0


def test_rejected_requests_keep_no_state(tiny_llama, byte_tokenizer):
    _, model = tiny_llama
    engine = make_engine(model, byte_tokenizer, num_kv_blocks=32)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("long", [5] * 1020, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty", [], SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("bad", [5, 300], SamplingParams())
    with pytest.raises(ValueError):
        engine.add_request("pool", [5] * 600, SamplingParams(max_tokens=10))  # more than the whole pool
    assert not engine.has_unfinished()
    assert engine.stats()["num_free_pages"] == 32
    engine.add_request("ok", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0))
    while engine.has_unfinished():
        engine.step()


def test_abort_mid_generation_frees_pages(tiny_llama, byte_tokenizer):
    _, model = tiny_llama
    engine = make_engine(model, byte_tokenizer, num_kv_blocks=64)
    engine.add_request("x", [7] * 100, SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("y", [8] * 20, SamplingParams(max_tokens=5, ignore_eos=True, temperature=0))
    for _ in range(3):
        engine.step()
    engine.abort("x")
    while engine.has_unfinished():
        engine.step()
    assert engine.stats()["num_free_pages"] == 64


def test_stop_string_is_never_emitted(tiny_llama, byte_tokenizer):
    _, model = tiny_llama
    engine = make_engine(model, byte_tokenizer)
    free = run_engine(engine, [[65, 66, 67]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    text = free.outputs[0].text
    stop = text[3:5]
    out = run_engine(engine, [[65, 66, 67]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                           stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:text.index(stop)]


def test_min_tokens_keeps_eos_from_being_sampled(tiny_llama, byte_tokenizer):
    hf, model = tiny_llama
    prompt = [65, 66, 67]
    first = hf_greedy(hf, prompt, 1)[0]
    byte_tokenizer.eos_token_ids = [first]  # EOS is the token greedy decoding picks first
    engine = make_engine(model, byte_tokenizer)
    engine.add_request("eager", prompt, SamplingParams(temperature=0, max_tokens=8))
    engine.add_request("patient", prompt, SamplingParams(temperature=0, max_tokens=8, min_tokens=3))
    done = {}
    while engine.has_unfinished():
        done |= {o.request_id: o.outputs[0] for o in engine.step() if o.finished}
    assert done["eager"].token_ids == [first] and done["eager"].finish_reason == "stop"
    assert first not in done["patient"].token_ids[:3] and len(done["patient"].token_ids) > 3


def test_async_scheduling_gives_the_same_outputs_as_sync(tiny_llama, byte_tokenizer):
    """Step N+1 is launched before step N is read back; sequences that stop (EOS, stop string,
    max_tokens) in step N waste their slot in N+1 but nothing else may differ, preemption included."""
    _, model = tiny_llama
    rng = np.random.RandomState(11)
    prompts = [rng.randint(3, 256, size=n).tolist() for n in rng.randint(1, 120, size=20)]
    byte_tokenizer.eos_token_ids = [40, 41, 42]  # frequent enough that some rows stop on EOS
    params = [SamplingParams(temperature=0.9, seed=i, max_tokens=int(rng.randint(1, 25)),
                             stop=["ab"] if i % 4 == 0 else None) for i in range(len(prompts))]

    def run(async_scheduling):
        engine = make_engine(model, byte_tokenizer, num_kv_blocks=24, max_num_batched_tokens=64,
                             async_scheduling=async_scheduling)
        for i, (p, sp) in enumerate(zip(prompts, params)):
            engine.add_request(str(i), p, sp)
        done, in_flight = {}, 0
        while engine.has_unfinished():
            done |= {o.request_id: o.outputs[0] for o in engine.step() if o.finished}
            in_flight += engine._inflight is not None
        stats = engine.stats()
        assert stats["num_used_pages"] == 0 and stats["num_free_pages"] == 24
        return [done[str(i)] for i in range(len(prompts))], stats, in_flight

    (sync, _, sync_in_flight), (overlapped, stats, in_flight) = run(False), run(True)
    assert sync_in_flight == 0 and in_flight > 0
    assert stats["num_preemptions"] > 0
    assert {o.finish_reason for o in sync} >= {"stop", "length"}
    for a, b in zip(sync, overlapped):
        assert (a.token_ids, a.text, a.finish_reason, a.stop_reason) == (b.token_ids, b.text, b.finish_reason,
                                                                       b.stop_reason)
        assert all(t >= 0 for t in b.token_ids)


def test_final_only_outputs_report_finished_requests_with_the_same_text(tiny_llama, byte_tokenizer):
    _, model = tiny_llama
    prompts = [[65, 66, 67], [70] * 20, [80, 81]]
    results = {}
    for kind in ("cumulative", "final_only"):
        engine = make_engine(model, byte_tokenizer)
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=9 + i, ignore_eos=True,
                                                         output_kind=kind))
        seen = []
        while engine.has_unfinished():
            seen += engine.step()
        assert kind == "cumulative" or all(o.finished for o in seen)
        results[kind] = {o.request_id: (o.outputs[0].text, o.outputs[0].token_ids) for o in seen if o.finished}
    assert results["final_only"] == results["cumulative"] and len(results["cumulative"]) == 3
