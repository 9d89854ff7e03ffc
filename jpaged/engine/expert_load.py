"""Load balance of a mixture-of-experts model: tokens routed to each expert, per step and in total.

The step function returns `[MoE layers, X]` counts of the real tokens (models/moe.py); the runner
records each step's as it reads the step back, and `Engine.stats()` / `/metrics` report them summed over
the MoE layers.
"""
from __future__ import annotations

import numpy as np


class ExpertLoad:
    """Running per-expert token counts; `num_experts` 0 for a dense model (no stats)."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.total = np.zeros(num_experts, np.int64)
        self.last_step = np.zeros(num_experts, np.int64)

    def record(self, counts: np.ndarray) -> None:
        """One step's counts, [MoE layers, X]."""
        if counts.ndim != 2 or counts.shape[1] != self.num_experts:
            raise ValueError(f"expert counts must be [layers, {self.num_experts}], got {counts.shape}")
        self.last_step = counts.sum(axis=0, dtype=np.int64)
        self.total += self.last_step

    def stats(self) -> dict:
        """{} for a dense model; else `expert_tokens` (since start) and `expert_tokens_last_step`, each an
        int64 array [X] summed over the MoE layers (arrays, so data-parallel replicas sum elementwise)."""
        if not self.num_experts:
            return {}
        return dict(expert_tokens=self.total.copy(), expert_tokens_last_step=self.last_step.copy())


def imbalance(tokens: np.ndarray) -> float:
    """max / mean of per-expert tokens (1.0: perfectly balanced; 0.0 when no token was routed)."""
    mean = float(np.mean(tokens)) if len(tokens) else 0.0
    return float(np.max(tokens)) / mean if mean > 0 else 0.0
