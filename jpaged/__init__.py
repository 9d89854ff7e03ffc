"""jpaged: an LLM inference engine in JAX with Pallas GPU kernels."""
from jpaged.config import EngineConfig
from jpaged.generate import generate
from jpaged.llm import LLM
from jpaged.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "EngineConfig", "generate"]
