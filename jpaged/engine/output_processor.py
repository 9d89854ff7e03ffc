"""OutputProcessor: a step's sampled tokens -> request state, stop checks, text, RequestOutputs.

Where it sits: `Engine.step()` launches a step and reads its samples back as a `StepResult`; this
writes them into the sequences (`Scheduler.fill`), then per sequence walks its run of new tokens
(one per step today; several in a multi-token step) in order: logprobs, incremental detokenization,
stop token / EOS / stop string / max_tokens / max_model_len. A run that ends inside is cut after the
stopping token, and `Scheduler.finish` frees the sequence's pages. n > 1 samples fork the first
sequence once their first tokens are known; beam search picks its beams (jpaged/engine/beam_search.py).

No JAX here: the samples are numpy arrays, so the processor is tested with synthetic ones.
"""
from __future__ import annotations

import dataclasses
import itertools
import time

from jpaged.engine import beam_search
from jpaged.engine.detokenizer import IncrementalDetokenizer, StopStringChecker
from jpaged.engine.scheduler import ScheduledBatch, Scheduler
from jpaged.engine.sequence import PLACEHOLDER, Sequence
from jpaged.outputs import CompletionOutput, Logprob, RequestOutput
from jpaged.sampling_params import SamplingParams


@dataclasses.dataclass
class SeqState:
    """Per-sequence output bookkeeping that the scheduler does not need."""

    index: int
    detok: IncrementalDetokenizer
    stops: StopStringChecker
    text: str = ""
    cumulative_logprob: float = 0.0
    logprobs: list | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    deferred: list[int] | None = None  # token ids not detokenized yet (final_only without stop strings)


@dataclasses.dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    states: dict[int, SeqState]
    pending_forks: int
    arrival_time: float
    first_token_time: float | None = None
    hypotheses: list[beam_search.Hypothesis] | None = None  # beam search: finished hypotheses
    beam_done: bool = False
    prompt_logprobs: list | None = None  # SamplingParams.prompt_logprobs, once the whole prompt is scored
    prompt_scores: object = None  # prompt_logprobs.PromptScores while the prefill scores the prompt

    @property
    def finished(self) -> bool:
        if self.hypotheses is not None:
            return self.beam_done
        return self.pending_forks == 0 and all(st.finish_reason for st in self.states.values())


@dataclasses.dataclass
class ForkSample:
    """A not-yet-forked n > 1 sample of a request: the parent's history with the child's own params."""

    parent: Sequence
    sampling_params: SamplingParams

    def __getattr__(self, name):
        return getattr(self.parent, name)


@dataclasses.dataclass
class StepResult:
    """A read-back step: who each sampler row was for and what it drew.

    Rows of one sequence are consecutive and, in order, its run of new tokens; `positions[r]` is where
    row r's token goes in its sequence. `samples` is a `jpaged.sampling.SamplerOutput` of numpy arrays: tokens [R],
    logprobs [R], ranks [R], top_ids [R, K], top_logprobs [R, K].
    """

    batch: ScheduledBatch
    rows: list  # per row: the Sequence it samples for, or a ForkSample
    positions: list[int]
    samples: object


