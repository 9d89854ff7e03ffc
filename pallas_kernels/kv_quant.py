"""8-bit KV pages: the storage formats, quantize / dequantize with one float32 scale per (token, kv head),
and the per-element error bound of each format.

A quantized page holds `[page_size, Hkv, D]` 8-bit values plus `[page_size, Hkv]` float32 scales (the
scale arrays live beside the pages in `models.kv_cache.KVCache`). The value of element d of token t,
head h is `float(q[t, h, d]) * scale[t, h]`; the scale is `max_d |x[t, h, d]| / FORMAT_MAX`, so every token
is quantized alone when it is written, and a page filling up token by token never rescales what it holds
(pallas_kernels/README.md, "Quantized KV pages").
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# the `--kv-cache-dtype` names -> storage dtype (vLLM's spelling: "fp8" is e4m3)
KV_CACHE_DTYPES = {
    "fp8": jnp.dtype(jnp.float8_e4m3fn),
    "fp8_e4m3": jnp.dtype(jnp.float8_e4m3fn),
    "fp8_e5m2": jnp.dtype(jnp.float8_e5m2),
    "int8": jnp.dtype(jnp.int8),
}
QUANTIZED_DTYPES = tuple(dict.fromkeys(KV_CACHE_DTYPES.values()))
SCALE_DTYPE = jnp.dtype(jnp.float32)

# Largest magnitude each format stores (int8: symmetric, -127 .. 127).
_FORMAT_MAX = {
    jnp.dtype(jnp.float8_e4m3fn): 448.0,
    jnp.dtype(jnp.float8_e5m2): 57344.0,
    jnp.dtype(jnp.int8): 127.0,
}
# Rounding error of one element as (relative to |x|, absolute in units of the scale): fp8 rounds to
# nearest with m mantissa bits (2^-(m+1) relative) and its subnormals are spaced 2^-(m + bias - 1)
# (half of that absolute); int8 rounds to the nearest integer (0.5 absolute).
_ERROR = {
    jnp.dtype(jnp.float8_e4m3fn): (2.0 ** -4, 2.0 ** -10),
    jnp.dtype(jnp.float8_e5m2): (2.0 ** -3, 2.0 ** -17),
    jnp.dtype(jnp.int8): (0.0, 0.5),
}


def is_quantized(dtype) -> bool:
    """Whether pages of `dtype` are 8-bit values with scales."""
    return jnp.dtype(dtype) in _FORMAT_MAX


def format_max(dtype) -> float:
    dtype = jnp.dtype(dtype)
    if dtype not in _FORMAT_MAX:
        raise ValueError(f"dtype must be one of {[str(d) for d in QUANTIZED_DTYPES]}, got {dtype}")
    return _FORMAT_MAX[dtype]


def resolve_kv_cache_dtype(name: str, model_dtype) -> jnp.dtype:
    """The page dtype of `--kv-cache-dtype name`: 'auto' keeps the model dtype, 'bfloat16' / 'float32' /
    'fp8' / 'fp8_e4m3' / 'fp8_e5m2' / 'int8' name one."""
    if name == "auto":
        return jnp.dtype(model_dtype)
    if name in ("bfloat16", "float32"):
        return jnp.dtype(name)
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be 'auto', 'bfloat16', 'float32' or one of "
                         f"{tuple(KV_CACHE_DTYPES)}, got {name!r}")
    return KV_CACHE_DTYPES[name]


def quantize(x: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """(values [..., D] in `dtype`, scales [...] float32) of x [..., D]: one scale per row of D elements.

    An all-zero row gets scale 1 (its values are zeros). The scale is computed in float32 from x as given.
    """
    dtype = jnp.dtype(dtype)
    fmax = format_max(dtype)
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1)
    scale = jnp.where(amax > 0, amax / fmax, 1.0).astype(SCALE_DTYPE)
    y = x32 / scale[..., None]
    y = jnp.clip(y, -fmax, fmax)
    if dtype == jnp.int8:
        y = jnp.floor(y + 0.5)   # round half up: floor lowers everywhere (Triton too), and |error| <= 0.5
    return y.astype(dtype), scale


def dequantize(values: jax.Array, scales: jax.Array, dtype=jnp.float32) -> jax.Array:
    """values [..., D] * scales [...] as `dtype`."""
    return (values.astype(jnp.float32) * scales[..., None].astype(jnp.float32)).astype(dtype)


def error_bound(x, dtype) -> np.ndarray:
    """The largest |x - dequantize(*quantize(x))| each element of x [..., D] may see (float64 numpy)."""
    dtype = jnp.dtype(dtype)
    rel, abs_ = _ERROR[dtype]
    x = np.abs(np.asarray(x, np.float64))
    scale = np.max(x, axis=-1, keepdims=True) / format_max(dtype)
    # + float32 rounding of x / scale and of the scale itself (a few ulps of |x|).
    return rel * x + abs_ * scale + 4 * np.finfo(np.float32).eps * x


__all__ = ["KV_CACHE_DTYPES", "QUANTIZED_DTYPES", "SCALE_DTYPE", "dequantize", "error_bound", "format_max",
           "is_quantized", "quantize", "resolve_kv_cache_dtype"]
