"""Flax NNX decoder definitions: the Llama family, configured from HF config.json."""
from models.config import ModelConfig, RopeScaling, SUPPORTED_ARCHITECTURES
from models.llama import LlamaForCausalLM
from models.registry import model_class

__all__ = ["LlamaForCausalLM", "ModelConfig", "RopeScaling", "SUPPORTED_ARCHITECTURES", "model_class"]
