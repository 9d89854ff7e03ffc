"""Model loading: one spec string -> (model, tokenizer), whatever the source.

`spec` is "default" (SmolLM2-135M-Instruct, fetched and converted once), an HF model dir, a `.gguf`
file, a checkpoint dir written by `jpaged convert`, or the name of a preset in `configs/` (random weights).
"""
from __future__ import annotations

from pathlib import Path

from jpaged.loader.tokenizer import Tokenizer

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
GGUF_MAGIC = b"GGUF"


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))


def load_model(spec: str = "default", dtype: str = "float32"):
    """Loads a model and its tokenizer.

    Args:
      spec: "default", an HF model dir (config.json + *.safetensors), a .gguf file, a dir written by
        `jpaged convert`, or a preset name from configs/ (random weights, byte tokenizer).
      dtype: one of jpaged.config.DTYPES, or "auto" (jpaged.config.resolve_dtype), the dtype of the
        parameters (and the default KV cache).

    Returns:
      (model, tokenizer): a `LlamaForCausalLM` and a `Tokenizer`; the tokenizer is None for an HF dir
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
        return _load_path(default_checkpoint(), dtype)
    path = Path(spec).expanduser()
    if path.exists():
        return _load_path(path, dtype)
    if (CONFIGS_DIR / f"{spec}.json").is_file():
        return _load_preset(spec, dtype)
    raise ValueError(f"model {spec!r} not found: expected 'default', an HF model dir, a .gguf file, a dir "
                     f"written by `jpaged convert`, or a preset ({', '.join(preset_names())})")


def _load_path(path: Path, dtype: str):
    from jpaged.loader import gguf, hf, orbax_ckpt

    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise ValueError(f"{path} is not a GGUF file (a model file must be .gguf; for safetensors "
                                 f"pass the model's directory)")
        return gguf.load_gguf(path, dtype)
    if orbax_ckpt.is_checkpoint(path):
        return orbax_ckpt.load_checkpoint(path, dtype)
    if (path / "config.json").is_file():
        tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
        return hf.load_hf_dir(path, dtype), tokenizer
    raise ValueError(f"{path} is neither an HF model dir (no config.json) nor a jpaged checkpoint")


def _load_preset(name: str, dtype: str):
    from jpaged.loader.hf import random_model, read_json
    from jpaged.loader.tokenizer import byte_tokenizer
    from models import ModelConfig

    cfg = ModelConfig.from_hf(read_json(CONFIGS_DIR / f"{name}.json"))
    tokenizer = byte_tokenizer(cfg.eos_token_ids, cfg.vocab_size) if cfg.vocab_size >= 256 else None
    return random_model(cfg, dtype), tokenizer


__all__ = ["Tokenizer", "load_model", "preset_names"]
