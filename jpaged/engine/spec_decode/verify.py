"""Acceptance of verified proposals.

The target samples every position of a verified chunk with the request's own sampler (temperature,
top-k/top-p, min-p, penalties over the history up to that position, the seed's key of that output
position). The proposers here draft deterministically: n-gram lookups, and the draft model's argmax.
So q is one-hot at the proposal x, and the standard rejection scheme (accept x with probability
min(1, p(x) / q(x)) = p(x); on rejection draw from norm(max(0, p - q)), which is p without x) is
exactly: draw y ~ p, accept while y == x, and on the first mismatch emit y. `y` is the sampler's own
draw (greedy: the argmax), so the output is distributed as the target's, and a seeded request gives
the same tokens with and without speculation.
"""
from __future__ import annotations

from typing import Sequence


def accepted_length(proposals: Sequence[int], sampled: Sequence[int]) -> int:
    """How many leading proposals the target's draws confirm (len(sampled) == len(proposals) + 1)."""
    if len(sampled) != len(proposals) + 1:
        raise ValueError(f"sampled must hold one token more than proposals ({len(proposals)}), got {len(sampled)}")
    n = 0
    while n < len(proposals) and sampled[n] == proposals[n]:
        n += 1
    return n
