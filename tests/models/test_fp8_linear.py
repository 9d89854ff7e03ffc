"""fp8 weights (W8A8): the GEMM equals a float64 oracle on the quantized operands, a quantized tiny model
stays close to the float32 one, and devices that cannot run it are refused by name."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jpaged.config import EngineConfig
from models import fp8_linear
from models.kv_cache import contiguous_step_input
from pallas_kernels import kv_quant
from tests.hf_reference import jpaged_from_hf, tiny_hf_model

CPU = types.SimpleNamespace(platform="cpu")


def test_fp8_gemm_equals_a_float64_oracle_on_the_quantized_operands():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 5, 64)) * 3, jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((64, 48)) * rng.uniform(0.01, 1, (1, 48)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(48), jnp.float32)
    lin = fp8_linear.Fp8Linear.from_kernel(kernel, bias, emulated=True)
    assert lin.weight[...].shape == (48, 64) and lin.weight[...].dtype == jnp.float8_e4m3fn
    got = np.asarray(lin(x), np.float64)
    xq, xs = kv_quant.quantize(x.reshape(-1, 64), fp8_linear.FP8)
    x64 = np.asarray(xq, np.float64) * np.asarray(xs, np.float64)[:, None]
    w64 = np.asarray(lin.weight[...], np.float64) * np.asarray(lin.weight_scale[...], np.float64)[:, None]
    want = (x64 @ w64.T + np.asarray(bias, np.float64)).reshape(2, 5, 48)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # and the quantized GEMM is a close approximation of the float one
    exact = np.asarray(x, np.float64) @ np.asarray(kernel, np.float64) + np.asarray(bias, np.float64)
    assert np.abs(got - exact).max() < 0.1 * np.abs(exact).max()


@pytest.mark.long
def test_fp8_model_stays_close_to_float32():
    hf = tiny_hf_model("llama3", seed=7)
    tokens = np.random.RandomState(0).randint(3, 256, size=24)
    logits = []
    for quantize in (False, True):
        model = jpaged_from_hf(hf)
        model.fuse_projections()
        if quantize:
            assert fp8_linear.quantize_model(model, CPU) == 4 * model.config.num_layers
        step = contiguous_step_input(tokens, 0, page_size=16, num_pages=2, all_logits=True)
        out, _ = nnx.jit(lambda m, c, s: m(c, s))(model, model.new_kv_cache(2, 16), step)
        logits.append(np.asarray(out))
    ref, got = logits
    cos = (ref * got).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(got, axis=-1)
    assert cos.min() > 0.99
    assert (ref.argmax(-1) == got.argmax(-1)).mean() >= 0.8


def test_devices_without_fp8_are_refused_by_name():
    assert fp8_linear.device_mode(CPU) == "emulated"
    assert fp8_linear.device_mode(types.SimpleNamespace(platform="gpu", compute_capability="9.0")) == "native"
    with pytest.raises(ValueError, match="compute capability >= 8.9"):
        fp8_linear.device_mode(types.SimpleNamespace(platform="gpu", compute_capability="8.0"))
    with pytest.raises(ValueError, match="got a tpu device"):
        fp8_linear.device_mode(types.SimpleNamespace(platform="tpu"))
    with pytest.raises(ValueError, match="quantization must be one of"):
        EngineConfig(quantization="int4")
    with pytest.raises(ValueError, match="tensor_parallel_size > 1 is not implemented"):
        EngineConfig(quantization="fp8", tensor_parallel_size=2)
