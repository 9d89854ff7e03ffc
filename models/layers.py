"""Shared pieces of the Llama-family decoders: RMSNorm, RoPE (with Llama-3 scaling), the one attention call.

Axis names in shape comments: T tokens, Hq query heads, Hkv kv heads, D head dim, E model dim.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from models import sharding
from models.config import RopeScaling
from models.kv_cache import StepInput
from pallas_kernels import Backend


# A norm that feeds a GEMM (`before_gemm`) puts its output behind an optimization barrier from this many
# rows up. Without it XLA pulls the weight multiply into the GEMM's fusion, keeps cuBLAS for the GEMM and
# emits the multiply as a pass of its own: one more read and write of [T, hidden] per norm (measured in
# bench/README.md). Below it the pass costs next to nothing and a barrier could keep XLA from fusing the
# norm into a small GEMM.
NORM_BARRIER_MIN_ROWS = 256


class RMSNorm(nnx.Module):
    """HF's RMSNorm: normalise in float32, scale in the input dtype."""

    def __init__(self, dim: int, *, eps: float, dtype, before_gemm: bool = False):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps
        self.before_gemm = before_gemm

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        y = self.weight[...] * x32.astype(x.dtype)
        if self.before_gemm and math.prod(x.shape[:-1]) >= NORM_BARRIER_MIN_ROWS:
            y = jax.lax.optimization_barrier(y)
        return y


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> jax.Array:
    """inv_freq[D/2] as HF computes it, including `llama3` and `linear` scaling."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """x: [T, H, D], positions: [T]. Non-interleaved halves (HF `rotate_half`)."""
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, D/2]
    cos = jnp.cos(freqs)[:, None, :].astype(x.dtype)
    sin = jnp.sin(freqs)[:, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def embed(embedding: nnx.Embed, token_ids: jax.Array) -> jax.Array:
    """token_ids [T] -> [T, E] in the embedding's dtype; split over the vocabulary under a mesh
    (models.sharding.lookup_embedding)."""
    (table,) = embedding.promote_dtype((embedding.embedding[...],), dtype=embedding.dtype, inexact=False)
    return sharding.lookup_embedding(table, token_ids)


def paged_attention(
    q: jax.Array,        # [T, Hq, D]
    k: jax.Array,        # [T, Hkv, D]
    v: jax.Array,        # [T, Hkv, D]
    k_pages: jax.Array,  # [N, page_size, Hkv, D]
    v_pages: jax.Array,  # [N, page_size, Hkv, D]
    step: StepInput,
    *,
    sm_scale: float,
    sliding_window: int | None,
    backend: Backend,
    k_scale: jax.Array | None = None,  # [N, page_size, Hkv] float32 with 8-bit pages, else None
    v_scale: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
    """The one attention call of every model: write the new K/V into pages (quantizing them into 8-bit
    pages with their scales), then attend over them, with `backend`'s kernels. Returns
    (o, k_pages, v_pages, k_scale, v_scale); the scales stay None for unquantized pages.

    Under a mesh (`jax.set_mesh`) it runs per device on that device's heads (models.sharding.per_shard).
    """
    def attend(q, k, v, k_cache, v_cache, step):
        (k_pages, k_scale), (v_pages, v_scale) = k_cache, v_cache
        if k_scale is None:
            k_pages, v_pages = pallas_kernels.write_kv(k_pages, v_pages, k, v, step.slot_mapping, backend=backend)
        else:
            k_pages, v_pages, k_scale, v_scale = pallas_kernels.write_kv_quantized(
                k_pages, v_pages, k_scale, v_scale, k, v, step.slot_mapping, backend=backend)
        o = pallas_kernels.ragged_paged_attention(
            q, k_pages, v_pages, step.kv_lens, step.page_table, step.cu_q_lens, step.num_seqs,
            sm_scale=sm_scale, sliding_window=sliding_window, backend=backend,
            max_prefill_seqs=step.max_prefill_seqs, k_scale=k_scale, v_scale=v_scale)
        return o, (k_pages, k_scale), (v_pages, v_scale)

    o, (k_pages, k_scale), (v_pages, v_scale) = sharding.per_shard(attend)(
        q, k, v, (k_pages, k_scale), (v_pages, v_scale), step)
    return o, k_pages, v_pages, k_scale, v_scale
