"""The model side of tensor parallelism: mesh axis names, Megatron partition specs, and the two ops that
run per shard inside a traced step (attention under `shard_map`, the vocab-parallel embedding lookup).

Tensor parallel ("model" axis, Megatron): q/k/v/gate/up are column-parallel, o/down row-parallel, so
each block ends in one all-reduce; embedding and LM head are split over the vocabulary; norms are
replicated. The KV cache `[N, page_size, Hkv, D]` is split over Hkv. With fewer kv heads than devices
on the "model" axis, each kv head is repeated so every device owns one whole head next to the q heads
of its group (`tp_model_config`). Placing weights and building meshes is jpaged/sharding.py's.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from models.config import ModelConfig

DATA, MODEL = "data", "model"

# (parameter path pattern, spec). Paths are `nnx` paths joined with dots, e.g. layers.3.mlp.up_proj.kernel.
PARAM_SPECS = (
    (r"embed_tokens\.embedding", P(MODEL, None)),                      # [V, E] over vocab
    (r"lm_head\.kernel", P(None, MODEL)),                              # [E, V] over vocab
    (r"layers\.\d+\.self_attn\.[qkv]_proj\.kernel", P(None, MODEL)),   # [E, H*D] column-parallel
    (r"layers\.\d+\.self_attn\.[qkv]_proj\.bias", P(MODEL)),           # [H*D]
    (r"layers\.\d+\.self_attn\.o_proj\.kernel", P(MODEL, None)),       # [Hq*D, E] row-parallel
    (r"layers\.\d+\.mlp\.(gate|up)_proj\.kernel", P(None, MODEL)),     # [E, F] column-parallel
    (r"layers\.\d+\.mlp\.down_proj\.kernel", P(MODEL, None)),          # [F, E] row-parallel
    (r"(.+\.)?(input_layernorm|post_attention_layernorm|norm|q_norm|k_norm)\.weight", P()),
    # Mixture of experts (models/moe.py): the router replicated, each expert split over its width.
    (r"layers\.\d+\.mlp\.router\.kernel", P()),                      # [E, X]
    (r"layers\.\d+\.mlp\.experts_(gate|up)", P(None, None, MODEL)),   # [X, E, F]
    (r"layers\.\d+\.mlp\.experts_down", P(None, MODEL, None)),        # [X, F, E]
)
EXPERT_PARAMS = re.compile(r"layers\.\d+\.mlp\.experts_(gate|up|down)$")
EXPERT_PARALLEL_SPEC = P(MODEL, None, None)   # with ModelConfig.expert_parallel: [X, ...] over experts
_SPECS = [(re.compile(pattern + "$"), spec) for pattern, spec in PARAM_SPECS]
VOCAB_PARAMS = re.compile(r"(embed_tokens\.embedding|lm_head\.kernel)$")
KV_PARAMS = re.compile(r"layers\.\d+\.self_attn\.[kv]_proj\.(kernel|bias)$")
KV_CACHE_SPEC = P(None, None, MODEL)  # [N, page_size, Hkv, D] over kv heads (no trailing None: the
# step's output cache comes back spelled so, and a different spelling is another jit cache key)
REPLICA_KV_CACHE_SPEC = P(DATA, None, None, MODEL, None)  # [R, N, page_size, Hkv, D]
HEADS_SPEC = P(None, MODEL, None)           # q, k, v, o: [T, H, D] over heads


def tp_model_config(cfg: ModelConfig, tensor_parallel_size: int, *, expert_parallel: bool = False) -> ModelConfig:
    """The config whose parameters are split over `tensor_parallel_size` devices.

    Equal to `cfg` unless it has fewer kv heads than devices: then each kv head is repeated
    tp / Hkv times, so device i owns kv head i and q heads [i * Hq/tp, (i+1) * Hq/tp), exactly the
    q heads that attended to the original head i // (tp / Hkv). Outputs are unchanged.
    `expert_parallel`: an MoE model's experts are split over the devices instead of each expert's width.
    """
    tp = tensor_parallel_size
    if expert_parallel or cfg.expert_parallel:
        if not cfg.is_moe:
            raise ValueError("expert_parallel needs a mixture-of-experts model; this one has no MoE layers")
        if cfg.num_experts % tp:
            raise ValueError(f"tensor_parallel_size ({tp}) must divide num_experts ({cfg.num_experts}) "
                             "under expert parallelism")
        cfg = dataclasses.replace(cfg, expert_parallel=True)
    elif cfg.is_moe and cfg.moe_intermediate_size % tp:
        raise ValueError(f"tensor_parallel_size ({tp}) must divide moe_intermediate_size "
                         f"({cfg.moe_intermediate_size}); or split the experts instead (expert parallelism)")
    if cfg.num_heads % tp:
        raise ValueError(f"tensor_parallel_size ({tp}) must divide num_heads ({cfg.num_heads})")
    if cfg.intermediate_size % tp and len(cfg.moe_layers) < cfg.num_layers:
        raise ValueError(f"tensor_parallel_size ({tp}) must divide intermediate_size ({cfg.intermediate_size})")
    if cfg.num_kv_heads >= tp:
        if cfg.num_kv_heads % tp:
            raise ValueError(f"tensor_parallel_size ({tp}) must divide num_kv_heads ({cfg.num_kv_heads})")
        return cfg
    if tp % cfg.num_kv_heads:
        raise ValueError(f"num_kv_heads ({cfg.num_kv_heads}) must divide tensor_parallel_size ({tp})")
    return dataclasses.replace(cfg, num_kv_heads=tp)


def param_spec(path: str, shape: Sequence[int], model_axis_size: int, *, expert_parallel: bool = False) -> P:
    """The PartitionSpec of parameter `path` (e.g. "layers.0.mlp.up_proj.kernel") of `shape`.

    A vocabulary the model axis does not divide is replicated; any other dimension that does not
    divide is a ValueError (use `tp_model_config` first). `expert_parallel`: MoE experts split over
    the model axis (EXPERT_PARALLEL_SPEC).
    """
    spec = next((s for pattern, s in _SPECS if pattern.match(path)), None)
    if expert_parallel and EXPERT_PARAMS.search(path):
        spec = EXPERT_PARALLEL_SPEC
    if spec is None:
        raise ValueError(f"no partition spec for parameter {path!r}; add it to jpaged.sharding.PARAM_SPECS")
    for dim, axis in zip(shape, spec):
        if axis == MODEL and dim % model_axis_size:
            if VOCAB_PARAMS.search(path):
                return P()
            raise ValueError(f"parameter {path!r} of shape {tuple(shape)}: dimension {dim} is not divisible "
                             f"by the model axis ({model_axis_size})")
    return spec


def path_name(path) -> str:
    return ".".join(str(p) for p in path)


def state_shardings(state, mesh: Mesh, *, expert_parallel: bool = False) -> dict[str, NamedSharding]:
    """{parameter path: NamedSharding} for every variable of an (abstract or concrete) model state."""
    tp = mesh.shape[MODEL]
    return {path_name(path): NamedSharding(mesh, param_spec(path_name(path), var.shape, tp,
                                                            expert_parallel=expert_parallel))
            for path, var in nnx.to_flat_state(state)}


def repeat_heads(x: jax.Array, head_dim: int, repeats: int) -> jax.Array:
    """[..., H * D] -> [..., H * repeats * D], each head repeated in place (head h -> h*r .. h*r+r-1)."""
    heads = x.reshape(*x.shape[:-1], -1, head_dim)
    return jnp.repeat(heads, repeats, axis=-2).reshape(*x.shape[:-1], -1)


def _model_mesh():
    """The mesh set with jax.set_mesh when it has a "model" axis not already manual, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or MODEL not in mesh.axis_names:
        return None
    if dict(zip(mesh.axis_names, mesh.axis_types))[MODEL] == AxisType.Manual:
        return None
    return mesh


