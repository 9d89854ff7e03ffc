"""Data parallel serving (jpaged/engine/data_parallel.py) on virtual CPU devices: replicas give one
device's greedy tokens, requests spread over them, abort frees pages on the right replica.

Each test body runs in a child process with 4 CPU devices (`on_cpu_devices`, tests/multihost/devices.py).
"""
import numpy as np
import pytest

from tests.multihost.devices import on_cpu_devices

NEW_TOKENS = 6
ENGINE_ARGS = dict(dtype="float32", block_size=8, max_model_len=32, max_num_seqs=8, max_num_batched_tokens=16,
                   num_kv_blocks=48)


def _prompts(num=6, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(3, 256, size=n).tolist() for n in rng.randint(3, 20, size=num)]


def _greedy():
    from jpaged.sampling_params import SamplingParams
    return SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.mark.long  # tests/test_sharding.py's data-parallel test covers replicas in the short profile
@on_cpu_devices(4)
def test_replicas_give_one_devices_greedy_tokens_and_share_the_requests():
    import jax
    from jpaged.llm import LLM
    from tests.multihost.greedy import IdTokenizer, tiny_model
    model, prompts = tiny_model("kv2"), _prompts()
    got = {}
    for dp, tp in ((2, 1), (2, 2)):
        llm = LLM("test", model_obj=model, tokenizer=IdTokenizer(), data_parallel_size=dp, tensor_parallel_size=tp,
                  **ENGINE_ARGS)
        got[dp, tp] = [o.outputs[0].token_ids for o in llm.generate(prompts, _greedy(), use_tqdm=False)]
        replicas = llm.engine.replicas
        assert [e.stats()["generation_tokens"] for e in replicas] == [3 * NEW_TOKENS] * 2  # 3 prompts each
        for r, e in enumerate(replicas):  # replica r on devices [r * tp, (r + 1) * tp)
            group = set(jax.devices()[r * tp:(r + 1) * tp])
            assert e.runner.kv_cache.k[0].devices() == e.runner.weights[-1].devices() == group
        stats = llm.engine.stats()
        assert stats["generation_tokens"] == len(prompts) * NEW_TOKENS
        assert stats["num_free_pages"] == stats["num_total_pages"] == 2 * ENGINE_ARGS["num_kv_blocks"]
    # Last: a one-device engine may rewrite the model in place (fused projections), which TP cannot shard.
    want = [o.outputs[0].token_ids for o in LLM("test", model_obj=model, tokenizer=IdTokenizer(), **ENGINE_ARGS)
            .generate(prompts, _greedy(), use_tqdm=False)]
    assert got[2, 1] == want and got[2, 2] == want


@pytest.mark.long  # tests/test_sharding.py's data-parallel test covers replicas in the short profile
@on_cpu_devices(4)
def test_abort_frees_pages_on_its_replica_and_ids_are_unique_across_replicas():
    import dataclasses

    import pytest
    from jpaged.config import EngineConfig
    from jpaged.engine.data_parallel import DataParallelEngine, make_engine
    from jpaged.engine.llm_engine import Engine
    from tests.multihost.greedy import IdTokenizer, tiny_model
    model, prompts = tiny_model("kv8"), _prompts(4, seed=1)
    config = EngineConfig(model="test", data_parallel_size=2, **ENGINE_ARGS)
    engine = make_engine(config, model=model, tokenizer=IdTokenizer())
    assert isinstance(engine, DataParallelEngine)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, _greedy())
    assert [sorted(e.requests) for e in engine.replicas] == [["0", "2"], ["1", "3"]]  # least loaded first
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("3", prompts[0], _greedy())
    started = set()
    while not {"1", "2"} <= started:  # both mid-flight, holding pages, when aborted
        started |= {o.request_id for o in engine.step()}
    engine.abort("1")
    engine.abort("2")
    assert [sorted(e.requests) for e in engine.replicas] == [["0"], ["3"]]
    finished = {}
    while engine.has_unfinished():
        step = engine.step()
        assert not {o.request_id for o in step} & {"1", "2"}
        finished |= {o.request_id: o for o in step if o.finished}
    assert sorted(finished) == ["0", "3"]
    for e in engine.replicas:
        s = e.stats()
        assert s["num_free_pages"] == s["num_total_pages"] and s["num_running"] == s["num_waiting"] == 0
    engine.add_request("1", prompts[1], _greedy())  # an id is free again once its request is gone
    assert engine.has_unfinished()

    assert isinstance(make_engine(dataclasses.replace(config, data_parallel_size=1), model=model,
                                  tokenizer=IdTokenizer()), Engine)
    with pytest.raises(ValueError, match="make_engine"):
        Engine(config, model=model, tokenizer=IdTokenizer())
    with pytest.raises(ValueError, match="devices needed"):
        make_engine(dataclasses.replace(config, tensor_parallel_size=4), model=model, tokenizer=IdTokenizer())
