"""LoRA pieces without the engine: the batched delta against its reference, the PEFT loader's refusals,
the slot LRU, and the model's logits through an adapter against HF transformers + PEFT."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from jpaged.lora import LoRAManager, LoRARequest, load_peft_adapter
from models.kv_cache import contiguous_step_input
from pallas_kernels import Backend, lora_delta
from pallas_kernels.lora import lora_delta_reference
from tests.hf_reference import hf_logits, jpaged_from_hf
from tests.lora.helpers import write_adapter


@pytest.mark.parametrize("impl", ["masked", "ragged"])
def test_lora_delta_equals_per_token_gather(impl):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(13, 24)), jnp.float32)
    a = jnp.asarray(rng.normal(size=(24, 3, 4)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(3, 4, 10)), jnp.float32)
    index = jnp.asarray([2, -1, 0, 0, 1, -1, 2, 1, 0, -1, -1, 2, 0], jnp.int32)
    got = lora_delta(x, a, b, index, backend=Backend(lora=impl))
    np.testing.assert_allclose(got, lora_delta_reference(x, a, b, index), rtol=1e-5, atol=1e-5)
    assert not np.asarray(got)[np.asarray(index) < 0].any()


def _edit_config(path, **fields):
    with open(os.path.join(path, "adapter_config.json")) as f:
        config = json.load(f)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config | fields, f)


@pytest.mark.parametrize("fields, message", [
    (dict(use_dora=True), "use_dora"),
    (dict(target_modules=["q_proj", "embed_tokens"]), "target_modules"),
    (dict(bias="all"), "bias"),
    (dict(r=0), "r must be"),
    (dict(rank_pattern={"q_proj": 4}), "rank_pattern"),
    (dict(peft_type="IA3"), "peft_type"),
])
def test_loader_refuses_what_it_cannot_serve_by_field(tiny_llama, tmp_path, fields, message):
    path = write_adapter(str(tmp_path / "a"), tiny_llama[1].config, rank=4, targets=("q_proj", "v_proj"))
    _edit_config(path, **fields)
    with pytest.raises(ValueError, match=message):
        load_peft_adapter(path, num_layers=tiny_llama[1].config.num_layers, max_rank=16)


def test_loader_checks_rank_and_scales(tiny_llama, tmp_path):
    cfg = tiny_llama[1].config
    path = write_adapter(str(tmp_path / "a"), cfg, rank=8, alpha=32.0, use_rslora=True)
    with pytest.raises(ValueError, match="max_lora_rank=4"):
        load_peft_adapter(path, num_layers=cfg.num_layers, max_rank=4)
    assert load_peft_adapter(path, num_layers=cfg.num_layers).scale == pytest.approx(32.0 / 8 ** 0.5)
    _edit_config(path, use_rslora=False)
    assert load_peft_adapter(path, num_layers=cfg.num_layers).scale == pytest.approx(4.0)
    with pytest.raises(ValueError, match="adapter_config.json"):
        load_peft_adapter(str(tmp_path), num_layers=cfg.num_layers)


def test_slots_are_least_recently_used_first(tiny_llama, tmp_path):
    cfg = tiny_llama[1].config
    manager = LoRAManager(cfg, max_loras=2, max_lora_rank=8, dtype=jnp.float32)
    for i in (1, 2, 3):
        manager.add(LoRARequest(f"a{i}", i, write_adapter(str(tmp_path / f"a{i}"), cfg, rank=4, seed=i)))
    slots = manager.activate([1])
    slots |= manager.activate([2])
    manager.activate([1])                       # 2 is now the least recently used
    assert manager.activate([3]) == {3: slots[2]} and manager.resident == [1, 3]
    assert manager.activate([2, 3]) == {2: slots[1], 3: slots[2]} and manager.num_evictions == 2
    with pytest.raises(ValueError, match="max_loras=2"):
        manager.activate([1, 2, 3])
    with pytest.raises(ValueError, match="already"):
        manager.add(LoRARequest("a1", 9, manager.requests[1].lora_path))
    manager.remove(2)
    assert manager.resident == [3] and manager.activate([1]) == {1: slots[1]}


def test_logits_through_an_adapter_match_hf_and_peft(tiny_llama, lora_requests):
    peft = pytest.importorskip("peft")
    hf, _ = tiny_llama
    request = lora_requests[1]  # rank 16, rsLoRA, every target
    peft_model = peft.PeftModel.from_pretrained(hf, request.lora_path).eval()
    ids = list(range(3, 23))
    try:
        expected = hf_logits(peft_model, ids)
    finally:
        peft_model.unload()
    model = jpaged_from_hf(hf)
    model.fuse_projections()
    manager = LoRAManager(model.config, max_loras=2, max_lora_rank=16, dtype=jnp.float32, fused=True)
    manager.add(request)
    slot = manager.activate([request.lora_int_id])[request.lora_int_id]
    step = contiguous_step_input(ids, 0, page_size=8, num_pages=4, all_logits=True)
    step = step.replace(lora_index=jnp.full(len(ids), slot, jnp.int32))
    logits, _ = model(model.new_kv_cache(4, 8), step, lora=manager.weights)
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=2e-4, atol=2e-4)
    assert np.abs(expected - hf_logits(hf, ids)).max() > 1e-2, "the adapter must change the logits"


def test_serve_flags_and_config_refusals():
    from jpaged import cli
    from jpaged.config import EngineConfig
    from jpaged.server.api_server import engine_config

    args = cli.build_parser().parse_args(["serve", "--enable-lora", "--lora-modules", "a=/x", "b=/y",
                                          "--max-loras", "3", "--max-lora-rank", "32"])
    config = engine_config(args)
    assert (config.enable_lora, config.lora_modules, config.max_loras, config.max_lora_rank) == (
        True, ("a=/x", "b=/y"), 3, 32)
    for fields, message in [(dict(lora_modules=("a=/x",)), "needs enable_lora"),
                            (dict(enable_lora=True, lora_modules=("nopath",)), "NAME=PATH"),
                            (dict(enable_lora=True, max_loras=0), "max_loras"),
                            (dict(enable_lora=True, data_parallel_size=2), "data_parallel_size")]:
        with pytest.raises(ValueError, match=message):
            EngineConfig(**fields)
