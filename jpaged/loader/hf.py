"""HF model dirs: `config.json` + `*.safetensors` (one file or sharded with an index) -> a jpaged model.

Weights stream one tensor at a time from `safetensors.safe_open` into a model whose parameters exist
only as shapes until then (`nnx.eval_shape`), so peak memory is the model in its dtype plus one tensor.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from jpaged.loader import fp8_checkpoint

from jpaged import config
from models import ModelConfig, model_class
from models.weights import load_hf_weights

DTYPES = {name: getattr(jnp, name) for name in config.DTYPES}


def jax_dtype(dtype: str):
    """The jnp dtype of a config.DTYPES name, or of 'auto' resolved on this machine."""
    return DTYPES[config.resolve_dtype(dtype)]


def read_json(path: Path) -> dict[str, Any]:
    """The parsed file; ValueError when it is missing or not JSON."""
    if not path.is_file():
        raise ValueError(f"{path.parent} has no {path.name}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


def build_model(cfg: ModelConfig, dtype: str, weights: Iterable[tuple[str, np.ndarray]]) -> nnx.Module:
    """A model of `cfg` in `dtype` whose every parameter comes from `weights` (HF names), with no random init."""
    dt = jax_dtype(dtype)
    cls = model_class(cfg)
    model = nnx.eval_shape(lambda: cls(cfg, dtype=dt))
    load_hf_weights(model, weights)
    return model


def random_model(cfg: ModelConfig, dtype: str, seed: int = 0) -> nnx.Module:
    return model_class(cfg)(cfg, dtype=jax_dtype(dtype), rngs=nnx.Rngs(seed))


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's files: those the sharding index names, else every `*.safetensors` in the dir."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: expected a non-empty 'weight_map'")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{index} names shards that are missing: {missing[:3]}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir} has no *.safetensors weights")
    return files


def iter_safetensors(files: Iterable[Path]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, host array) for every tensor of every file, one tensor in memory at a time."""
    cpu = jax.local_devices(backend="cpu")[0]  # local: in a multi-host job devices("cpu")[0] is process 0's
    for file in files:
        try:
            # framework="flax" reads bf16 (numpy cannot); pinned to the CPU so np.asarray does not copy back.
            fp8 = fp8_checkpoint.fp8_tensors(file)   # safetensors' own readers cannot build fp8 arrays
            with safe_open(str(file), framework="flax") as f:
                for name in f.keys():
                    if name in fp8:
                        yield name, np.asarray(fp8[name])
                        continue
                    with jax.default_device(cpu):
                        tensor = f.get_tensor(name)
                    yield name, np.asarray(tensor)
        except SafetensorError as e:
            raise ValueError(f"{file}: corrupt or unreadable safetensors file ({e})") from None


def load_hf_dir(model_dir: str | Path, dtype: str = "float32") -> nnx.Module:
    """Builds the model of an HF dir (`config.json` + safetensors) in `dtype` ("float32" or "bfloat16")."""
    model_dir = Path(model_dir)
    hf_config = read_json(model_dir / "config.json")
    cfg = ModelConfig.from_hf(hf_config)
    weights = iter_safetensors(safetensors_files(model_dir))
    if fp8_checkpoint.checkpoint_quantization(hf_config) == "fp8":   # fp8 weights: dequantized as they stream
        weights = fp8_checkpoint.dequantized(weights)
    return build_model(cfg, dtype, weights)
