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
    from jpaged.engine.prompt_logprobs import PromptScorer
    from models.kv_cache import KVCacheSpec
    from pallas_kernels import REFERENCE
    from jpaged.sampling_params import SamplingParams
    from tests.engine.conftest import ByteTokenizer
    from tests.hf_reference import hf_greedy, jpaged_from_hf, tiny_hf_model

    hf = tiny_hf_model("llama3", seed=7)  # 4 q heads, 2 kv heads: TP 4 repeats kv heads
    rng = np.random.RandomState(0)
    prompts = [rng.randint(3, 256, size=n).tolist() for n in (5, 40, 77)]
    expected = [hf_greedy(hf, p, 8) for p in prompts]
    hf_config = jpaged_from_hf(hf).config
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
        # The engine keeps only the served, sharded weights, and prompt scoring runs on them.
        assert engine.model is engine.runner.model
        assert all(x.sharding.mesh == engine.runner.mesh for x in jax.tree.leaves(nnx.state(engine.model)))
        got = engine.prompt_scorer.score(prompts[1])
        one = PromptScorer(jpaged_from_hf(hf), spec=KVCacheSpec.for_model(hf_config, 16, "float32"),
                           backend=REFERENCE).score(prompts[1])
        np.testing.assert_allclose(got[0], one[0], atol=1e-4)
