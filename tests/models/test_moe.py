"""Mixture of experts (models/moe.py): Mixtral and Qwen3-MoE match HF transformers; configs, routing and
the weight table; expert and tensor parallelism over 4 CPU devices give one device's logits and tokens."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P

from models import LlamaForCausalLM, ModelConfig
from models.kv_cache import contiguous_step_input
from models.moe import expert_tokens, route
from tests.hf_reference import MOE_FAMILIES, hf_greedy, hf_logits, jpaged_from_hf, tiny_hf_model
from tests.multihost.devices import on_cpu_devices

PAGE = 16


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_fp32_logits_and_greedy_match_hf(family):
    """Prefill logits at every position, then greedy decode steps on the same paged cache."""
    hf = tiny_hf_model(family, seed=3)
    model = jpaged_from_hf(hf)
    assert model.config.is_moe and len(model.config.moe_layers) == 2
    ids = np.random.RandomState(2).randint(0, 256, size=21)
    new, num_pages = 6, 3
    step = jax.jit(lambda m, c, s: m(c, s))
    cache = model.new_kv_cache(num_pages, PAGE)
    logits, cache = step(model, cache, contiguous_step_input(ids, 0, PAGE, num_pages, all_logits=True))
    np.testing.assert_allclose(np.asarray(logits), hf_logits(hf, ids), atol=1e-4, rtol=0)
    tokens = [int(jnp.argmax(logits[-1]))]
    for i in range(new - 1):
        logits, cache = step(model, cache, contiguous_step_input([tokens[-1]], len(ids) + i, PAGE, num_pages))
        tokens.append(int(jnp.argmax(logits[-1])))
    assert tokens == hf_greedy(hf, ids, new)


def test_qwen3_moe_config_mixes_dense_and_sparse_layers_and_round_trips():
    hf = transformers.Qwen3MoeConfig(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3],
                                     num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32,
                                     norm_topk_prob=True, architectures=["Qwen3MoeForCausalLM"]).to_dict()
    hf["num_experts"] = hf.pop("num_local_experts", 16)   # what released checkpoints' config.json says
    cfg = ModelConfig.from_hf(hf)
    assert cfg.moe_layers == (1, 5) and cfg.num_experts == 16 and cfg.norm_topk_prob and cfg.qk_norm
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    mixtral = ModelConfig.from_hf(transformers.MixtralConfig(
        num_hidden_layers=3, num_local_experts=8, num_experts_per_tok=2, intermediate_size=96,
        architectures=["MixtralForCausalLM"]).to_dict())
    assert mixtral.moe_layers == (0, 1, 2) and mixtral.moe_intermediate_size == 96 and mixtral.norm_topk_prob
    assert ModelConfig.from_hf(mixtral.to_hf()) == mixtral
    # Active parameters count k of the X experts of each MoE layer.
    routed = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 2
    assert cfg.num_params() - cfg.num_params(active=True) == routed * (16 - 4)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        ModelConfig.from_hf(hf | {"num_experts_per_tok": 17})


def test_route_renormalises_only_when_asked_and_counts_only_real_tokens():
    logits = jnp.asarray([[0.0, 2.0, 1.0, -1.0], [3.0, 0.0, 0.0, 0.5], [0.0, 0.0, 9.0, 0.0]])
    w, e = route(logits, 2, norm_topk_prob=False)
    probs = jax.nn.softmax(logits)
    np.testing.assert_array_equal(e, [[1, 2], [0, 3], [2, 0]])
    np.testing.assert_allclose(w, jnp.take_along_axis(probs, e, 1), rtol=1e-6)
    w_norm, _ = route(logits, 2, norm_topk_prob=True)
    np.testing.assert_allclose(w_norm.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(expert_tokens(e, 4), [2, 1, 2, 1])
    np.testing.assert_array_equal(expert_tokens(e, 4, num_tokens=jnp.int32(2)), [1, 1, 1, 1])


def test_weight_table_stacks_experts_and_refuses_a_missing_one():
    from models.weights import hf_name_to_path, load_hf_weights
    assert hf_name_to_path("model.layers.3.block_sparse_moe.experts.5.w3.weight") == (
        ("layers", 3, "mlp", "experts_up", 5), True)
    assert hf_name_to_path("model.layers.0.mlp.experts.7.down_proj.weight") == (
        ("layers", 0, "mlp", "experts_down", 7), True)
    assert hf_name_to_path("model.layers.2.mlp.gate.weight") == (("layers", 2, "mlp", "router", "kernel"), True)
    hf = tiny_hf_model("mixtral")
    weights = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    # HF keeps experts fused in memory; a checkpoint names each one (what save_pretrained writes).
    names = []
    for k, v in list(weights.items()):
        if k.endswith("experts.gate_up_proj"):
            base, f = k[:-len("mlp.experts.gate_up_proj")], v.shape[1] // 2
            for e in range(v.shape[0]):
                names += [(f"{base}block_sparse_moe.experts.{e}.w1.weight", v[e, :f]),
                          (f"{base}block_sparse_moe.experts.{e}.w3.weight", v[e, f:])]
        elif k.endswith("experts.down_proj"):
            base = k[:-len("mlp.experts.down_proj")]
            names += [(f"{base}block_sparse_moe.experts.{e}.w2.weight", v[e]) for e in range(v.shape[0])]
        else:
            names.append((k, v))
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    model = nnx.eval_shape(lambda: LlamaForCausalLM(cfg))
    load_hf_weights(model, names)
    np.testing.assert_array_equal(model.layers[1].mlp.experts_down[...][2],
                                  weights["model.layers.1.mlp.experts.down_proj"][2].T)
    model = nnx.eval_shape(lambda: LlamaForCausalLM(cfg))
    with pytest.raises(ValueError, match=r"lacks experts \[3\]"):
        load_hf_weights(model, [(n, v) for n, v in names if ".experts.3.w1" not in n])


MOE_TINY = ModelConfig(architecture="Qwen3MoeForCausalLM", vocab_size=256, hidden_size=64, intermediate_size=128,
                       num_layers=2, num_heads=8, num_kv_heads=8, head_dim=16, qk_norm=True, num_experts=8,
                       num_experts_per_tok=3, moe_intermediate_size=64, norm_topk_prob=False, moe_layers=(1,))


@pytest.mark.long
@on_cpu_devices(4)
def test_expert_and_tensor_parallel_match_one_device():
    """Experts split over 4 devices (all-to-all dispatch) and each expert split 4 ways give the logits and
    greedy tokens of one device."""
    from jpaged import sharding
    from tests.multihost.greedy import greedy
    model = LlamaForCausalLM(MOE_TINY, rngs=nnx.Rngs(7))
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, jax.tree.map(lambda x: x * 4.0, state))
    want, want_logits = greedy(model, new_tokens=4)
    mesh = sharding.make_mesh(4)
    for ep in (True, False):
        placed = sharding.shard_model(model, mesh, expert_parallel=ep)
        want_spec = P(sharding.MODEL, None, None) if ep else P(None, None, sharding.MODEL)
        assert placed.layers[1].mlp.experts_gate[...].sharding.spec == want_spec
        got, logits = greedy(placed, mesh, new_tokens=4)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), atol=2e-5, rtol=1e-5)
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="must divide num_experts"):
        sharding.shard_model(model, sharding.make_mesh(3), expert_parallel=True)


def test_lora_on_a_moe_model_is_refused_by_name():
    from jpaged.config import EngineConfig
    from jpaged.engine.llm_engine import Engine
    from tests.engine.conftest import ByteTokenizer

    config = EngineConfig(model="test", dtype="float32", num_kv_blocks=8, max_model_len=64, enable_lora=True)
    with pytest.raises(ValueError, match="enable_lora with a mixture-of-experts model"):
        Engine(config, model=LlamaForCausalLM(MOE_TINY, rngs=nnx.Rngs(0)), tokenizer=ByteTokenizer())
