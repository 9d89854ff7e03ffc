"""fp8 weights (W8A8, `EngineConfig.quantization="fp8"`): the decoder layers' linear layers as fp8 e4m3
GEMMs with a float32 scale per output channel (weights, quantized once at load) and per token
(activations, quantized on the fly).

Layout: the weight is stored `[N, K]` (output channels first) and the GEMM contracts the last axis of
both operands; with that layout XLA's fp8 GEMM on Hopper runs at about twice bf16's rate, where the
`[K, N]` layout runs slower than bf16 (the measurement: issue 25's text, bench/kv_quant_gpu.py). The
scales are applied to the GEMM's result (`y[t, n] * x_scale[t] * w_scale[n]`).

Devices: NVIDIA GPUs of compute capability 8.9 or more run the fp8 GEMM itself; on CPU the same
quantized values are multiplied in float32 (an emulation: same rounding of the inputs, no fp8 speed);
anything else is refused by name.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from pallas_kernels import kv_quant

FP8 = jnp.dtype(jnp.float8_e4m3fn)


def device_mode(device) -> str:
    """'native' (fp8 GEMMs) or 'emulated' (CPU) for `device`; ValueError where fp8 weights cannot run."""
    platform = getattr(device, "platform", None)
    if platform == "cpu":
        return "emulated"
    if platform == "gpu":
        cc = getattr(device, "compute_capability", None)
        try:
            major, minor = (int(x) for x in str(cc).split("."))
        except ValueError:
            major = minor = 0
        if (major, minor) >= (8, 9):
            return "native"
        raise ValueError(f"quantization='fp8' needs an NVIDIA GPU of compute capability >= 8.9 (Ada, Hopper), "
                         f"got {cc}")
    raise ValueError(f"quantization='fp8' runs on NVIDIA GPUs (compute capability >= 8.9) or, emulated, on CPU; "
                     f"got a {platform} device")


def quantize_weight(kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(w [N, K] fp8 e4m3, scale [N] float32) of a `[K, N]` kernel: one scale per output channel."""
    return kv_quant.quantize(kernel.T, FP8)


class Fp8Linear(nnx.Module):
    """y = x @ W (+ bias) as an fp8 GEMM; W is held as `weight [N, K]` fp8 with `weight_scale [N]`."""

    def __init__(self, weight: jax.Array, weight_scale: jax.Array, bias: jax.Array | None, *, emulated: bool):
        if weight.dtype != FP8 or weight.ndim != 2 or weight_scale.shape != weight.shape[:1]:
            raise ValueError(f"weight must be [N, K] {FP8} with weight_scale [N], got {weight.dtype} "
                             f"{weight.shape} and {weight_scale.shape}")
        self.weight = nnx.Param(weight)
        self.weight_scale = nnx.Param(weight_scale.astype(jnp.float32))
        self.bias = None if bias is None else nnx.Param(bias)
        self.emulated = emulated

    @classmethod
    def from_kernel(cls, kernel: jax.Array, bias: jax.Array | None, *, emulated: bool) -> "Fp8Linear":
        weight, scale = quantize_weight(kernel)
        return cls(weight, scale, bias, emulated=emulated)

    def __call__(self, x: jax.Array) -> jax.Array:
        lead, k = x.shape[:-1], x.shape[-1]
        xq, x_scale = kv_quant.quantize(x.reshape(-1, k), FP8)          # [M, K] fp8, [M] per token
        w = self.weight[...]
        dims = (((1,), (1,)), ((), ()))
        if self.emulated:
            y = lax.dot_general(xq.astype(jnp.float32), w.astype(jnp.float32), dims,
                                precision=lax.Precision.HIGHEST)
        else:
            out = jnp.bfloat16 if x.dtype == jnp.bfloat16 else jnp.float32
            y = lax.dot_general(xq, w, dims, preferred_element_type=out)
        y = y.astype(jnp.float32) * x_scale[:, None] * self.weight_scale[...][None, :]
        y = y.astype(x.dtype).reshape(*lead, w.shape[0])
        return y if self.bias is None else y + self.bias[...]


# The linear layers of a decoder layer, by (sub-module, attribute); the separate or the fused ones exist.
_LINEARS = (("self_attn", ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj")),
            ("mlp", ("gate_proj", "up_proj", "gate_up_proj", "down_proj")))


def quantize_model(model, device) -> int:
    """In place: every linear layer of `model`'s decoder layers becomes an `Fp8Linear` (the embedding and
    the LM head stay in the model dtype). Returns how many were quantized; ValueError (before anything
    changes) where `device` cannot run fp8 weights."""
    emulated = device_mode(device) == "emulated"
    count = 0
    for layer in model.layers:
        for sub_name, names in _LINEARS:
            sub = getattr(layer, sub_name)
            for name in names:
                lin = getattr(sub, name, None)
                if lin is None or isinstance(lin, Fp8Linear):
                    continue
                bias = None if getattr(lin, "bias", None) is None else lin.bias[...]
                setattr(sub, name, Fp8Linear.from_kernel(lin.kernel[...], bias, emulated=emulated))
                count += 1
    return count


__all__ = ["FP8", "Fp8Linear", "device_mode", "quantize_model", "quantize_weight"]
