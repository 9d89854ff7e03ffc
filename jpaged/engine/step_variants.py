"""Step variants: the finite set of shapes the engine's jitted calls run at, so all can be compiled first.

A step's compiled shape is (T tokens, P pages per row, sampler tier); S rows follow T
(`ModelRunner.shape_for`). The sampler's optional stages and array widths are not chosen per batch
but by tier, the smallest that covers every row of the batch:

- "plain": temperature only (greedy or random), no logprobs;
- "sample": + top-k / top-p, min-p, min_tokens, the top K logprobs (beam search, `logprobs`);
- "score": + the scored prompt positions of prompt logprobs (R = min(max_scored_prompt_tokens, T) rows);
- "full": + presence / frequency / repetition penalties, over token histories of a fixed width.

Inside a tier a row that does not use a stage passes through it unchanged, so a tier changes no result.
Page moves (copy-on-write, swap) are padded to a few sizes, `move_buckets`, the same way.
`ModelRunner.warmup(tiers)` compiles every (T, P, tier) and every move size; serving then never compiles.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jpaged import sampling
from jpaged.sampling_params import SamplingParams

TIERS = ("plain", "sample", "score", "full")
WARMUP_CHOICES = ("all", "plain")  # --warmup-variants: every tier, or only "plain" (the others compile on first use)
MAX_BARRED_IDS = 128  # width of the min_tokens barred-id table (stop_token_ids + EOS ids)


def needs_sample_tier(p: SamplingParams, vocab_size: int) -> bool:
    return (p.logprobs is not None or p.use_beam_search or p.min_tokens > 0
            or (not p.greedy and (0 < p.top_k < vocab_size or p.top_p < 1.0 or p.min_p > 0.0)))


def needs_full_tier(p: SamplingParams) -> bool:
    return bool(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0)


def tier_of(params, vocab_size: int, scored: bool = False) -> str:
    """The smallest tier that runs every row of `params` (and the batch's scored prompt positions)."""
    if any(needs_full_tier(p) for p in params):
        return "full"
    if scored:
        return "score"
    if any(needs_sample_tier(p, vocab_size) for p in params):
        return "sample"
    return "plain"


def num_top_logprobs(tier: str) -> int:
    return 0 if tier == "plain" else SamplingParams.MAX_LOGPROBS


def num_scored_rows(tier: str, num_tokens: int, max_scored: int) -> int:
    """R: the scored prompt rows of a step of T tokens (none in "plain" and "sample")."""
    return min(max_scored, num_tokens) if tier in ("score", "full") else 0


def _pad_width(x: np.ndarray, width: int, what: str) -> np.ndarray:
    if x.shape[1] > width:
        raise ValueError(f"{what} has {x.shape[1]} entries per row, more than the step's fixed {width}")
    out = np.full((x.shape[0], width), sampling.PAD_ID, np.int32)
    out[:, :x.shape[1]] = x
    return out


def fit_tensors(tensors: sampling.SamplingTensors, tier: str, history_width: int) -> sampling.SamplingTensors:
    """`tensors` with the stages and array widths of `tier` (a superset of what its rows use)."""
    if tier == "plain":
        if tensors.use_penalties or tensors.use_top_k_top_p or tensors.use_min_p or tensors.use_min_tokens:
            raise ValueError("the 'plain' tier has no optional sampler stage; pick the tier with tier_of")
        return tensors
    full = tier == "full"
    if tensors.use_penalties and not full:
        raise ValueError("penalties need the 'full' tier")
    rows = tensors.num_rows
    history = (lambda x: _pad_width(x, history_width, "a token history")) if full else (
        lambda x: np.zeros((rows, 0), np.int32))
    return tensors.replace(
        prompt_tokens=history(np.asarray(tensors.prompt_tokens)),
        output_tokens=history(np.asarray(tensors.output_tokens)),
        barred_ids=_pad_width(np.asarray(tensors.barred_ids), MAX_BARRED_IDS, "the barred ids (stop_token_ids + EOS)"),
        use_penalties=full, use_top_k_top_p=True, use_min_p=True, use_min_tokens=True)


def move_buckets(max_pages_per_seq: int) -> list[int]:
    """Sizes a page move is padded to: powers of four from 4 up to the first >= one sequence's pages;
    a longer list moves in pieces of the largest."""
    buckets, b = [], 4
    while b < max_pages_per_seq:
        buckets.append(b)
        b *= 4
    return buckets + [b]


def padded_moves(pairs: list[tuple[int, int]], buckets: list[int], fill: tuple[int, int]):
    """`pairs` in pieces, each padded with `fill` to a bucket size: [(src [B], dst [B], real count)]."""
    pieces, largest = [], buckets[-1]
    for i in range(0, len(pairs), largest):
        piece = pairs[i:i + largest]
        size = next(b for b in buckets if b >= len(piece))
        src = np.full(size, fill[0], np.int32)
        dst = np.full(size, fill[1], np.int32)
        src[:len(piece)], dst[:len(piece)] = zip(*piece)
        pieces.append((src, dst, len(piece)))
    return pieces


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compiled step shape."""

    num_tokens: int
    max_pages: int
    tier: str


def step_variants(token_buckets: list[int], page_buckets: list[int], tiers=TIERS) -> list[Variant]:
    return [Variant(t, p, tier) for tier in tiers for t in token_buckets for p in page_buckets]
