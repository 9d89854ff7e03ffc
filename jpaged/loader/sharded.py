"""Loading straight into shards: each device reads only its slices of every weight, so no device or
host ever holds a whole sharded weight (tensor-parallel serving loads through here, `load_model(...,
mesh=)`).
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors import safe_open

from jpaged.sharding import shard_state
from models.config import ModelConfig
from models.registry import model_class
from models.sharding import KV_PARAMS, MODEL, param_spec, path_name, tp_model_config
from models.weights import STACKED, hf_name_to_path


def _abstract_model(cfg: ModelConfig, dtype):
    return nnx.eval_shape(lambda: model_class(cfg)(cfg, dtype=dtype))


def _safetensors_index(paths: Sequence[str]) -> tuple[dict[str, tuple[str, str, bool]], dict[str, dict]]:
    """({jpaged parameter path: (file, HF tensor name, transpose)}, {stacked MoE expert parameter:
    {expert: (file, name, transpose)}}) over a safetensors file set."""
    index, stacked = {}, {}
    for file in paths:
        with safe_open(file, framework="flax") as f:
            for name in f.keys():
                found = hf_name_to_path(name)
                if found is None:
                    continue
                path, transpose = found
                if isinstance(path[-1], int) and str(path[-2]).startswith(STACKED):
                    stacked.setdefault(path_name(path[:-1]), {})[path[-1]] = (file, name, transpose)
                else:
                    index[path_name(path)] = (file, name, transpose)
    return index, stacked


def _stacked_reader(rows: dict, shape, dtype):
    """A make_array_from_callback callback for an [X, ...] parameter stored as one tensor per expert:
    reads the device's experts, each only in the device's slice."""
    missing = sorted(set(range(shape[0])) - set(rows))
    if missing:
        raise ValueError(f"checkpoint lacks experts {missing[:5]} of a [{shape[0]}, ...] expert weight")
    readers = {e: _slice_reader(file, name, transpose, shape[1:], dtype, 1, 1)
               for e, (file, name, transpose) in rows.items()}

    def read(index: tuple[slice, ...]) -> np.ndarray:
        experts = range(*index[0].indices(shape[0]))
        return np.stack([readers[e](tuple(index[1:])) for e in experts])

    return read


def _slice_reader(file: str, name: str, transpose: bool, shape, dtype, head_dim: int, repeats: int):
    """A make_array_from_callback callback: the device's index of the jpaged parameter -> its slice,
    read from the checkpoint with get_slice (never the whole tensor unless the slice is whole)."""
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
    index, stacked = _safetensors_index(paths)
    flat, missing = [], []
    for path, var in nnx.to_flat_state(abstract):
        name = path_name(path)
        if name in stacked:
            reader = _stacked_reader(stacked[name], var.shape, var.dtype)
        elif name not in index:
            missing.append(name)
            continue
        else:
            file, hf_name, transpose = index[name]
            reader = _slice_reader(file, hf_name, transpose, var.shape, var.dtype, config.head_dim,
                                   repeats if KV_PARAMS.search(name) else 1)
        sharding = NamedSharding(mesh, param_spec(name, var.shape, tp, expert_parallel=tp_cfg.expert_parallel))
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
        spec = P() if repeats > 1 and KV_PARAMS.search(name) else param_spec(
            name, var.shape, tp, expert_parallel=tp_cfg.expert_parallel)
        return jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=NamedSharding(mesh, spec))

    abstract = nnx.from_flat_state([(p, var.replace(target(path_name(p), var)))
                                    for p, var in nnx.to_flat_state(saved)])
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(os.path.abspath(directory), nnx.to_pure_dict(abstract))
    nnx.replace_by_pure_dict(saved, restored)
    return nnx.merge(graphdef, shard_state(saved, mesh, config))


def load_jpaged_checkpoint_sharded(path, mesh: Mesh, *, dtype=jnp.bfloat16):
    """(model, tokenizer or None) from a dir written by `jpaged convert` (jpaged/loader/orbax_ckpt.py),
    each device reading only its shards."""
    from pathlib import Path

    from jpaged.loader.hf import read_json
    from jpaged.loader.tokenizer import Tokenizer

    path = Path(path).absolute()
    config = ModelConfig.from_hf(read_json(path / "config.json"))
    model = load_orbax_sharded(str(path / "params"), config, mesh, dtype=dtype)
    tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
    return model, tokenizer
