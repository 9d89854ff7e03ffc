"""Speculative decoding: proposers (n-gram lookup on the host, a draft model on the device), verification
of k proposals as one q_len = k + 1 chunk of the target's ragged step, exact acceptance, KV rollback.
docs/speculative_decoding.md has the design."""
from jpaged.engine.spec_decode.config import SpeculativeConfig

__all__ = ["SpeculativeConfig"]
