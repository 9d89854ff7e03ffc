"""The engine's side of speculative decoding: proposals before scheduling, one sampler row per verified
position, acceptance after the read-back, and the acceptance figures.

Flow of one step (jpaged/engine/llm_engine.py): `proposals(scheduler)` -> `Scheduler.schedule(proposals)`
appends each fitting proposal to its sequence as tentative tokens and schedules the decode as a
q_len = k + 1 chunk -> `fill_drafts(batch)` (draft model: writes its tokens into those slots) -> the step
samples every position of the chunk -> `accept(result)` keeps each run up to its first rejected
proposal plus the target's own token there -> `Scheduler.fill` rolls the rest back.
"""
from __future__ import annotations

import dataclasses

import jax

from jpaged.engine.output_processor import StepResult
from jpaged.engine.sequence import PLACEHOLDER
from jpaged.engine.spec_decode import ngram, verify
from jpaged.engine.spec_decode.config import SpeculativeConfig
from jpaged.engine.spec_decode.stats import AcceptanceStats


class AtPosition:
    """`seq` as the sampler sees it when sampling the token at `position`: the history stops before it
    (penalties, min_tokens and a seeded row's key follow the output position)."""

    def __init__(self, seq, position: int):
        self._seq, self._position = seq, position

    def __getattr__(self, name):
        return getattr(self._seq, name)

    @property
    def num_output_tokens(self) -> int:
        return self._position - self._seq.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self._seq.token_ids[self._seq.num_prompt_tokens:self._position]


class Speculator:
    def __init__(self, config: SpeculativeConfig, *, draft=None):
        if (config.method == "draft_model") != (draft is not None):
            raise ValueError("a draft proposer is needed exactly for method 'draft_model'")
        self.config = config
        self.draft = draft
        self.totals = AcceptanceStats()
        self.per_request: dict[str, AcceptanceStats] = {}

    def proposals(self, scheduler) -> dict[int, list[int]]:
        """seq_id -> proposed tokens for the running sequences that decode next (the draft model's are
        slots, filled by `fill_drafts` once the batch is scheduled)."""
        k, out = self.config.num_speculative_tokens, {}
        for seq in scheduler.running:
            if (seq.num_tokens - seq.num_computed_tokens != 1 or seq.has_pending_token
                    or seq.sampling_params.use_beam_search):
                continue
            if self.draft is not None:
                out[seq.seq_id] = [PLACEHOLDER] * k
            else:
                proposal = ngram.propose(seq.token_ids, k, self.config.prompt_lookup_max, self.config.prompt_lookup_min)
                if proposal:
                    out[seq.seq_id] = proposal
        if self.draft is not None:
            self.draft.forget(s.seq_id for s in scheduler.running)
        return out

    def fill_drafts(self, batch) -> None:
        """The draft model's proposals into the scheduled slots, and its pages moved as the target's."""
        if self.draft is None:
            return
        self.draft.copy_pages(batch.copy_pages)
        entries = [e for e in batch.entries if e.num_proposed]
        if entries:
            self.draft.propose(entries)

    @staticmethod
    def rows(entry) -> list[tuple[int, AtPosition]]:
        """(token index within the entry's chunk, sampler view) for each of its k + 1 positions."""
        return [(i, AtPosition(entry.seq, entry.start + 1 + i)) for i in range(entry.num_samples)]

    def accept(self, result: StepResult) -> StepResult:
        """The step's rows cut to each verified run: the accepted proposals and the target's next token."""
        proposed = {e.seq.seq_id: e for e in result.batch.entries if e.num_proposed}
        if not proposed:
            return result
        tokens = result.samples.tokens.tolist()
        keep, r = [], 0
        while r < len(result.rows):
            seq = result.rows[r]
            entry = proposed.get(seq.seq_id)
            if entry is None:
                keep.append(r)
                r += 1
                continue
            k = entry.num_proposed
            first = entry.start + 1
            accepted = verify.accepted_length(seq.token_ids[first:first + k], tokens[r:r + k + 1])
            keep += range(r, r + accepted + 1)
            self.totals.add(k, accepted)
            self.per_request.setdefault(seq.request_id, AcceptanceStats()).add(k, accepted)
            r += k + 1
        samples = jax.tree.map(lambda x: x[keep], result.samples)
        return dataclasses.replace(result, rows=[result.rows[i] for i in keep],
                                   positions=[result.positions[i] for i in keep], samples=samples)

    def request_stats(self, request_id: str, finished: bool) -> dict | None:
        stats = self.per_request.pop(request_id, None) if finished else self.per_request.get(request_id)
        return stats.as_dict() if stats is not None else None

    def stats(self) -> dict:
        t = self.totals
        return dict(spec_proposed_tokens=t.proposed, spec_accepted_tokens=t.accepted, spec_verify_steps=t.verify_steps)
