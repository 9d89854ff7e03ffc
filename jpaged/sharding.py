"""Multi-device: the ("data", "model") mesh, Megatron partition specs, shard_map around attention, loading.

Where it sits: `LLM`, the CLI and `jpaged.generate` build a mesh with `make_mesh`, place the model with
`shard_model` (or load it straight into shards with `load_safetensors_sharded` /
`load_orbax_sharded`), create the cache with `new_kv_cache`, and trace their jitted step under
`jax.set_mesh(mesh)`. Inside the step, XLA partitions the matmuls from the parameter shardings, and
`models.layers.paged_attention` hands the attention kernels to `per_shard`, which runs them under
`shard_map` on each device's local heads (Pallas kernels cannot be partitioned by XLA).

Tensor parallel ("model" axis, Megatron): q/k/v/gate/up are column-parallel, o/down row-parallel, so
each block ends in one all-reduce; embedding and LM head are split over the vocabulary; norms are
replicated. The KV cache `[N, page_size, Hkv, D]` is split over Hkv. With fewer kv heads than devices
on the "model" axis, each kv head is repeated so every device owns one whole head next to the q heads
of its group (`tp_model_config`).

Data parallel ("data" axis): one replica per row of the mesh, each with its own page pool and its own
batch. The serving engine runs one engine per row (jpaged/engine/data_parallel.py); research loops
can step all rows through one SPMD program: `over_replicas` vmaps the step over a leading replica
axis mapped onto "data" (`new_replica_kv_cache`, `stack_replicas`). docs/multi_device.md compares them.

Multi-host: `initialize_distributed` joins the JAX job; every process runs the same program on a
global mesh. Research code shares host values with `broadcast_from_scheduler`; the serving engine
replays process 0's jitted calls on the others (jpaged/engine/multihost.py).
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jpaged.kv_cache import KVCache
from models.config import ModelConfig
from models.weights import hf_name_to_path

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
)
_SPECS = [(re.compile(pattern + "$"), spec) for pattern, spec in PARAM_SPECS]
_VOCAB_PARAMS = re.compile(r"(embed_tokens\.embedding|lm_head\.kernel)$")
_KV_PARAMS = re.compile(r"layers\.\d+\.self_attn\.[kv]_proj\.(kernel|bias)$")
KV_CACHE_SPEC = P(None, None, MODEL)  # [N, page_size, Hkv, D] over kv heads (no trailing None: the
# step's output cache comes back spelled so, and a different spelling is another jit cache key)
REPLICA_KV_CACHE_SPEC = P(DATA, None, None, MODEL, None)  # [R, N, page_size, Hkv, D]
HEADS_SPEC = P(None, MODEL, None)           # q, k, v, o: [T, H, D] over heads


def make_mesh(tensor_parallel_size: int = 1, data_parallel_size: int = 1, devices=None) -> Mesh:
    """A (data_parallel_size, tensor_parallel_size) mesh with axes ("data", "model").

    Takes the first tp * dp of `devices` (default `jax.devices()`, ordered by process), so a row of
    the mesh (one replica's tensor-parallel group) stays on one host whenever tp divides the
    devices per host.
    """
    for name, value in (("tensor_parallel_size", tensor_parallel_size),
                        ("data_parallel_size", data_parallel_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    devices = list(jax.devices() if devices is None else devices)
    needed = tensor_parallel_size * data_parallel_size
    if len(devices) < needed:
        raise ValueError(f"tensor_parallel_size * data_parallel_size = {needed} devices needed, "
                         f"{len(devices)} available")
    grid = np.asarray(devices[:needed], dtype=object).reshape(data_parallel_size, tensor_parallel_size)
    return Mesh(grid, (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto))


def replica_meshes(mesh: Mesh) -> list[Mesh]:
    """One (1, tp) mesh per data-parallel replica: each row of `mesh` runs its own engine."""
    return [Mesh(mesh.devices[i:i + 1], (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto))
            for i in range(mesh.shape[DATA])]


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Joins a multi-host JAX job (`jax.distributed.initialize`); returns False for a single process.

    Each argument left None comes from JAX_COORDINATOR_ADDRESS ("host:port" of process 0),
    JAX_NUM_PROCESSES and JAX_PROCESS_ID. With none of them set this is a single-process run.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    if all(v is None for v in given.values()) or num_processes == 1:
        return False
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise ValueError(f"multi-host start needs {', '.join(missing)} too (flags or JAX_* environment "
                         f"variables); got {given}")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, num_processes={num_processes}), got {process_id}")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return True


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def broadcast_from_scheduler(tree):
    """Process 0's value of `tree` (host data: the scheduled batch) on every process."""
    if jax.process_count() == 1:
        return tree
    return multihost_utils.broadcast_one_to_all(tree)


# ---------------------------------------------------------------- partition specs


def tp_model_config(cfg: ModelConfig, tensor_parallel_size: int) -> ModelConfig:
    """The config whose parameters are split over `tensor_parallel_size` devices.

    Equal to `cfg` unless it has fewer kv heads than devices: then each kv head is repeated
    tp / Hkv times, so device i owns kv head i and q heads [i * Hq/tp, (i+1) * Hq/tp), exactly the
    q heads that attended to the original head i // (tp / Hkv). Outputs are unchanged.
    """
    tp = tensor_parallel_size
    if cfg.num_heads % tp:
        raise ValueError(f"tensor_parallel_size ({tp}) must divide num_heads ({cfg.num_heads})")
    if cfg.intermediate_size % tp:
        raise ValueError(f"tensor_parallel_size ({tp}) must divide intermediate_size ({cfg.intermediate_size})")
    if cfg.num_kv_heads >= tp:
        if cfg.num_kv_heads % tp:
            raise ValueError(f"tensor_parallel_size ({tp}) must divide num_kv_heads ({cfg.num_kv_heads})")
        return cfg
    if tp % cfg.num_kv_heads:
        raise ValueError(f"num_kv_heads ({cfg.num_kv_heads}) must divide tensor_parallel_size ({tp})")
    return dataclasses.replace(cfg, num_kv_heads=tp)


def param_spec(path: str, shape: Sequence[int], model_axis_size: int) -> P:
    """The PartitionSpec of parameter `path` (e.g. "layers.0.mlp.up_proj.kernel") of `shape`.

    A vocabulary the model axis does not divide is replicated; any other dimension that does not
    divide is a ValueError (use `tp_model_config` first).
    """
    spec = next((s for pattern, s in _SPECS if pattern.match(path)), None)
    if spec is None:
        raise ValueError(f"no partition spec for parameter {path!r}; add it to jpaged.sharding.PARAM_SPECS")
    for dim, axis in zip(shape, spec):
        if axis == MODEL and dim % model_axis_size:
            if _VOCAB_PARAMS.search(path):
                return P()
            raise ValueError(f"parameter {path!r} of shape {tuple(shape)}: dimension {dim} is not divisible "
                             f"by the model axis ({model_axis_size})")
    return spec


def _path_name(path) -> str:
    return ".".join(str(p) for p in path)


def state_shardings(state, mesh: Mesh) -> dict[str, NamedSharding]:
    """{parameter path: NamedSharding} for every variable of an (abstract or concrete) model state."""
    tp = mesh.shape[MODEL]
    return {_path_name(path): NamedSharding(mesh, param_spec(_path_name(path), var.shape, tp))
            for path, var in nnx.to_flat_state(state)}


def _repeat_heads(x: jax.Array, head_dim: int, repeats: int) -> jax.Array:
    """[..., H * D] -> [..., H * repeats * D], each head repeated in place (head h -> h*r .. h*r+r-1)."""
    heads = x.reshape(*x.shape[:-1], -1, head_dim)
    return jnp.repeat(heads, repeats, axis=-2).reshape(*x.shape[:-1], -1)


def shard_state(state, mesh: Mesh, config: ModelConfig):
    """`state` (from `nnx.split(model)` of a model built with `config`) placed on `mesh` by PARAM_SPECS.

    Repeats k/v heads when `config` has fewer kv heads than the model axis; merge the result with the
    graphdef of `tp_model_config(config, tp)` (`shard_model` does both).
    """
    tp = mesh.shape[MODEL]
    repeats = tp_model_config(config, tp).num_kv_heads // config.num_kv_heads
    flat = []
    for path, var in nnx.to_flat_state(state):
        name = _path_name(path)
        value = var.get_value()
        if repeats > 1 and _KV_PARAMS.search(name):
            shape = (*value.shape[:-1], value.shape[-1] * repeats)
            sharding = NamedSharding(mesh, param_spec(name, shape, tp))
            value = jax.jit(_repeat_heads, static_argnums=(1, 2), out_shardings=sharding)(
                value, config.head_dim, repeats)
        else:
            value = _place(value, NamedSharding(mesh, param_spec(name, value.shape, tp)))
        flat.append((path, var.replace(value)))
    return nnx.from_flat_state(flat)


def _place(value, sharding: NamedSharding) -> jax.Array:
    """device_put that also works when the sharding spans other processes' devices."""
    if sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: np.asarray(value[index]))


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """A copy of `model` with every parameter placed on `mesh` by PARAM_SPECS (k/v heads repeated when
    there are fewer than devices on the model axis); trace steps under `jax.set_mesh(mesh)`."""
    cfg = tp_model_config(model.config, mesh.shape[MODEL])
    graphdef, state = nnx.split(model)
    if cfg != model.config:
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: type(model)(cfg, dtype=model.dtype)))
    return nnx.merge(graphdef, shard_state(state, mesh, model.config))


