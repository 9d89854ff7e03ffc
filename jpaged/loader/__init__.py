"""Model loading: one spec string -> (model, tokenizer), whatever the source.

`spec` is "default" (SmolLM2-135M-Instruct, fetched and converted once), an HF model dir, a `.gguf`
file, a checkpoint dir written by `jpaged convert`, or the name of a preset in `configs/` (random weights).
"""
from __future__ import annotations

from pathlib import Path

from jpaged.loader.tokenizer import Tokenizer
from models import ModelConfig

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
GGUF_MAGIC = b"GGUF"


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))


def load_model(spec: str = "default", dtype: str = "float32", mesh=None):
    """Loads a model and its tokenizer.

    Args:
      spec: "default", an HF model dir (config.json + *.safetensors), a .gguf file, a dir written by
        `jpaged convert`, or a preset name from configs/ (random weights, byte tokenizer).
      dtype: one of jpaged.config.DTYPES, or "auto" (jpaged.config.resolve_dtype), the dtype of the
        parameters (and the default KV cache).
      mesh: None (one device), or the ("data", "model") mesh to load a tensor-parallel model onto: HF
        dirs and jpaged checkpoints are read straight into each device's shards (jpaged/loader/sharded.py);
        GGUF files and presets are built in host memory, then placed.

    Returns:
      (model, tokenizer): a `LlamaForCausalLM` (under a mesh: the model of
      `models.sharding.tp_model_config`, placed) and a `Tokenizer`; the tokenizer is None for an HF dir
      without tokenizer.json.

    Raises:
      ValueError naming what is wrong: unknown spec, unsupported architecture, unreadable files.
    """
    from jpaged.config import resolve_dtype

    dtype = resolve_dtype(dtype)
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"model must be a non-empty string, got {spec!r}")
    if spec == "default":
        from jpaged.loader.default_model import default_checkpoint
        return _load_path(default_checkpoint(), dtype, mesh)
    path = Path(spec).expanduser()
    if path.exists():
        return _load_path(path, dtype, mesh)
    if (CONFIGS_DIR / f"{spec}.json").is_file():
        return _placed(*_on_host(_load_preset, spec, dtype, mesh=mesh), mesh)
    raise ValueError(f"model {spec!r} not found: expected 'default', an HF model dir, a .gguf file, a dir "
                     f"written by `jpaged convert`, or a preset ({', '.join(preset_names())})")


def _on_host(load, *args, mesh):
    """load(*args), in host memory when the result is to be placed on a mesh afterwards."""
    if mesh is None:
        return load(*args)
    import jax
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        return load(*args)


def _placed(model, tokenizer, mesh):
    if mesh is None:
        return model, tokenizer
    from jpaged.sharding import shard_model
    return shard_model(model, mesh), tokenizer


def _load_path(path: Path, dtype: str, mesh=None):
    from jpaged.loader import gguf, hf, orbax_ckpt, sharded

    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise ValueError(f"{path} is not a GGUF file (a model file must be .gguf; for safetensors "
                                 f"pass the model's directory)")
        return _placed(*_on_host(gguf.load_gguf, path, dtype, mesh=mesh), mesh)
    if orbax_ckpt.is_checkpoint(path):
        if mesh is None:
            return orbax_ckpt.load_checkpoint(path, dtype)
        return sharded.load_jpaged_checkpoint_sharded(path, mesh, dtype=hf.jax_dtype(dtype))
    if (path / "config.json").is_file():
        tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
        if mesh is None:
            return hf.load_hf_dir(path, dtype), tokenizer
        cfg = ModelConfig.from_hf(hf.read_json(path / "config.json"))
        files = [str(f) for f in hf.safetensors_files(path)]
        return sharded.load_safetensors_sharded(files, cfg, mesh, dtype=hf.jax_dtype(dtype)), tokenizer
    raise ValueError(f"{path} is neither an HF model dir (no config.json) nor a jpaged checkpoint")


def _load_preset(name: str, dtype: str):
    from jpaged.loader.hf import random_model, read_json
    from jpaged.loader.tokenizer import byte_tokenizer

    cfg = ModelConfig.from_hf(read_json(CONFIGS_DIR / f"{name}.json"))
    tokenizer = byte_tokenizer(cfg.eos_token_ids, cfg.vocab_size) if cfg.vocab_size >= 256 else None
    return random_model(cfg, dtype), tokenizer


__all__ = ["Tokenizer", "load_model", "preset_names"]
