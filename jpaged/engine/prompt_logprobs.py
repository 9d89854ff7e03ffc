"""Prompt logprobs inside the scheduled prefill: how likely the model finds each prompt token.

A request with `SamplingParams.prompt_logprobs` (vLLM's name) is prefilled by the normal scheduler in
normal chunks. Each step that computes some of its prompt also scores those positions: the step's
logits are taken at the sample rows and, after them, at the scored positions (`plan_scores` picks them
on the host), and `score_rows` turns each scored row into the next prompt token's logprob and rank and
the top K, on the device. Only [R, 2 + 2K] numbers come back, never a [T, V] array. The scores land in
the request's `PromptScores` by position, so a preempted and recomputed prompt just scores again, and
an abort at any chunk leaves nothing behind.

The scheduler caps the positions scored per step at `EngineConfig.max_scored_prompt_tokens` (the
logits of a scored position are a [V] float32 row each) and gives a scoring sequence no prefix-cache
hit while its scores are pending: a cached page has no logits to score (docs/architecture.md).

Shapes: R scored rows of a step, V vocab, K = SamplingParams.MAX_LOGPROBS.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.outputs import Logprob
from jpaged.sampling_params import SamplingParams

VOCAB_BLOCK = 4096  # top-k over the vocabulary in blocks of this many ids, then over the blocks' winners
ROW_BLOCK = 128     # scored rows processed together (bounds the [rows, V] temporaries)


def blockwise_top_k(x: jax.Array, k: int, block: int = VOCAB_BLOCK) -> tuple[jax.Array, jax.Array]:
    """(values, indices) of the top k of each row of x [R, V]: top k within vocabulary blocks, then
    among those R x (V / block) x k candidates (lax.top_k over a whole large vocabulary is slow on GPUs)."""
    rows, vocab = x.shape
    if vocab <= block:
        return jax.lax.top_k(x, k)
    num_blocks = -(-vocab // block)
    padded = jnp.pad(x, ((0, 0), (0, num_blocks * block - vocab)), constant_values=-jnp.inf)
    values, idx = jax.lax.top_k(padded.reshape(rows, num_blocks, block), k)          # [R, nb, k]
    idx = idx + (jnp.arange(num_blocks, dtype=idx.dtype) * block)[None, :, None]
    values, pick = jax.lax.top_k(values.reshape(rows, -1), k)                       # [R, k]
    return values, jnp.take_along_axis(idx.reshape(rows, -1), pick, axis=-1)


def score_rows(logits: jax.Array, targets: jax.Array, num_top: int):
    """For logits [R, V] and the token that follows each row, targets [R]: (logprob [R], rank [R],
    top ids [R, K], top logprobs [R, K]) under log_softmax, ROW_BLOCK rows at a time."""
    rows = logits.shape[0]
    block = min(ROW_BLOCK, rows)
    padded = -(-rows // block) * block

    def one_block(args):
        x, t = args
        logprobs = jax.nn.log_softmax(x.astype(jnp.float32), axis=-1)
        chosen = jnp.take_along_axis(logprobs, t[:, None], axis=-1)[:, 0]
        ranks = jnp.sum(logprobs >= chosen[:, None], axis=-1).astype(jnp.int32)
        top_logprobs, top_ids = blockwise_top_k(logprobs, num_top)
        return chosen, ranks, top_ids.astype(jnp.int32), top_logprobs

    x = jnp.pad(logits, ((0, padded - rows), (0, 0))).reshape(padded // block, block, -1)
    t = jnp.pad(targets, (0, padded - rows)).reshape(padded // block, block)
    outs = jax.lax.map(one_block, (x, t))
    return tuple(o.reshape(padded, *o.shape[2:])[:rows] for o in outs)


@dataclasses.dataclass
class ScorePlan:
    """The positions one step scores: row j is token `token_index[j]` of the step, position
    `positions[j]` of `seqs[j]`, whose next prompt token is `targets[j]`."""

    token_index: list[int]
    targets: list[int]
    seqs: list
    positions: list[int]

    def __len__(self) -> int:
        return len(self.token_index)


def plan_scores(entries) -> ScorePlan | None:
    """The scored positions of a batch (ScheduledSeq entries, in step order): every computed prompt
    position but the last of each sequence whose `scores_pending` is set; None when there are none."""
    plan, offset = ScorePlan([], [], [], []), 0
    for e in entries:
        seq = e.seq
        if seq.scores_pending:
            end = min(e.start + e.num_tokens, seq.num_prompt_tokens - 1)
            for position in range(e.start, end):
                plan.token_index.append(offset + position - e.start)
                plan.targets.append(seq.token_ids[position + 1])
                plan.seqs.append(seq)
                plan.positions.append(position)
        offset += e.num_tokens
    return plan if len(plan) else None


def scored_positions(start: int, num_tokens: int, num_prompt_tokens: int) -> int:
    """How many positions a chunk [start, start + num_tokens) of a scoring sequence scores."""
    return max(0, min(start + num_tokens, num_prompt_tokens - 1) - start)


class PromptScores:
    """One request's prompt scores, filled by position as its prefill chunks are read back."""

    def __init__(self, num_prompt_tokens: int, num_top: int = SamplingParams.MAX_LOGPROBS):
        n = max(0, num_prompt_tokens - 1)  # row i is about prompt token i + 1
        self.logprobs = np.zeros(n, np.float32)
        self.ranks = np.zeros(n, np.int32)
        self.top_ids = np.zeros((n, num_top), np.int32)
        self.top_logprobs = np.zeros((n, num_top), np.float32)
        self._scored = np.zeros(n, bool)

    @property
    def done(self) -> bool:
        return bool(self._scored.all())

    def record(self, positions: np.ndarray, logprobs, ranks, top_ids, top_logprobs) -> None:
        k = self.top_ids.shape[1]
        self.logprobs[positions] = logprobs
        self.ranks[positions] = ranks
        self.top_ids[positions] = top_ids[:, :k]
        self.top_logprobs[positions] = top_logprobs[:, :k]
        self._scored[positions] = True

    def entries(self, prompt_ids: list[int], k: int, decode: Callable[[list[int]], str]
                ) -> list[dict[int, Logprob] | None]:
        """vLLM's RequestOutput.prompt_logprobs: None for the first token (nothing predicts it), then
        per token {token id: Logprob} holding the token itself (with its rank) and the top k."""
        texts: dict[int, str] = {}

        def text(token: int) -> str:
            if token not in texts:
                texts[token] = decode([token])
            return texts[token]

        entries: list[dict[int, Logprob] | None] = [None]
        logprobs, ranks = self.logprobs.tolist(), self.ranks.tolist()
        top_ids, top_logprobs = self.top_ids[:, :k].tolist(), self.top_logprobs[:, :k].tolist()
        for i, token in enumerate(prompt_ids[1:]):
            entry = {token: Logprob(logprobs[i], ranks[i], text(token))}
            for rank, (tid, lp) in enumerate(zip(top_ids[i], top_logprobs[i]), start=1):
                entry.setdefault(tid, Logprob(lp, rank, text(tid)))
            entries.append(entry)
        return entries


def record_step(plan: ScorePlan, rows, requests: dict, decode: Callable[[list[int]], str]) -> None:
    """Writes a read-back step's scored rows (`rows`: a SamplerOutput of numpy arrays, one row per
    plan row) into their requests (`requests`: the output processor's RequestStates by id); a request
    whose prompt is now fully scored gets its `prompt_logprobs` and its sequence stops scoring."""
    by_seq: dict[int, list[int]] = {}
    for j, seq in enumerate(plan.seqs):
        by_seq.setdefault(id(seq), []).append(j)
    for js in by_seq.values():
        seq = plan.seqs[js[0]]
        req = requests.get(seq.request_id)
        if req is None or req.prompt_scores is None or not seq.scores_pending:
            continue  # aborted, or scored already (a recompute)
        idx = np.asarray(js)
        req.prompt_scores.record(np.asarray(plan.positions)[idx], rows.logprobs[idx], rows.ranks[idx],
                                 rows.top_ids[idx], rows.top_logprobs[idx])
        if req.prompt_scores.done:
            seq.scores_pending = False
            req.prompt_logprobs = req.prompt_scores.entries(req.prompt_token_ids, req.params.prompt_logprobs,
                                                            decode)
            req.prompt_scores = None
