"""Constrained decoding: what a request may generate (params) and the per-request matchers that turn it
into a token bitmask for the sampler (grammar), both over llguidance."""
from jpaged.structured.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
