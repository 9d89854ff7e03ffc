"""`jpaged convert` writes an orbax checkpoint that restores to the same model and tokenizer."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jpaged.cli import main
from jpaged.loader import load_model
from jpaged.loader.orbax_ckpt import is_checkpoint, save_checkpoint
from tests.hf_reference import tiny_hf_model
from tests.loader.helpers import write_hf_tokenizer
from tests.loader.test_hf_dir import all_logits

IDS = list(range(3, 40))


@pytest.fixture
def hf_dir(tmp_path):
    tiny_hf_model("qwen2").save_pretrained(tmp_path / "hf")
    write_hf_tokenizer(tmp_path / "hf")
    return tmp_path / "hf"


def test_convert_round_trip_restores_identical_params_and_tokenizer(hf_dir, tmp_path):
    assert main(["convert", str(hf_dir), str(tmp_path / "ck")]) == 0
    assert is_checkpoint(tmp_path / "ck")
    src_model, src_tok = load_model(str(hf_dir))
    model, tok = load_model(str(tmp_path / "ck"))
    assert model.config == src_model.config
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(src_model, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(all_logits(model, IDS), all_logits(src_model, IDS))
    text = "Grüße 日本 <s>"
    assert tok.encode(text) == src_tok.encode(text)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == src_tok.apply_chat_template(
        [{"role": "user", "content": "hi"}])


def test_restore_casts_to_the_requested_dtype(hf_dir, tmp_path):
    assert main(["convert", str(hf_dir), str(tmp_path / "ck")]) == 0
    model, _ = load_model(str(tmp_path / "ck"), dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
    assert json.loads((tmp_path / "ck" / "jpaged.json").read_text())["dtype"] == "float32"


def test_convert_refuses_an_existing_destination(hf_dir, tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "keep.txt").write_text("mine")
    model, tok = load_model(str(hf_dir))
    with pytest.raises(ValueError, match="already exists"):
        save_checkpoint(model, tok, tmp_path / "ck")
    assert (tmp_path / "ck" / "keep.txt").read_text() == "mine"


def test_damaged_checkpoint_is_a_value_error(hf_dir, tmp_path):
    assert main(["convert", str(hf_dir), str(tmp_path / "ck")]) == 0
    import shutil
    shutil.rmtree(tmp_path / "ck" / "params")
    with pytest.raises(ValueError, match="cannot restore params"):
        load_model(str(tmp_path / "ck"))
