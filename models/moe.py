"""The mixture-of-experts MLP of Mixtral and Qwen3-MoE: a softmax top-k router over stacked SwiGLU experts.

Routing is dropless: every (token, chosen expert) pair is computed. The T x k pairs are sorted by expert
and run through two grouped GEMMs (gate/up with the SwiGLU, then down; `pallas_kernels.grouped_gemm`,
whose kernel the `Backend` names), then put back in token order and summed with the router's weights.
Every shape follows T alone, so a step's routing never changes what is compiled.

Under a mesh with a "model" axis (models/sharding.py) the experts run in `shard_map`:
- tensor parallel (default): each device holds every expert's slice of the intermediate width, computes
  its partial output for all tokens, and one all-reduce sums them (as the dense MLP);
- expert parallel (`ModelConfig.expert_parallel`): each device holds X / n whole experts and 1 / n of
  the tokens; an all-to-all sends each (token, expert) pair to the device owning the expert, a second
  one brings the results back, and an all-gather rebuilds the replicated activations.

Axis names in shape comments: T tokens, H model dim, F expert width, X experts, k experts per token.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

import pallas_kernels
from models import sharding
from models.config import ModelConfig
from models.kv_cache import StepInput
from pallas_kernels import Backend
from pallas_kernels.matmul_mgpu import interleave_gate_up, swiglu

EXPERTS_COL = P(None, None, sharding.MODEL)   # [X, H, F] split over each expert's width
EXPERTS_ROW = P(None, sharding.MODEL, None)   # [X, F, H]
EXPERTS_EP = P(sharding.MODEL, None, None)    # [X, ...] split over experts


def route(logits: jax.Array, top_k: int, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array]:
    """(weights [T, k] in the logits' dtype, experts [T, k] int32): HF's softmax (in float32) then top-k,
    renormalised over the k chosen when `norm_topk_prob` (Mixtral always, Qwen3-MoE by config)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights.astype(logits.dtype), experts.astype(jnp.int32)


def expert_tokens(experts: jax.Array, num_experts: int, num_tokens: jax.Array | None = None) -> jax.Array:
    """[X] int32: how many of the first `num_tokens` tokens (default all) chose each expert."""
    valid = jnp.ones(experts.shape[0], bool) if num_tokens is None else jnp.arange(experts.shape[0]) < num_tokens
    ids = jnp.where(valid[:, None], experts, num_experts).reshape(-1)
    return jnp.bincount(ids, length=num_experts + 1)[:num_experts].astype(jnp.int32)


def _experts_ffn(xs, group_sizes, gate, up, down, backend: Backend):
    """The SwiGLU of each row's expert over rows sorted by expert: [M, H] -> [M, H]. `up` is None when
    `gate` is the fused, interleaved gate/up weight [X, H, 2F]."""
    if up is None:
        h = pallas_kernels.grouped_matmul(xs, gate, group_sizes, epilogue="swiglu", backend=backend)
    else:
        h = swiglu(pallas_kernels.grouped_matmul(xs, gate, group_sizes, backend=backend),
                   pallas_kernels.grouped_matmul(xs, up, group_sizes, backend=backend))
    return pallas_kernels.grouped_matmul(h, down, group_sizes, backend=backend)


def _sorted_ffn(xs, keys, num_groups: int, weights_fn):
    """Rows `xs` [M, H] with expert `keys` [M] (num_groups: padding, sorted last and never computed)
    through their experts, returned in their original order."""
    order = jnp.argsort(keys, stable=True)
    group_sizes = jnp.bincount(keys, length=num_groups + 1)[:num_groups].astype(jnp.int32)
    ys = weights_fn(xs[order], group_sizes)
    return ys[jnp.argsort(order)]


def _combine(ys, weights):
    """[T * k, H] expert outputs and [T, k] router weights -> [T, H] float32."""
    t, k = weights.shape
    return jnp.einsum("tkh,tk->th", ys.reshape(t, k, -1).astype(jnp.float32), weights.astype(jnp.float32))


def moe_local(x, weights, experts, gate, up, down, backend: Backend):
    """[T, H] float32: the routed SwiGLU of every token with the experts held here (all of them, or each
    one's slice of the width under tensor parallelism, where the result is a partial sum)."""
    k = experts.shape[1]
    flat = experts.reshape(-1)
    ys = _sorted_ffn(x[jnp.arange(flat.shape[0]) // k], flat, gate.shape[0],
                     lambda xs, gs: _experts_ffn(xs, gs, gate, up, down, backend))
    return _combine(ys, weights)


def _moe_expert_parallel(x, weights, experts, gate, up, down, backend: Backend):
    """Inside shard_map over "model" (n devices): x [T, H] replicated, T a multiple of n; the X / n
    experts of this device. Returns [T, H] float32, replicated."""
    n = jax.lax.axis_size(sharding.MODEL)
    me = jax.lax.axis_index(sharding.MODEL)
    t, k = experts.shape
    local_experts = gate.shape[0]
    tl = t // n
    xl = jax.lax.dynamic_slice_in_dim(x, me * tl, tl)                       # [Tl, H] this device's tokens
    el = jax.lax.dynamic_slice_in_dim(experts, me * tl, tl).reshape(-1)     # [A = Tl * k]
    wl = jax.lax.dynamic_slice_in_dim(weights, me * tl, tl)                 # [Tl, k]
    pairs = el.shape[0]
    dest = el // local_experts                                              # [A] owning device
    # Slot of each pair in its destination's buffer: its rank among the pairs going there. A buffer
    # holds all A pairs, so routing is dropless whatever the imbalance.
    slot = jnp.take_along_axis(jnp.cumsum(dest[:, None] == jnp.arange(n), axis=0) - 1, dest[:, None], 1)[:, 0]
    send_x = jnp.zeros((n, pairs, x.shape[1]), x.dtype).at[dest, slot].set(xl[jnp.arange(pairs) // k])
    send_e = jnp.full((n, pairs), local_experts, jnp.int32).at[dest, slot].set(el % local_experts)
    recv_x = jax.lax.all_to_all(send_x, sharding.MODEL, 0, 0)              # [n, A, H] by source device
    recv_e = jax.lax.all_to_all(send_e, sharding.MODEL, 0, 0)              # [n, A], local_experts = empty
    ys = _sorted_ffn(recv_x.reshape(n * pairs, -1), recv_e.reshape(-1), local_experts,
                     lambda xs, gs: _experts_ffn(xs, gs, gate, up, down, backend))
    back = jax.lax.all_to_all(ys.reshape(n, pairs, -1).astype(x.dtype), sharding.MODEL, 0, 0)
    out = _combine(back[dest, slot], wl)                                    # [Tl, H]
    return jax.lax.all_gather(out, sharding.MODEL, axis=0, tiled=True)


class MoE(nnx.Module):
    """x [T, H] -> (y [T, H], tokens routed to each expert [X] int32)."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        h, f, x = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
        init = nnx.initializers.normal(0.02)
        self.router = nnx.Linear(h, x, use_bias=False, dtype=dtype, param_dtype=dtype, kernel_init=init,
                                 rngs=rngs)
        self.experts_gate = nnx.Param(init(rngs.params(), (x, h, f), dtype))
        self.experts_up = nnx.Param(init(rngs.params(), (x, h, f), dtype))
        self.experts_down = nnx.Param(init(rngs.params(), (x, f, h), dtype))
        self.num_experts, self.top_k, self.norm_topk_prob = x, cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.expert_parallel = cfg.expert_parallel

    def fuse(self) -> None:
        """One [X, H, 2F] gate/up weight, columns interleaved for the grouped GEMM's SwiGLU epilogue (one
        device: the partition specs name the separate weights)."""
        if self.experts_gate is None:
            return
        self.experts_gate_up = nnx.Param(interleave_gate_up(self.experts_gate[...], self.experts_up[...]))
        self.experts_gate = self.experts_up = None

    def _weights(self):
        if getattr(self, "experts_gate_up", None) is not None:   # set by fuse()
            return self.experts_gate_up[...], None, self.experts_down[...]
        return self.experts_gate[...], self.experts_up[...], self.experts_down[...]

    def __call__(self, x: jax.Array, backend: Backend, step: StepInput | None = None):
        weights, experts = route(self.router(x), self.top_k, self.norm_topk_prob)      # [T, k]
        counts = expert_tokens(experts, self.num_experts,
                               None if step is None else step.cu_q_lens[step.num_seqs])
        gate, up, down = self._weights()
        mesh = sharding.model_mesh()
        if mesh is None:
            return moe_local(x, weights, experts, gate, up, down, backend).astype(x.dtype), counts
        if up is None:
            raise ValueError("fused expert weights are for one device; shard the model with "
                             "jpaged.sharding.shard_model")
        n = mesh.shape[sharding.MODEL]
        if self.expert_parallel:
            t = x.shape[0]
            pad = -t % n
            padded = [jnp.pad(a, ((0, pad), (0, 0))) for a in (x, weights, experts)]
            y = jax.shard_map(functools.partial(_moe_expert_parallel, backend=backend), mesh=mesh,
                              in_specs=(P(), P(), P(), EXPERTS_EP, EXPERTS_EP, EXPERTS_EP), out_specs=P(),
                              check_vma=False)(*padded, gate, up, down)
            return y[:t].astype(x.dtype), counts

        def partial_sum(x, weights, experts, gate, up, down):
            return jax.lax.psum(moe_local(x, weights, experts, gate, up, down, backend), sharding.MODEL)

        y = jax.shard_map(partial_sum, mesh=mesh, in_specs=(P(), P(), P(), EXPERTS_COL, EXPERTS_COL, EXPERTS_ROW),
                          out_specs=P(), check_vma=False)(x, weights, experts, gate, up, down)
        return y.astype(x.dtype), counts