def new_kv_cache(model: nnx.Module, mesh: Mesh, num_pages: int, page_size: int, dtype=None) -> KVCache:
    """The page pool of a sharded model, created on the devices split over kv heads."""
    cfg = model.config
    if cfg.num_kv_heads % mesh.shape[MODEL]:
        raise ValueError(f"model has {cfg.num_kv_heads} kv heads for a model axis of {mesh.shape[MODEL]}: "
                         "pass the model returned by shard_model")
    return KVCache.create(cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim,
                          dtype or model.dtype, sharding=NamedSharding(mesh, KV_CACHE_SPEC))


def new_replica_kv_cache(model: nnx.Module, mesh: Mesh, num_pages: int, page_size: int, dtype=None) -> KVCache:
    """One page pool of `num_pages` per data-parallel replica: leaves [R, N, page_size, Hkv, D]."""
    cfg = model.config
    new_kv_cache(model, mesh, 1, page_size, dtype)  # validates the kv heads against the model axis
    shape = (mesh.shape[DATA], num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
    out = NamedSharding(mesh, REPLICA_KV_CACHE_SPEC)

    def zeros():
        return jnp.zeros(shape, dtype or model.dtype, device=out)

    return KVCache(k=tuple(zeros() for _ in range(cfg.num_layers)), v=tuple(zeros() for _ in range(cfg.num_layers)))


def stack_replicas(trees: Sequence[Any], mesh: Mesh):
    """Per-replica host values of one shape (e.g. StepInputs) as one tree of [R, ...] arrays over "data"."""
    if len(trees) != mesh.shape[DATA]:
        raise ValueError(f"trees must have one entry per data-parallel replica ({mesh.shape[DATA]}), got {len(trees)}")
    out = NamedSharding(mesh, P(DATA))
    return jax.tree.map(lambda *xs: _place(np.stack([np.asarray(x) for x in xs]), out), *trees)


def over_replicas(step_fn: Callable) -> Callable:
    """`step_fn(params, kv_cache, step, ...)` on every replica at once: vmapped over the leading replica
    axis of everything but `params`, that axis mapped onto the mesh's "data" axis. Jit the result."""
    def run(params, *per_replica):
        return jax.vmap(step_fn, in_axes=(None,) + (0,) * len(per_replica), spmd_axis_name=DATA)(
            params, *per_replica)
    return run


def replicate(tree, mesh: Mesh):
    """Host values (identical on every process) as arrays replicated over `mesh`, e.g. a StepInput."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: _place(np.asarray(x), sharding), tree)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly sharded, possibly multi-process) array as numpy, on every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ---------------------------------------------------------------- attention under shard_map


def _model_mesh():
    """The mesh set with jax.set_mesh when it has a "model" axis not already manual, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or MODEL not in mesh.axis_names:
        return None
    if dict(zip(mesh.axis_names, mesh.axis_types))[MODEL] == AxisType.Manual:
        return None
    return mesh


def per_shard(attend: Callable) -> Callable:
    """`attend(q, k, v, k_pages, v_pages, step) -> (o, k_pages, v_pages)` run per "model" shard.

    Under `jax.set_mesh(mesh)`: a `shard_map` in which each device gets q/k/v `[T, H/tp, D]` and pages
    `[N, page_size, Hkv/tp, D]` of its own heads and the whole StepInput, so the kernels see an
    ordinary single-device problem. Without a mesh (or inside one already manual): `attend` itself.
    Under `jax.vmap(..., spmd_axis_name="data")` the replica axis maps onto "data".
    """
    mesh = _model_mesh()
    if mesh is None:
        return attend

    def checked(q, k, v, k_pages, v_pages, step):
        tp = mesh.shape[MODEL]
        if q.shape[-2] % tp or k_pages.shape[-2] % tp:
            raise ValueError(f"{q.shape[-2]} q heads and {k_pages.shape[-2]} kv heads must both divide by the "
                             f"model axis ({tp}); place the model with jpaged.sharding.shard_model")
        # check_vma=False: the kernels' pallas_call has no varying-axis rules; every output is per shard.
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
    XLA, the GPU partitioner all-gathers the whole table every step instead: 1 GB for Llama-3-8B, 0.98 ms
    of a 7 ms TP-2 decode step on the H200. Without a mesh, or with a vocabulary the axis does not
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


# ---------------------------------------------------------------- loading straight into shards


def _abstract_model(cfg: ModelConfig, dtype):
    # Imported here: models.layers imports this module, so models.registry is not ready at import time.
    from models.registry import model_class
    return nnx.eval_shape(lambda: model_class(cfg)(cfg, dtype=dtype))


def _safetensors_index(paths: Sequence[str]) -> dict[str, tuple[str, str, bool]]:
    """{jpaged parameter path: (file, HF tensor name, transpose)} over a safetensors file set."""
    from safetensors import safe_open
    index = {}
    for file in paths:
        with safe_open(file, framework="flax") as f:
            for name in f.keys():
                found = hf_name_to_path(name)
                if found is not None:
                    index[_path_name(found[0])] = (file, name, found[1])
    return index


def _slice_reader(file: str, name: str, transpose: bool, shape, dtype, head_dim: int, repeats: int):
    """A make_array_from_callback callback: the device's index of the jpaged parameter -> its slice,
    read from the checkpoint with get_slice (never the whole tensor unless the slice is whole)."""
    from safetensors import safe_open
    host = jax.local_devices(backend="cpu")[0]

    def read(index: tuple[slice, ...]) -> np.ndarray:
        index = tuple(index)
        heads = None
        if repeats > 1:  # the last axis holds repeated heads: read the source heads once each
            start, stop, _ = index[-1].indices(shape[-1])
            wanted = np.arange(start // head_dim, -(-stop // head_dim)) // repeats
            lo, hi = int(wanted[0]), int(wanted[-1]) + 1
            heads = wanted - lo
            index = (*index[:-1], slice(lo * head_dim, hi * head_dim))
        file_index = index[::-1] if transpose else index
        with jax.default_device(host), safe_open(file, framework="flax") as f:
            value = np.asarray(f.get_slice(name)[file_index])
        value = value.T if transpose else value
        if heads is not None:
            value = value.reshape(*value.shape[:-1], -1, head_dim)[..., heads, :].reshape(*value.shape[:-1], -1)
        return value.astype(dtype)

    return read


def load_safetensors_sharded(paths: Sequence[str], config: ModelConfig, mesh: Mesh, *,
                             dtype=jnp.bfloat16) -> nnx.Module:
    """The model of `config` with HF safetensors weights read straight into their shards on `mesh`.

    Each device's slice is read with `safe_open(...).get_slice` (`jax.make_array_from_callback`), so
    no device or host ever holds a whole sharded weight. Returns the model of
    `tp_model_config(config, tp)`.
    """
    tp = mesh.shape[MODEL]
    tp_cfg = tp_model_config(config, tp)
    repeats = tp_cfg.num_kv_heads // config.num_kv_heads
    graphdef, abstract = nnx.split(_abstract_model(tp_cfg, dtype))
    index = _safetensors_index(paths)
    flat, missing = [], []
    for path, var in nnx.to_flat_state(abstract):
        name = _path_name(path)
        if name not in index:
            missing.append(name)
            continue
        file, hf_name, transpose = index[name]
        reader = _slice_reader(file, hf_name, transpose, var.shape, var.dtype, config.head_dim,
                               repeats if _KV_PARAMS.search(name) else 1)
        sharding = NamedSharding(mesh, param_spec(name, var.shape, tp))
        flat.append((path, var.replace(jax.make_array_from_callback(var.shape, sharding, reader))))
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_orbax_sharded(directory: str, config: ModelConfig, mesh: Mesh, *, dtype=jnp.bfloat16) -> nnx.Module:
    """The model of `config` restored from an orbax checkpoint of `nnx.to_pure_dict(nnx.state(model))`,
    each device reading only its shards. k/v with too few heads are restored whole, then repeated."""
    import orbax.checkpoint as ocp
    tp = mesh.shape[MODEL]
    tp_cfg = tp_model_config(config, tp)
    _, saved = nnx.split(_abstract_model(config, dtype))
    graphdef, _ = nnx.split(_abstract_model(tp_cfg, dtype))
    repeats = tp_cfg.num_kv_heads // config.num_kv_heads

    def target(name, var):
        spec = P() if repeats > 1 and _KV_PARAMS.search(name) else param_spec(name, var.shape, tp)
        return jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=NamedSharding(mesh, spec))

    abstract = nnx.from_flat_state([(p, var.replace(target(_path_name(p), var)))
                                    for p, var in nnx.to_flat_state(saved)])
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(os.path.abspath(directory), nnx.to_pure_dict(abstract))
    nnx.replace_by_pure_dict(saved, restored)
    return nnx.merge(graphdef, shard_state(saved, mesh, config))
