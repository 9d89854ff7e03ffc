"""jpaged's own checkpoint: a converted model saved with orbax-checkpoint, restored fast.

Layout of a checkpoint dir:
  jpaged.json                                  format marker and the dtype the params were saved in
  config.json                                  HF-style config (ModelConfig.to_hf)
  tokenizer.json, tokenizer_config.json        the tokenizer (Tokenizer.save)
  params/                                      orbax PyTree checkpoint of the model's nnx.Param state
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from jpaged.loader.hf import jax_dtype, read_json
from jpaged.loader.tokenizer import Tokenizer
from models import ModelConfig, model_class

MARKER = "jpaged.json"
FORMAT = "jpaged-orbax-v1"


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def save_checkpoint(model: nnx.Module, tokenizer: Tokenizer | None, dst: str | Path) -> Path:
    """Writes model params, config and tokenizer to `dst`, which must not exist yet.

    The files are written beside `dst` and moved into place at the end, so a crash never leaves a
    half-written checkpoint that `is_checkpoint` accepts.
    """
    dst = Path(dst).absolute()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(f"destination {dst} already exists; choose a new path")
    cfg: ModelConfig = model.config
    hf_config = cfg.to_hf()
    if ModelConfig.from_hf(hf_config) != cfg:
        raise ValueError(f"config of {cfg.architecture} does not round-trip through config.json")
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    staging.chmod(0o755)
    try:
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(staging / "params", params)
        checkpointer.wait_until_finished()
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2))
        if tokenizer is not None:
            tokenizer.save(staging)
        (staging / MARKER).write_text(json.dumps({"format": FORMAT, "dtype": jnp.dtype(model.dtype).name}))
        if dst.exists():
            dst.rmdir()
        os.replace(staging, dst)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return dst


def load_checkpoint(path: str | Path, dtype: str = "float32"):
    """(model in `dtype`, Tokenizer or None) from a dir written by `save_checkpoint`."""
    path = Path(path).absolute()
    marker = read_json(path / MARKER)
    if marker.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {marker.get('format')!r}, expected {FORMAT!r}")
    cfg = ModelConfig.from_hf(read_json(path / "config.json"))
    dt = jax_dtype(dtype)
    abstract = nnx.eval_shape(lambda: model_class(cfg)(cfg, dtype=dt))
    graphdef, abstract_state = nnx.split(abstract)
    target = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    try:
        params = ocp.StandardCheckpointer().restore(path / "params", target)
    except Exception as e:  # orbax raises many types for missing or damaged files
        raise ValueError(f"{path}: cannot restore params ({type(e).__name__}: {e})") from None
    nnx.replace_by_pure_dict(abstract_state, params)
    model = nnx.merge(graphdef, abstract_state)
    tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
    return model, tokenizer
