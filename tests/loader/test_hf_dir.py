"""HF model dirs (config.json + safetensors, single or sharded) load to the same logits as HF transformers."""
import numpy as np
import pytest
import torch

from models.kv_cache import contiguous_step_input
from jpaged.loader import load_model
from tests.hf_reference import hf_logits, tiny_hf_model

PAGE = 16
FAMILIES = ["llama3", "llama_tied", "mistral", "qwen2", "qwen3"]


def all_logits(model, ids):
    num_pages = -(-len(ids) // PAGE)
    cache = model.new_kv_cache(num_pages=num_pages, page_size=PAGE)
    logits, _ = model(cache, contiguous_step_input(ids, 0, PAGE, num_pages, all_logits=True))
    return np.asarray(logits)


IDS = np.random.RandomState(0).randint(0, 256, size=40)


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_safetensors_round_trip_matches_hf_logits(tmp_path, family, sharded):
    hf = tiny_hf_model(family)
    hf.save_pretrained(tmp_path, max_shard_size="40KB" if sharded else "1GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    model, tokenizer = load_model(str(tmp_path))
    assert tokenizer is None  # save_pretrained of a bare model writes no tokenizer
    np.testing.assert_allclose(all_logits(model, IDS), hf_logits(hf, IDS), atol=1e-4, rtol=0)


def test_bf16_checkpoint_loads_exactly_into_fp32(tmp_path):
    hf = tiny_hf_model("qwen3").to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    model, _ = load_model(str(tmp_path), dtype="float32")
    ref = hf.state_dict()["model.layers.1.mlp.up_proj.weight"].float().numpy()
    np.testing.assert_array_equal(np.asarray(model.layers[1].mlp.up_proj.kernel[...]).T, ref)


def test_bfloat16_load_casts_every_param_and_stays_close_to_fp32(tmp_path):
    hf = tiny_hf_model("llama3")
    hf.save_pretrained(tmp_path)
    model, _ = load_model(str(tmp_path), dtype="bfloat16")
    from flax import nnx
    import jax
    import jax.numpy as jnp
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
    # bf16 keeps 8 mantissa bits; through 2 layers logits of scale ~1 drift by a few 1e-2.
    np.testing.assert_allclose(all_logits(model, IDS), hf_logits(hf, IDS), atol=5e-2, rtol=0)


def test_unsupported_architecture_is_a_value_error(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    with pytest.raises(ValueError, match="unsupported architecture"):
        load_model(str(tmp_path))


def test_corrupt_safetensors_is_a_value_error(tmp_path):
    tiny_hf_model("llama3").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="corrupt or unreadable safetensors"):
        load_model(str(tmp_path))


def test_truncated_safetensors_is_a_value_error(tmp_path):
    tiny_hf_model("llama3").save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="safetensors"):
        load_model(str(tmp_path))


def test_unknown_spec_names_the_accepted_forms():
    with pytest.raises(ValueError, match="not found: expected 'default', an HF model dir"):
        load_model("/no/such/model")


def test_preset_builds_random_model_with_byte_tokenizer():
    model, tokenizer = load_model("tiny-llama")
    assert model.config.num_layers == 2 and model.config.vocab_size == 256
    ids = tokenizer.encode("héllo")
    assert ids == list("héllo".encode()) and tokenizer.decode(ids) == "héllo"
    assert all_logits(model, ids).shape == (len(ids), 256)


def test_bad_dtype_is_a_value_error():
    with pytest.raises(ValueError, match="dtype must be .auto. or one of"):
        load_model("tiny-llama", dtype="float16")
