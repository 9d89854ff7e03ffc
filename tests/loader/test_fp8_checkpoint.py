"""HF checkpoints already in fp8 (quantization_config.quant_method "fp8"): weights dequantized at load."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from jpaged.loader import load_model
from tests.hf_reference import tiny_hf_model


def _fp8_checkpoint(tmp_path, per_channel: bool):
    """The tiny model saved, its projection weights then rewritten as fp8 e4m3 with weight_scale (per
    channel or per tensor) and an input_scale, as fp8 Llama-3 checkpoints are published."""
    tiny_hf_model("llama3").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    out = {}
    for name, w in tensors.items():
        if name.endswith("_proj.weight"):
            amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().max()
            scale = (amax / 448.0).float()
            out[name] = (w / scale).to(torch.float8_e4m3fn)
            out[name + "_scale"] = scale
            out[name.replace(".weight", ".input_scale")] = torch.tensor(1.0)
        else:
            out[name] = w
    save_file(out, tmp_path / "model.safetensors")
    out = {k: v.float().numpy() for k, v in out.items()}
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
def test_fp8_checkpoint_loads_its_dequantized_weights(tmp_path, per_channel):
    saved = _fp8_checkpoint(tmp_path, per_channel)
    model, _ = load_model(str(tmp_path), dtype="float32")
    name = "model.layers.1.mlp.up_proj.weight"
    want = saved[name].astype(np.float32) * saved[name + "_scale"]
    np.testing.assert_array_equal(np.asarray(model.layers[1].mlp.up_proj.kernel[...]).T, want)


def test_other_quantized_checkpoints_are_refused_by_name(tmp_path):
    tiny_hf_model("llama3").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quant_method='awq' checkpoints are not supported"):
        load_model(str(tmp_path))
