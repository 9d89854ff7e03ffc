"""N-gram prompt lookup: propose what followed the latest earlier occurrence of a sequence's last n tokens.

Plain Python on the host over the sequence's own prompt + output: n runs from `max_n` down to `min_n`,
and the first n with a match wins (a longer match predicts better).
"""
from __future__ import annotations

import numpy as np


def propose(token_ids, k: int, max_n: int, min_n: int) -> list[int]:
    """Up to k tokens that followed the latest earlier match of the last n tokens ([] when none matches)."""
    ids = np.asarray(token_ids, np.int64)
    length = ids.size
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = ids[length - n:]
        # Windows starting at 0 .. length - n - 1: each has at least one token after it.
        windows = np.lib.stride_tricks.sliding_window_view(ids[:length - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return ids[start:start + k].tolist()
    return []
