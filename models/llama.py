"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2, and the mixture-of-experts Mixtral
and Qwen3-MoE, whose MoE layers are models/moe.py) in Flax NNX; variants are config data.

Layers are a Python list of per-layer modules, so the jitted step is unrolled over depth and each
decode step reads every weight once (a rolled scan over stacked weights copies each layer's weights
before its GEMMs). Which kernels run is the `Backend` passed to `__call__` (pallas_kernels/backend.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from models import lora as lora_update
from models.config import ModelConfig
from models.kv_cache import KVCache, KVCacheSpec, StepInput
from models.layers import RMSNorm, apply_rope, embed, paged_attention, rope_inv_freq
from models.moe import MoE
from pallas_kernels import REFERENCE, Backend
from pallas_kernels.matmul_mgpu import interleave_gate_up, split_gate_up, swiglu


def _linear(rngs, din, dout, dtype, bias=False):
    init = nnx.initializers.normal(0.02)
    return nnx.Linear(din, dout, use_bias=bias, dtype=dtype, param_dtype=dtype, kernel_init=init,
                      bias_init=init, rngs=rngs)


class _FusedLinear(nnx.Module):
    """x @ kernel (+ bias): several projections of one input, concatenated along the output."""

    def __init__(self, kernel, bias):
        self.kernel = nnx.Param(kernel)
        self.bias = None if bias is None else nnx.Param(bias)

    def __call__(self, x):
        y = jnp.dot(x, self.kernel[...])
        return y if self.bias is None else y + self.bias[...]


def _fused_linear(linears) -> _FusedLinear:
    kernel = jnp.concatenate([lin.kernel[...] for lin in linears], axis=1)
    bias = None if linears[0].bias is None else jnp.concatenate([lin.bias[...] for lin in linears])
    return _FusedLinear(kernel, bias)


def _gate_up_linear(gate, up) -> _FusedLinear:
    """gate and up as one [E, 2F] weight, their columns interleaved in groups
    (pallas_kernels.matmul_mgpu.interleave_gate_up) so that a GEMM tile holds both halves of the SwiGLU."""
    assert gate.bias is None and up.bias is None, "the Llama family's gate/up projections have no bias"
    return _FusedLinear(interleave_gate_up(gate.kernel[...], up.kernel[...]), None)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        e, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.q_proj = _linear(rngs, e, cfg.num_heads * d, dtype, cfg.qkv_bias)
        self.k_proj = _linear(rngs, e, cfg.num_kv_heads * d, dtype, cfg.qkv_bias)
        self.v_proj = _linear(rngs, e, cfg.num_kv_heads * d, dtype, cfg.qkv_bias)
        self.o_proj = _linear(rngs, cfg.num_heads * d, e, dtype)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, eps=cfg.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(d, eps=cfg.rms_norm_eps, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None
        self.sliding_window = cfg.sliding_window

    def fuse(self) -> None:
        """One [E, (Hq + 2 Hkv) D] projection instead of three (see LlamaForCausalLM.fuse_projections)."""
        if self.q_proj is None:
            return
        self.qkv_proj = _fused_linear([self.q_proj, self.k_proj, self.v_proj])
        self.q_proj = self.k_proj = self.v_proj = None

    def __call__(self, x, inv_freq, layer_cache, step: StepInput, backend: Backend, lora=None):
        """layer_cache: (k_pages, v_pages, k_scale, v_scale) of this layer (`KVCache.layers`)."""
        t = x.shape[0]
        if getattr(self, "qkv_proj", None) is not None:
            qkv = lora_update.add(self.qkv_proj(x), x, lora, "qkv_proj", step, backend)
            nq, nkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q, k, v = qkv[:, :nq], qkv[:, nq:nq + nkv], qkv[:, nq + nkv:]
        else:
            q, k, v = (lora_update.add(proj(x), x, lora, name, step, backend) for proj, name in
                       ((self.q_proj, "q_proj"), (self.k_proj, "k_proj"), (self.v_proj, "v_proj")))
        q = q.reshape(t, self.num_heads, self.head_dim)      # [T, Hq, D]
        k = k.reshape(t, self.num_kv_heads, self.head_dim)   # [T, Hkv, D]
        v = v.reshape(t, self.num_kv_heads, self.head_dim)   # [T, Hkv, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, step.positions, inv_freq)
        k = apply_rope(k, step.positions, inv_freq)
        k_pages, v_pages, k_scale, v_scale = layer_cache
        o, *layer_cache = paged_attention(
            q, k, v, k_pages, v_pages, step, sm_scale=self.head_dim ** -0.5,
            sliding_window=self.sliding_window, backend=backend, k_scale=k_scale, v_scale=v_scale)
        o = o.reshape(t, -1)
        return lora_update.add(self.o_proj(o), o, lora, "o_proj", step, backend), tuple(layer_cache)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.gate_proj = _linear(rngs, cfg.hidden_size, cfg.intermediate_size, dtype)
        self.up_proj = _linear(rngs, cfg.hidden_size, cfg.intermediate_size, dtype)
        self.down_proj = _linear(rngs, cfg.intermediate_size, cfg.hidden_size, dtype)

    def fuse(self) -> None:
        """One [E, 2 F] projection for gate and up, columns interleaved (see LlamaForCausalLM.fuse_projections)."""
        if self.gate_proj is None:
            return
        self.gate_up_proj = _gate_up_linear(self.gate_proj, self.up_proj)
        self.gate_proj = self.up_proj = None

    def __call__(self, x, backend: Backend, step: StepInput | None = None, lora=None):
        if isinstance(getattr(self, "gate_up_proj", None), _FusedLinear):
            if lora is None:
                h = pallas_kernels.gate_up_swiglu(x, self.gate_up_proj.kernel[...], backend=backend)
            else:
                h = lora_update.gate_up_swiglu(x, self.gate_up_proj.kernel[...], lora, step, backend)
        elif getattr(self, "gate_up_proj", None) is not None:   # fp8 weights (models/fp8_linear.py)
            h = swiglu(*split_gate_up(lora_update.add(self.gate_up_proj(x), x, lora, "gate_up_proj", step, backend)))
        else:
            gate = lora_update.add(self.gate_proj(x), x, lora, "gate_proj", step, backend)
            up = lora_update.add(self.up_proj(x), x, lora, "up_proj", step, backend)
            h = jax.nn.silu(gate) * up
        return lora_update.add(self.down_proj(h), h, lora, "down_proj", step, backend)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs, index: int = 0):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, before_gemm=True)
        self.self_attn = Attention(cfg, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype,
                                                before_gemm=True)
        self.mlp = MoE(cfg, dtype, rngs) if index in cfg.moe_layers else MLP(cfg, dtype, rngs)

    def __call__(self, x, inv_freq, layer_cache, step, backend: Backend, lora=None):
        """(x, layer_cache, tokens per expert [X] or None for a dense MLP)."""
        h, layer_cache = self.self_attn(self.input_layernorm(x), inv_freq, layer_cache, step, backend, lora)
        x = x + h
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):  # LoRA is refused for MoE models (jpaged/engine/llm_engine.py)
            h, expert_tokens = self.mlp(h, backend, step)
        else:
            h, expert_tokens = self.mlp(h, backend, step, lora), None
        return x + h, layer_cache, expert_tokens


