"""The engine serving a mixture-of-experts model: greedy output equals HF transformers under preemption
and prefix caching; per-expert token counts reach Engine.stats() and /metrics."""
import numpy as np
import pytest

from jpaged.sampling_params import SamplingParams
from jpaged.server.metrics import expert_metrics
from tests.engine.test_engine import make_engine, run_engine
from tests.hf_reference import hf_greedy, jpaged_from_hf, tiny_hf_model
from tests.multihost.devices import on_cpu_devices

NEW_TOKENS = 20


@pytest.mark.long
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_moe_greedy_equals_hf_under_preemption_and_prefix_caching(family, byte_tokenizer):
    hf = tiny_hf_model(family, seed=5)
    rng = np.random.RandomState(0)
    shared = rng.randint(3, 256, size=32).tolist()
    prompts = [(shared if i % 2 else []) + rng.randint(3, 256, size=n).tolist()
               for i, n in enumerate([1, 5, 9, 14, 15, 3, 20, 7])]
    expected = [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
    # 12 pages of 16 tokens hold far less than the 8 sequences need as they grow: some get preempted.
    engine = make_engine(jpaged_from_hf(hf), byte_tokenizer, num_kv_blocks=12, max_num_seqs=8,
                         max_num_batched_tokens=64, max_model_len=256, max_num_prefill_seqs=2)
    outs = run_engine(engine, prompts, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == expected
    stats = engine.stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0, {k: v for k, v in stats.items() if "expert" not in k}
    assert stats["num_used_pages"] == 0
    # Every computed token (prefills again after preemption included) chose k experts in each MoE layer.
    cfg = engine.model.config
    assert stats["expert_tokens"].shape == (cfg.num_experts,)
    assert stats["expert_tokens"].sum() % (cfg.num_experts_per_tok * len(cfg.moe_layers)) == 0
    assert stats["expert_tokens"].sum() >= (sum(map(len, prompts)) - 4 * 32) * cfg.num_experts_per_tok
    names = {m.name for m in expert_metrics(stats)}
    assert names == {"jpaged_moe_expert_tokens", "jpaged_moe_expert_tokens_last_step",
                     "jpaged_moe_expert_load_imbalance"}


def test_expert_stats_only_for_moe_models_and_metrics_per_expert():
    from jpaged.engine.expert_load import ExpertLoad, imbalance
    assert ExpertLoad(0).stats() == {}
    load = ExpertLoad(4)
    load.record(np.asarray([[1, 0, 3, 0], [2, 2, 0, 0]], np.int32))
    load.record(np.asarray([[0, 4, 0, 0], [0, 0, 0, 4]], np.int32))
    s = load.stats()
    np.testing.assert_array_equal(s["expert_tokens"], [3, 6, 3, 4])
    np.testing.assert_array_equal(s["expert_tokens_last_step"], [0, 4, 0, 4])
    assert imbalance(s["expert_tokens_last_step"]) == 2.0
    with pytest.raises(ValueError, match="expert counts"):
        load.record(np.zeros((2, 3), np.int32))
    families = {m.name: m for m in expert_metrics(s)}
    assert [smp.value for smp in families["jpaged_moe_expert_tokens"].samples] == [3, 6, 3, 4]


@pytest.mark.long
@on_cpu_devices(4)
def test_engine_expert_and_tensor_parallel_greedy_equals_hf():
    """--tensor-parallel-size 4, with the experts split over the devices (--enable-expert-parallel) and
    with each expert split over them: HF's greedy tokens both ways."""
    from jax.sharding import PartitionSpec as P

    from jpaged.config import EngineConfig
    from jpaged.engine.llm_engine import Engine
    from tests.engine.conftest import ByteTokenizer

    hf = tiny_hf_model("qwen3_moe", seed=7)   # 8 experts, 4 q heads / 2 kv heads (repeated to 4)
    rng = np.random.RandomState(0)
    prompts = [rng.randint(3, 256, size=n).tolist() for n in (5, 40)]
    expected = [hf_greedy(hf, p, 6) for p in prompts]
    for ep in (True, False):
        engine = Engine(EngineConfig(model="test", dtype="float32", num_kv_blocks=32, max_model_len=128,
                                     max_num_batched_tokens=64, tensor_parallel_size=4, enable_expert_parallel=ep),
                        model=jpaged_from_hf(hf), tokenizer=ByteTokenizer())
        outs = run_engine(engine, prompts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
        assert [o.outputs[0].token_ids for o in outs] == expected, ep
        spec = engine.model.layers[0].mlp.experts_gate[...].sharding.spec
        assert spec == (P("model", None, None) if ep else P(None, None, "model"))
        assert engine.stats()["expert_tokens"].sum() > 0
