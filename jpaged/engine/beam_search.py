"""Beam search over the engine's sequences: pick the next beams from each live beam's top candidates.

The engine runs every live beam as an ordinary sequence (greedy sampling, top-logprobs on). After a
step, `select` ranks all (beam, next token) candidates by cumulative logprob; the chosen ones continue
(the first by appending to its beam, the others by forking it, which shares its pages copy-on-write),
beams with no candidate are dropped, and candidates that end in EOS become finished hypotheses.
`plan_step` turns one step's candidates into those actions; the output processor applies them.
"""
from __future__ import annotations

import dataclasses

from jpaged.engine.sequence import PLACEHOLDER
from jpaged.outputs import CompletionOutput


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


@dataclasses.dataclass
class StepPlan:
    """One step of one request's beam search, to apply to its sequences."""

    extended: list[tuple]  # (beam seq, token, cumulative): the beam's first continuation, appended to it
    forks: list[tuple]     # (beam seq, token, cumulative): further continuations, each a fork of the beam
    dropped: list          # beam seqs without a continuation
    finished: list[Hypothesis]


def plan_step(live: list, cumulative: list[float], top_ids, top_logprobs, width: int, eos_token_ids: set[int]
              ) -> StepPlan:
    """The beams after one step. live[b]: beam b's sequence (its last token the one this step drew),
    cumulative[b] its cumulative logprob, top_ids[b] / top_logprobs[b] its best next tokens."""
    continuing, finished = select(list(zip(cumulative, top_ids, top_logprobs)), width, eos_token_ids)
    plan = StepPlan([], [], [], [])
    for cand in finished:
        history = [t for t in live[cand.beam].output_token_ids if t != PLACEHOLDER]
        plan.finished.append(Hypothesis(history + [cand.token], cand.cumulative_logprob, "stop"))
    used = set()
    for cand in continuing:
        (plan.forks if cand.beam in used else plan.extended).append(
            (live[cand.beam], cand.token, cand.cumulative_logprob))
        used.add(cand.beam)
    plan.dropped = [seq for b, seq in enumerate(live) if b not in used]
    return plan


def completions(hypotheses: list[Hypothesis], params, decode) -> list[CompletionOutput]:
    """The n best hypotheses by score, as outputs (`decode(ids, skip_special_tokens=...)` gives the text)."""
    best = sorted(hypotheses, reverse=True,
                  key=lambda h: score(h.cumulative_logprob, len(h.token_ids), params.length_penalty))
    return [CompletionOutput(index=i, text=decode(h.token_ids, skip_special_tokens=params.skip_special_tokens),
                             token_ids=h.token_ids, cumulative_logprob=h.cumulative_logprob,
                             finish_reason=h.finish_reason)
            for i, h in enumerate(best[:params.n])]
