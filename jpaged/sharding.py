"""Multi-device: the ("data", "model") mesh, placing a model's weights and its page pool on it, multi-host.

Where it sits: `LLM`, the CLI and `jpaged.generate` build a mesh with `make_mesh`, place the model with
`shard_model` (or load it straight into shards: jpaged/loader/sharded.py), create the cache with
`new_kv_cache`, and trace their jitted step under `jax.set_mesh(mesh)`. Inside the step, XLA partitions
the matmuls from the parameter shardings, and attention runs per shard (models/sharding.py, which also
holds the partition specs and the tensor-parallel layout).

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
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from models.config import ModelConfig
from models.kv_cache import KVCache, KVCacheSpec
from models.sharding import (DATA, KV_CACHE_SPEC, KV_PARAMS, MODEL, REPLICA_KV_CACHE_SPEC, param_spec, path_name,
                             repeat_heads, tp_model_config)


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


def shard_state(state, mesh: Mesh, config: ModelConfig):
    """`state` (from `nnx.split(model)` of a model built with `config`) placed on `mesh` by PARAM_SPECS.

    Repeats k/v heads when `config` has fewer kv heads than the model axis; merge the result with the
    graphdef of `tp_model_config(config, tp)` (`shard_model` does both).
    """
    tp = mesh.shape[MODEL]
    repeats = tp_model_config(config, tp).num_kv_heads // config.num_kv_heads
    ep = config.expert_parallel
    flat = []
    for path, var in nnx.to_flat_state(state):
        name = path_name(path)
        value = var.get_value()
        if repeats > 1 and KV_PARAMS.search(name):
            shape = (*value.shape[:-1], value.shape[-1] * repeats)
            sharding = NamedSharding(mesh, param_spec(name, shape, tp, expert_parallel=ep))
            value = jax.jit(repeat_heads, static_argnums=(1, 2), out_shardings=sharding)(
                value, config.head_dim, repeats)
        else:
            value = _place(value, NamedSharding(mesh, param_spec(name, value.shape, tp, expert_parallel=ep)))
        flat.append((path, var.replace(value)))
    return nnx.from_flat_state(flat)


def _place(value, sharding: NamedSharding) -> jax.Array:
    """device_put that also works when the sharding spans other processes' devices."""
    if sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: np.asarray(value[index]))


def shard_model(model: nnx.Module, mesh: Mesh, *, expert_parallel: bool = False) -> nnx.Module:
    """A copy of `model` with every parameter placed on `mesh` by PARAM_SPECS (k/v heads repeated when
    there are fewer than devices on the model axis); trace steps under `jax.set_mesh(mesh)`.
    `expert_parallel`: an MoE model's experts split over the model axis (models/moe.py)."""
    cfg = tp_model_config(model.config, mesh.shape[MODEL], expert_parallel=expert_parallel)
    graphdef, state = nnx.split(model)
    if cfg != model.config:
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: type(model)(cfg, dtype=model.dtype)))
    source = dataclasses.replace(model.config, expert_parallel=cfg.expert_parallel)
    return nnx.merge(graphdef, shard_state(state, mesh, source))


def kv_cache_spec(model: nnx.Module, mesh: Mesh, page_size: int, dtype=None) -> KVCacheSpec:
    """The pages of a sharded model (from `shard_model` or a shard-direct loader) on `mesh`: its kv heads
    split over the model axis."""
    cfg = model.config
    if cfg.num_kv_heads % mesh.shape[MODEL]:
        raise ValueError(f"model has {cfg.num_kv_heads} kv heads for a model axis of {mesh.shape[MODEL]}: "
                         "pass the model returned by shard_model")
    return KVCacheSpec.for_model(cfg, page_size, dtype or model.dtype, kv_shards=mesh.shape[MODEL])


def new_kv_cache(spec: KVCacheSpec, mesh: Mesh, num_pages: int) -> KVCache:
    """The page pool of `spec` created on the devices of `mesh`, split over kv heads."""
    if spec.kv_shards != mesh.shape[MODEL]:
        raise ValueError(f"spec splits kv heads over {spec.kv_shards} devices, the mesh's model axis has "
                         f"{mesh.shape[MODEL]}")
    # KV_CACHE_SPEC names the kv-head axis (the third) only, so it also places the [N, page_size, Hkv] scales.
    return spec.create(num_pages, sharding=NamedSharding(mesh, KV_CACHE_SPEC))


def new_replica_kv_cache(spec: KVCacheSpec, mesh: Mesh, num_pages: int) -> KVCache:
    """One page pool of `num_pages` per data-parallel replica: leaves [R, N, page_size, Hkv, D]."""
    if spec.kv_shards != mesh.shape[MODEL]:
        raise ValueError(f"spec splits kv heads over {spec.kv_shards} devices, the mesh's model axis has "
                         f"{mesh.shape[MODEL]}")
    # Pages [R, N, page_size, Hkv, D] and scales [R, N, page_size, Hkv], both split over kv heads.
    return spec.create(num_pages, leading=(mesh.shape[DATA],),
                       sharding=lambda rank: NamedSharding(mesh, P(*REPLICA_KV_CACHE_SPEC[:rank])))


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
