"""Maps an HF `architectures` entry to the model class that runs it."""
from __future__ import annotations

from models.config import SUPPORTED_ARCHITECTURES, ModelConfig
from models.llama import LlamaForCausalLM

MODEL_CLASSES = {arch: LlamaForCausalLM for arch in SUPPORTED_ARCHITECTURES}


def model_class(cfg: ModelConfig):
    try:
        return MODEL_CLASSES[cfg.architecture]
    except KeyError:
        raise ValueError(f"no model class for architecture {cfg.architecture!r}") from None