class LlamaForCausalLM(nnx.Module):
    """tokens + paged cache in, logits at `step.logits_index` + updated cache out."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.dtype = dtype
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype,
                                      embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, dtype, rngs, i) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, before_gemm=True)
        self.lm_head = None if cfg.tie_word_embeddings else _linear(
            rngs, cfg.hidden_size, cfg.vocab_size, dtype)

    def fuse_projections(self) -> None:
        """In place: q/k/v become one projection and gate/up another, so a decode step runs 2 GEMVs
        where it ran 5 (fewer launches, and XLA reads one wide weight faster than three narrow ones).
        For one device: tensor-parallel shardings are specified for the separate weights."""
        for layer in self.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def kv_cache_spec(self, page_size: int, dtype=None) -> KVCacheSpec:
        """The pages of this model on one device, in `dtype` (default the model's)."""
        return KVCacheSpec.for_model(self.config, page_size, dtype or self.dtype)

    def new_kv_cache(self, num_pages: int, page_size: int, dtype=None) -> KVCache:
        return self.kv_cache_spec(page_size, dtype).create(num_pages)

    def __call__(self, kv_cache: KVCache, step: StepInput, *, backend: Backend = REFERENCE, lora=None
                 ) -> tuple[jax.Array, KVCache]:
        """Returns logits [len(step.logits_index), vocab] in float32 and the updated cache; `backend`
        names the kernels (a static value: part of the jit cache key of the caller's step). `lora`: the
        LoRA device slots, one {target: (A, B)} per layer (jpaged/lora/manager.py), applied per token by
        `step.lora_index`; None serves the base model alone."""
        logits, kv_cache, _ = self.forward(kv_cache, step, backend=backend, lora=lora)
        return logits, kv_cache

    def forward(self, kv_cache: KVCache, step: StepInput, *, backend: Backend = REFERENCE, lora=None):
        """`__call__`'s (logits, cache) and the tokens routed to each expert of each MoE layer,
        [len(cfg.moe_layers), X] int32 (None for a dense model)."""
        if lora is not None and step.lora_index is None:
            raise ValueError("lora slots were given but step.lora_index is None (one slot index per token)")
        cfg = self.config
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        x = embed(self.embed_tokens, step.token_ids)                           # [T, E]
        new_layers, expert_tokens = [], []
        layer_loras = lora if lora is not None else (None,) * len(self.layers)
        for layer, layer_cache, layer_lora in zip(self.layers, kv_cache.layers(), layer_loras):
            x, layer_cache, counts = layer(x, inv_freq, layer_cache, step, backend, layer_lora)
            new_layers.append(layer_cache)
            if counts is not None:
                expert_tokens.append(counts)
        h = self.norm(x[step.logits_index])                                     # [S, E]
        if self.lm_head is None:
            logits = self.embed_tokens.attend(h)
        else:
            logits = self.lm_head(h)
        return (logits.astype(jnp.float32), KVCache.from_layers(new_layers),
                jnp.stack(expert_tokens) if expert_tokens else None)