def model_mesh():
    """The mesh set with jax.set_mesh when it has a "model" axis not already manual, else None."""
    return _model_mesh()


def per_shard(attend: Callable) -> Callable:
    """`attend(q, k, v, k_pages, v_pages, step) -> (o, k_pages, v_pages)` run per "model" shard.

    Under `jax.set_mesh(mesh)`: a `shard_map` in which each device gets q/k/v `[T, H/tp, D]` and pages
    `[N, page_size, Hkv/tp, D]` of its own heads (k_pages / v_pages may be pytrees of such arrays, e.g.
    pages with their `[N, page_size, Hkv]` scales) and the whole StepInput, so the kernels see an
    ordinary single-device problem. Without a mesh (or inside one already manual): `attend` itself.
    Under `jax.vmap(..., spmd_axis_name="data")` the replica axis maps onto "data".
    """
    mesh = _model_mesh()
    if mesh is None:
        return attend

    def checked(q, k, v, k_pages, v_pages, step):
        tp = mesh.shape[MODEL]
        kv_heads = jax.tree.leaves(k_pages)[0].shape[-2]
        if q.shape[-2] % tp or kv_heads % tp:
            raise ValueError(f"{q.shape[-2]} q heads and {kv_heads} kv heads must both divide by the "
                             f"model axis ({tp}); place the model with jpaged.sharding.shard_model")
        # check_vma=False: the kernels' pallas_call has no varying-axis rules; every output is per shard.
        # k_pages / v_pages may be (pages, scales) pairs: KV_CACHE_SPEC splits the [N, page_size, Hkv]
        # scales of quantized pages over the same kv-head axis.
        return jax.shard_map(attend, mesh=mesh, in_specs=(HEADS_SPEC, HEADS_SPEC, HEADS_SPEC, KV_CACHE_SPEC,
                                                          KV_CACHE_SPEC, P()),
                             out_specs=(HEADS_SPEC, KV_CACHE_SPEC, KV_CACHE_SPEC), check_vma=False)(
            q, k, v, k_pages, v_pages, step)

    return checked


def lookup_embedding(table: jax.Array, ids: jax.Array) -> jax.Array:
    """`table[ids]`: rows of a `[V, E]` embedding for token ids `[T]`, as `[T, E]`.

    Under a mesh whose "model" axis splits the vocabulary (`embed_tokens.embedding` is `P("model", None)`),
    each device looks the ids up in its own rows, zeroes the ids that fall outside them, and one
    all-reduce of `[T, E]` adds the devices' rows together (Megatron's vocab-parallel embedding). Left to
    XLA, the GPU partitioner all-gathers the whole table every step instead. Without a mesh, or with a vocabulary the axis does not
    divide (the table is then replicated), a plain gather.
    """
    mesh = _model_mesh()
    if mesh is None or table.shape[0] % mesh.shape[MODEL]:
        return jnp.take(table, ids, axis=0)

    def local_rows(table, ids):
        rows = table.shape[0]
        local = ids - jax.lax.axis_index(MODEL) * rows
        here = (local >= 0) & (local < rows)
        found = jnp.take(table, jnp.where(here, local, 0), axis=0)
        return jax.lax.psum(jnp.where(here[..., None], found, jnp.zeros((), table.dtype)), MODEL)

    return jax.shard_map(local_rows, mesh=mesh, in_specs=(P(MODEL, None), P()), out_specs=P(),
                         check_vma=False)(table, ids)
