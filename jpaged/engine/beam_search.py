"""Beam search over the engine's sequences: pick the next beams from each live beam's top candidates.

The engine runs every live beam as an ordinary sequence (greedy sampling, top-logprobs on). After a
step, `select` ranks all (beam, next token) candidates by cumulative logprob; the chosen ones continue
(the first by appending to its beam, the others by forking it, which shares its pages copy-on-write),
beams with no candidate are dropped, and candidates that end in EOS become finished hypotheses.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Hypothesis:
    token_ids: list[int]
    cumulative_logprob: float
    finish_reason: str


def score(cumulative_logprob: float, length: int, length_penalty: float) -> float:
    """HF's beam score: cumulative logprob over generated length ** length_penalty."""
    return cumulative_logprob / max(length, 1) ** length_penalty


@dataclasses.dataclass
class Candidate:
    beam: int            # index into the live beams passed to `select`
    token: int
    cumulative_logprob: float


def select(beams: list[tuple[float, list[int], list[float]]], width: int, eos_token_ids: set[int]
           ) -> tuple[list[Candidate], list[Candidate]]:
    """Returns (continuing, finished) candidates.

    Args:
      beams: per live beam, (cumulative logprob, top token ids, their logprobs), best first.
      width: the beam width W; each beam offers its top 2W tokens, W of all candidates continue.
      eos_token_ids: tokens that end a hypothesis (empty with ignore_eos).
    """
    candidates = [Candidate(b, int(tok), cum + float(lp))
                  for b, (cum, ids, lps) in enumerate(beams) for tok, lp in list(zip(ids, lps))[:2 * width]]
    candidates.sort(key=lambda c: c.cumulative_logprob, reverse=True)
    continuing, finished = [], []
    for rank, cand in enumerate(candidates):
        if cand.token in eos_token_ids:
            if rank < width:  # as HF: an EOS candidate counts only among the top W
                finished.append(cand)
            continue
        continuing.append(cand)
        if len(continuing) == width:
            break
    return continuing, finished


def is_done(finished: list[Hypothesis], best_live_cumulative: float, live_length: int, width: int,
            length_penalty: float) -> bool:
    """HF's heuristic (early_stopping=False): done once W hypotheses are finished and the best live
    beam, scored at its current length, cannot beat the worst of them."""
    if len(finished) < width:
        return False
    worst = sorted((score(h.cumulative_logprob, len(h.token_ids), length_penalty) for h in finished),
                   reverse=True)[width - 1]
    return score(best_live_cumulative, live_length, length_penalty) <= worst
