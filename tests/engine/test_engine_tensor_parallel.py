"""The engine with tensor_parallel_size > 1 (on virtual CPU devices) gives HF's greedy tokens."""
import numpy as np
import pytest

from tests.multihost.devices import on_cpu_devices


@pytest.mark.slow
@on_cpu_devices(4)
def test_engine_tensor_parallel_greedy_equals_hf():
    import jax
    from flax import nnx

    from jpaged.config import EngineConfig
    from jpaged.engine.llm_engine import Engine
    from scipy.special import log_softmax

    from jpaged.sampling_params import SamplingParams
    from tests.engine.conftest import ByteTokenizer
    from tests.hf_reference import hf_greedy, hf_logits, jpaged_from_hf, tiny_hf_model

    hf = tiny_hf_model("llama3", seed=7)  # 4 q heads, 2 kv heads: TP 4 repeats kv heads
    rng = np.random.RandomState(0)
    prompts = [rng.randint(3, 256, size=n).tolist() for n in (5, 40, 77)]
    expected = [hf_greedy(hf, p, 8) for p in prompts]
    want = log_softmax(hf_logits(hf, prompts[1]).astype(np.float64), axis=-1)[np.arange(39), prompts[1][1:]]
    for tp in (2, 4):
        engine = Engine(EngineConfig(model="test", dtype="float32", num_kv_blocks=64, max_model_len=256,
                                     max_num_batched_tokens=64, tensor_parallel_size=tp),
                        model=jpaged_from_hf(hf), tokenizer=ByteTokenizer())
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
        done = {}
        while engine.has_unfinished():
            done |= {o.request_id: o for o in engine.step() if o.finished}
        assert [done[str(i)].outputs[0].token_ids for i in range(3)] == expected, tp
        assert engine.runner.kv_cache.k[0].sharding.spec[2] == "model"
        # The engine keeps only the served, sharded weights, and prompt scoring runs on them in the prefill.
        assert engine.model is engine.runner.model
        assert all(x.sharding.mesh == engine.runner.mesh for x in jax.tree.leaves(nnx.state(engine.model)))
        engine.add_request("lp", prompts[1], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0))
        while engine.has_unfinished():
            done |= {o.request_id: o for o in engine.step() if o.finished}
        got = [e[t].logprob for e, t in zip(done["lp"].prompt_logprobs[1:], prompts[1][1:])]
        np.testing.assert_allclose(got, want, atol=2e-4)