class OutputProcessor:
    def __init__(self, tokenizer, scheduler: Scheduler, *, eos_token_ids, max_model_len: int, seq_ids=None):
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.seq_ids = seq_ids if seq_ids is not None else itertools.count()
        self.requests: dict[str, RequestState] = {}
        self.generation_tokens = 0

    # -- requests --------------------------------------------------------------------------------

    def add(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams, *,
            priority: int = 0, arrival_time: float | None = None, prompt_logprobs=None, adapter_id: int = 0
            ) -> Sequence:
        """The request's first sequence, queued on the scheduler (ValueError, nothing kept, if it never fits)."""
        seq = Sequence(seq_id=next(self.seq_ids), request_id=request_id, token_ids=list(prompt_ids),
                       sampling_params=params, priority=priority, adapter_id=adapter_id)
        self.scheduler.add(seq)
        self.requests[request_id] = RequestState(
            request_id=request_id, prompt=prompt, prompt_token_ids=list(prompt_ids), params=params,
            seqs=[seq], states={seq.seq_id: self._seq_state(0, prompt_ids, params)},
            pending_forks=0 if params.use_beam_search else params.best_of - 1,
            hypotheses=[] if params.use_beam_search else None, arrival_time=arrival_time or time.monotonic(),
            prompt_logprobs=prompt_logprobs)
        return seq

    def _seq_state(self, index: int, prompt_ids, params: SamplingParams) -> SeqState:
        return SeqState(
            index=index,
            detok=IncrementalDetokenizer(self.tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens),
            stops=StopStringChecker(params.stop),
            deferred=[] if params.output_kind == "final_only" and not params.stop else None,
            logprobs=[] if params.logprobs is not None else None)

    def abort(self, request_id: str) -> None:
        if self.requests.pop(request_id, None) is not None:
            self.scheduler.abort(request_id)

    def fork_samples(self, seq: Sequence) -> list[ForkSample]:
        """n > 1: the samples still to fork from seq, drawn from its logits this step (empty for most)."""
        req = self.requests[seq.request_id]
        if not req.pending_forks or seq is not req.seqs[0]:
            return []
        p = req.params
        return [ForkSample(seq, p if p.seed is None else dataclasses.replace(
                    p, seed=hash((p.seed, len(req.seqs) + i)) % (1 << 63)))
                for i in range(req.pending_forks)]

    # -- a step's samples ------------------------------------------------------------------------

    def process(self, step: StepResult) -> list[RequestOutput]:
        """Writes the step's tokens into its sequences and returns the outputs it produced."""
        rows, out = step.rows, step.samples
        tokens = out.tokens.tolist()
        sampled: dict[int, list[int]] = {}  # seq_id -> its run of tokens
        firsts, fork_rows = [], []  # each sequence's first row; the n > 1 samples to fork
        beam_rows: dict[str, list[int]] = {}
        for r, row in enumerate(rows):
            if isinstance(row, ForkSample):
                fork_rows.append(r)
                continue
            run = sampled.get(row.seq_id)
            if run is None:
                sampled[row.seq_id] = [tokens[r]]
                firsts.append(r)
            else:
                run.append(tokens[r])
            if row.sampling_params.use_beam_search:
                beam_rows.setdefault(row.request_id, []).append(r)
        beam_plans = [self._choose_beams(self.requests[rid], [rows[r] for r in rs], out, rs, sampled)
                      for rid, rs in beam_rows.items() if rid in self.requests]
        self.scheduler.fill(step.batch, sampled)
        touched: dict[str, RequestState] = {}
        for req, plan in beam_plans:
            self._apply_beams(req, plan)
            if req.beam_done:
                touched[req.request_id] = req
        for r in firsts:
            seq = rows[r]
            req = self.requests.get(seq.request_id)
            if req is None or seq.is_finished or req.hypotheses is not None:
                continue  # aborted, or ended by the step before (its extra token is dropped)
            self._on_run(req, seq, tokens, out, r, len(sampled[seq.seq_id]), step.positions[r])
            touched[req.request_id] = req
        for r in fork_rows:
            req = self.requests.get(rows[r].request_id)
            if req is not None:
                self._on_run(req, self._fork(req, rows[r], tokens[r]), tokens, out, r, 1, step.positions[r])
        return [self._report(req) for req in touched.values()
                if req.params.output_kind == "cumulative" or req.finished]

    def _fork(self, req: RequestState, sample: ForkSample, token: int) -> Sequence:
        child = self.scheduler.fork(req.seqs[0], next(self.seq_ids))
        child.token_ids[-1] = token
        child.sampling_params = sample.sampling_params
        req.seqs.append(child)
        req.states[child.seq_id] = self._seq_state(len(req.seqs) - 1, req.prompt_token_ids, req.params)
        req.pending_forks -= 1
        return child

    def _on_run(self, req: RequestState, seq: Sequence, tokens: list[int], out, first_row: int, num: int,
                position: int) -> None:
        """Bookkeeping for seq's `num` new tokens (rows first_row.. of `out`, the first at `position` of
        seq), in order, up to the first that ends it: logprobs, text, stop conditions."""
        state = req.states[seq.seq_id]
        params = seq.sampling_params
        req.first_token_time = req.first_token_time or time.monotonic()
        for row in range(first_row, first_row + num):
            token = tokens[row]
            self.generation_tokens += 1
            state.cumulative_logprob += float(out.logprobs[row])
            if state.logprobs is not None:
                state.logprobs.append(self._logprob_entry(out, row, token, params.logprobs))
            num_out = position + 1 - seq.num_prompt_tokens
            reason, stop_reason = None, None
            if token in params.stop_token_ids and num_out >= params.min_tokens:
                reason, stop_reason = "stop", token
            elif token in self.eos_token_ids and not params.ignore_eos and num_out >= params.min_tokens:
                reason = "stop"
            elif state.deferred is not None:
                state.deferred.append(token)
            else:
                emitted, matched = state.stops.feed(state.detok.add_tokens([token]))
                state.text += emitted
                if matched is not None:
                    reason, stop_reason = "stop", matched
            if reason is None and (num_out >= params.max_tokens or position + 1 >= self.max_model_len):
                reason = "length"
            if reason is not None:
                self._finish(seq, state, position, reason, stop_reason)
                return
            position += 1

    def _finish(self, seq: Sequence, state: SeqState, position: int, reason: str, stop_reason) -> None:
        """Ends seq at its token at `position`: the text's tail is flushed, later tokens (the rest of
        the run, a token the next step already took on) are dropped and the pages freed."""
        if state.deferred:
            state.text += state.detok.add_tokens(state.deferred)
            state.deferred = None
        if stop_reason is None or isinstance(stop_reason, int):
            state.text += state.stops.feed(state.detok.flush())[0] + state.stops.flush()
        state.finish_reason, state.stop_reason = reason, stop_reason
        del seq.token_ids[position + 1:]
        self.scheduler.finish(seq, reason)

    def _logprob_entry(self, out, row: int, token: int, k: int) -> dict[int, Logprob]:
        decode = self.tokenizer.decode
        entry = {token: Logprob(float(out.logprobs[row]), int(out.ranks[row]), decode([token]))}
        for rank, (tid, lp) in enumerate(zip(out.top_ids[row][:k], out.top_logprobs[row][:k]), start=1):
            entry.setdefault(int(tid), Logprob(float(lp), rank, decode([int(tid)])))
        return entry

    # -- beam search -----------------------------------------------------------------------------

    def _choose_beams(self, req: RequestState, live: list[Sequence], out, rows: list[int], sampled: dict):
        """This step's beams; each continuing beam's token is set in `sampled` (before the fill)."""
        p = req.params
        eos = set() if p.ignore_eos else self.eos_token_ids | set(p.stop_token_ids)
        cumulative = [req.states[seq.seq_id].cumulative_logprob for seq in live]
        plan = beam_search.plan_step(live, cumulative, out.top_ids[rows], out.top_logprobs[rows], p.beam_width, eos)
        req.hypotheses += plan.finished
        for seq, token, cum in plan.extended:
            sampled[seq.seq_id] = [token]
            req.states[seq.seq_id].cumulative_logprob = cum
        self.generation_tokens += len(plan.extended) + len(plan.forks)
        req.first_token_time = req.first_token_time or time.monotonic()
        return req, plan

    def _apply_beams(self, req: RequestState, plan: beam_search.StepPlan) -> None:
        for seq, token, cumulative in plan.forks:
            child = self.scheduler.fork(seq, next(self.seq_ids))
            child.token_ids[-1] = token
            req.seqs.append(child)
            req.states[child.seq_id] = self._seq_state(len(req.seqs) - 1, req.prompt_token_ids, req.params)
            req.states[child.seq_id].cumulative_logprob = cumulative
        for seq in plan.dropped:
            self.scheduler.finish(seq, "abort")
            req.seqs.remove(seq)
            del req.states[seq.seq_id]
        p, live = req.params, req.seqs
        if not live:
            req.beam_done = True
            return
        length = live[0].num_output_tokens
        best = max(req.states[s.seq_id].cumulative_logprob for s in live)
        at_limit = length >= p.max_tokens or max(s.num_tokens for s in live) >= self.max_model_len
        if at_limit or beam_search.is_done(req.hypotheses, best, length, p.beam_width, p.length_penalty):
            for seq in list(live):
                if at_limit:
                    req.hypotheses.append(beam_search.Hypothesis(
                        list(seq.output_token_ids), req.states[seq.seq_id].cumulative_logprob, "length"))
                self.scheduler.finish(seq, "stop")
            req.beam_done = True

    # -- outputs ---------------------------------------------------------------------------------

    def _report(self, req: RequestState) -> RequestOutput:
        finished = req.finished
        if finished:
            del self.requests[req.request_id]
        if req.hypotheses is not None:
            completions = beam_search.completions(req.hypotheses, req.params, self.tokenizer.decode)
        else:
            completions = [
                CompletionOutput(index=st.index, text=st.text, token_ids=_known_output(seq),
                                 cumulative_logprob=st.cumulative_logprob, logprobs=st.logprobs,
                                 finish_reason=st.finish_reason, stop_reason=st.stop_reason)
                for seq in req.seqs for st in [req.states[seq.seq_id]]]
            if finished and req.params.best_of > req.params.n:
                completions.sort(key=lambda c: c.cumulative_logprob, reverse=True)
                completions = completions[:req.params.n]
                for i, c in enumerate(completions):
                    c.index = i
        return RequestOutput(request_id=req.request_id, prompt=req.prompt,
                             prompt_token_ids=req.prompt_token_ids, outputs=completions, finished=finished,
                             prompt_logprobs=req.prompt_logprobs, arrival_time=req.arrival_time,
                             first_token_time=req.first_token_time)


def _known_output(seq: Sequence) -> list[int]:
    ids = seq.output_token_ids
    while ids and ids[-1] == PLACEHOLDER:
        ids.pop()
    return ids
