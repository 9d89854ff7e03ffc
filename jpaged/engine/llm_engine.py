"""Engine: add_request / step / abort. The loop that ties scheduler, runner, sampling and outputs together.

One `step()`: the scheduler picks sequences under the token budget -> the runner moves pages it was
asked to (swap, copy-on-write), runs the jitted model+sampling step -> the scheduler appends the
sampled tokens -> here: n > 1 forks, incremental detokenization, stop checks, RequestOutputs.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import time

import jax
import numpy as np

from jpaged import sharding
from jpaged.config import EngineConfig
from jpaged.engine import beam_search
from jpaged.engine.detokenizer import IncrementalDetokenizer, StopStringChecker
from jpaged.engine.model_runner import InFlight, ModelRunner, SampleRow, serving_mesh, serving_spec
from jpaged.engine.prompt_logprobs import PromptScorer
from jpaged.engine.scheduler import Scheduler
from jpaged.engine.sequence import PLACEHOLDER, Sequence
from jpaged.outputs import CompletionOutput, Logprob, RequestOutput
from jpaged.sampling_params import SamplingParams
from pallas_kernels import select_backend

CPU_KV_CACHE_BYTES = 1 << 30  # pool size on CPU when num_kv_blocks is not given


@dataclasses.dataclass
class _SeqState:
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
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    states: dict[int, _SeqState]
    pending_forks: int
    arrival_time: float
    first_token_time: float | None = None
    hypotheses: list[beam_search.Hypothesis] | None = None  # beam search: finished hypotheses
    beam_done: bool = False
    prompt_logprobs: list | None = None  # SamplingParams.prompt_logprobs: scored once, at admission

    @property
    def finished(self) -> bool:
        if self.hypotheses is not None:
            return self.beam_done
        return self.pending_forks == 0 and all(st.finish_reason for st in self.states.values())


class Engine:
    def __init__(self, config: EngineConfig, *, model=None, tokenizer=None, devices=None):
        """One replica of the model. `devices`: its tensor-parallel group when tensor_parallel_size > 1
        (default the first tensor_parallel_size devices). data_parallel_size > 1: `data_parallel.make_engine`."""
        if config.data_parallel_size > 1:
            raise ValueError("Engine is one replica; build data_parallel_size > 1 with "
                             "jpaged.engine.data_parallel.make_engine (LLM and jpaged serve do)")
        mesh = serving_mesh(config, devices)
        if model is None:  # under tensor parallelism each weight is read straight into its shards
            from jpaged.loader import load_model
            model, tokenizer = load_model(config.model, dtype=config.dtype, mesh=mesh)
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = config.model
        mcfg = model.config
        self.max_model_len = config.max_model_len or mcfg.max_position_embeddings
        self.eos_token_ids = set(getattr(tokenizer, "eos_token_ids", None) or mcfg.eos_token_ids)
        self.kv_spec = serving_spec(model, config)
        self.backend = select_backend(mesh.devices.flat[0] if mesh is not None else jax.devices()[0], self.kv_spec,
                                      config.backend)
        num_pages = config.num_kv_blocks or self._default_num_pages()
        self.scheduler = Scheduler(config, num_blocks=num_pages, max_model_len=self.max_model_len,
                                   sliding_window=mcfg.sliding_window)
        self.runner = ModelRunner(config, model, spec=self.kv_spec, backend=self.backend, num_pages=num_pages,
                                  max_model_len=self.max_model_len, mesh=mesh)
        self.model = self.runner.model  # the weights being served (sharded under TP): no other copy is kept
        self.runner.eos_token_ids = tuple(self.eos_token_ids)  # the sampler bars them before min_tokens
        self.requests: dict[str, _Request] = {}
        self._seq_ids = itertools.count()
        self._num_steps = 0
        self._inflight: _Launched | None = None  # the launched step not read back yet
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    def _default_num_pages(self) -> int:
        c, page_bytes = self.config, self.kv_spec.bytes_per_page
        device = jax.local_devices()[0]
        stats = device.memory_stats() if device.platform == "gpu" else None
        if stats:
            free = stats["bytes_limit"] - stats["bytes_in_use"]
            budget = int(free * c.kv_cache_memory_fraction)
        else:
            budget = CPU_KV_CACHE_BYTES
        needed = c.max_num_seqs * self.kv_spec.pages_for(self.max_model_len)
        # Every process of a multi-host job takes process 0's figure: the pools must be one shape.
        return int(sharding.broadcast_from_scheduler(np.int32(max(1, min(budget // page_bytes, needed)))))

    # -- requests --------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None, *,
                    priority: int = 0, arrival_time: float | None = None) -> None:
        """Queues a request; ValueError (and no state kept) for one that can never run."""
        params = params or SamplingParams()
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        prompt_text, prompt_ids = self._tokenize(prompt)
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(prompt_ids)
        if max_tokens < 1:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens, which leaves no room to generate "
                             f"within max_model_len={self.max_model_len}")
        if params.max_tokens is None:
            params = dataclasses.replace(params, max_tokens=max_tokens)
        prompt_logprobs = None
        if params.prompt_logprobs is not None:
            prompt_logprobs = self.prompt_scorer.prompt_logprobs(prompt_ids, params.prompt_logprobs,
                                                                 self.tokenizer.decode)
        seq = Sequence(seq_id=next(self._seq_ids), request_id=request_id, token_ids=list(prompt_ids),
                       sampling_params=params, priority=priority)
        self.scheduler.add(seq)
        self.requests[request_id] = _Request(
            request_id=request_id, prompt=prompt_text, prompt_token_ids=list(prompt_ids), params=params,
            seqs=[seq], states={seq.seq_id: self._seq_state(0, prompt_ids, params)},
            pending_forks=0 if params.use_beam_search else params.best_of - 1,
            hypotheses=[] if params.use_beam_search else None, arrival_time=arrival_time or time.monotonic(),
            prompt_logprobs=prompt_logprobs)

    @functools.cached_property
    def prompt_scorer(self) -> PromptScorer:
        """Built (and compiled) on the first request that asks for prompt logprobs."""
        return PromptScorer(self.model, spec=self.kv_spec, backend=self.backend, mesh=self.runner.mesh)

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            return prompt, self.tokenizer.encode(prompt)
        ids = list(prompt)
        vocab = self.model.config.vocab_size
        if not ids:
            raise ValueError("prompt must not be empty")
        if not all(isinstance(t, (int, np.integer)) and 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        return None, [int(t) for t in ids]

    def _seq_state(self, index: int, prompt_ids, params: SamplingParams) -> _SeqState:
        return _SeqState(
            index=index,
            detok=IncrementalDetokenizer(self.tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens),
            stops=StopStringChecker(params.stop),
            deferred=[] if params.output_kind == "final_only" and not params.stop else None,
            logprobs=[] if params.logprobs is not None else None)

    def abort(self, request_id: str) -> None:
        """Frees every page of the request, whatever state it is in; no more outputs for it."""
        if self.requests.pop(request_id, None) is not None:
            self.scheduler.abort(request_id)

    def warmup(self) -> None:
        """Compiles every step shape up front (serving calls it; steady state then never compiles)."""
        self.runner.warmup()

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- the step --------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedules and launches the next step, then reads back the one before it (async scheduling).

        While the device runs step N+1, the host reads step N's tokens and does their bookkeeping
        (stop checks, detokenization, outputs); N+1 takes N's tokens on the device. A step whose
        next step needs its tokens on the host (penalties, n > 1 forks, beam search) is read back
        at once. With `async_scheduling=False` every step is.
        """
        prev, self._inflight = self._inflight, None
        batch = self.scheduler.schedule()
        self.runner.swap_out(batch.swap_out)
        self.runner.swap_in(batch.swap_in)
        self.runner.copy_pages(batch.copy_pages)
        launched = self._launch(batch, prev) if batch.entries else None
        outputs = self._resolve(prev) if prev is not None else []
        if launched is not None:
            if launched.overlappable:
                self._inflight = launched
            else:
                outputs += self._resolve(launched)
        unique = {}  # one output per request: the latest
        for out in outputs:
            unique.pop(out.request_id, None)
            unique[out.request_id] = out
        return list(unique.values())

    def _launch(self, batch, prev: _Launched | None) -> _Launched:
        rows, positions, forks, offset = [], [], [], 0
        for entry in batch.entries:
            offset += entry.num_tokens
            if not entry.sample:
                continue
            rows.append(SampleRow(offset - 1, entry.seq))
            positions.append(entry.start + entry.num_tokens)
            req = self.requests[entry.seq.request_id]
            if req.pending_forks and entry.seq is req.seqs[0]:
                # n > 1: the samples share the prompt's pages; each draws its first token from the same logits.
                for i in range(req.pending_forks):
                    child_params = req.params if req.params.seed is None else dataclasses.replace(
                        req.params, seed=hash((req.params.seed, len(req.seqs) + i)) % (1 << 63))
                    forks.append((req, len(rows)))
                    rows.append(SampleRow(offset - 1, _SampleProxy(entry.seq, child_params)))
                    positions.append(entry.start + entry.num_tokens)
        overlappable = (self.config.async_scheduling and not forks and len(rows) <= self.runner.max_pending_rows
                        and all(_needs_no_history(row.seq.sampling_params) for row in rows))
        handle = self.runner.launch(batch.entries, rows, self._num_steps,
                                    pending=prev.pending if prev is not None else None,
                                    prev=prev.handle if prev is not None else None)
        self._num_steps += 1
        self.scheduler.advance(batch)
        pending = {row.seq.seq_id: (pos, r) for r, (row, pos) in enumerate(zip(rows, positions))}
        return _Launched(batch, rows, positions, forks, handle, overlappable, pending)

    def _resolve(self, launched: _Launched) -> list[RequestOutput]:
        """Reads a launched step's samples back (waiting for it) and does their bookkeeping."""
        batch, rows = launched.batch, launched.rows
        out = self.runner.fetch(launched.handle)
        sampled = {row.seq.seq_id: int(out.tokens[r]) for r, row in enumerate(rows)
                   if not isinstance(row.seq, _SampleProxy)}
        beam_rows: dict[str, list[int]] = {}
        for r, row in enumerate(rows):
            req = self.requests.get(row.seq.request_id)
            if req is not None and req.hypotheses is not None:
                beam_rows.setdefault(row.seq.request_id, []).append(r)
        beam_actions = [self._select_beams(self.requests[rid], [rows[r].seq for r in rs], out, rs, sampled)
                        for rid, rs in beam_rows.items()]
        self.scheduler.fill(batch, sampled)
        self.prompt_tokens_total += sum(max(0, min(e.start + e.num_tokens, e.seq.num_prompt_tokens) - e.start)
                                        for e in batch.entries)
        touched: dict[str, _Request] = {}
        for req, forks_, drops in beam_actions:
            self._apply_beams(req, forks_, drops)
            if req.beam_done:
                touched[req.request_id] = req
        for r, row in enumerate(rows):
            if isinstance(row.seq, _SampleProxy) or row.seq.request_id in beam_rows:
                continue
            req = self.requests.get(row.seq.request_id)
            if req is None or row.seq.is_finished:
                continue  # aborted, or ended by the step before (its extra token is dropped)
            self._on_token(req, row.seq, out, r, launched.positions[r])
            touched[req.request_id] = req
        for req, r in launched.forks:
            if req.request_id not in self.requests:
                continue
            child = self.scheduler.fork(req.seqs[0], next(self._seq_ids))
            child.token_ids[-1] = int(out.tokens[r])
            child.sampling_params = rows[r].seq.sampling_params
            req.seqs.append(child)
            req.states[child.seq_id] = self._seq_state(len(req.seqs) - 1, req.prompt_token_ids, req.params)
            req.pending_forks -= 1
            self._on_token(req, child, out, r, launched.positions[r])
        return [self._finish_or_report(req) for req in touched.values()
                if req.params.output_kind == "cumulative" or req.finished]

    def _on_token(self, req: _Request, seq: Sequence, out, row: int, position: int) -> None:
        """Bookkeeping for one sampled token (at `position` of seq): logprobs, text, stop conditions."""
        state = req.states[seq.seq_id]
        token = int(out.tokens[row])
        params = seq.sampling_params
        self.generation_tokens_total += 1
        req.first_token_time = req.first_token_time or time.monotonic()
        state.cumulative_logprob += float(out.logprobs[row])
        if state.logprobs is not None:
            state.logprobs.append(self._logprob_entry(out, row, token, params.logprobs))
        reason, stop_reason = None, None
        num_out = position + 1 - seq.num_prompt_tokens
        if token in params.stop_token_ids and num_out >= params.min_tokens:
            reason, stop_reason = "stop", token
        elif token in self.eos_token_ids and not params.ignore_eos and num_out >= params.min_tokens:
            reason = "stop"
        if reason is None:
            if state.deferred is not None:
                state.deferred.append(token)
            else:
                emitted, matched = state.stops.feed(state.detok.add_tokens([token]))
                state.text += emitted
                if matched is not None:
                    reason, stop_reason = "stop", matched
        if reason is None and (num_out >= params.max_tokens or position + 1 >= self.max_model_len):
            reason = "length"
        if reason is not None:
            if state.deferred:
                state.text += state.detok.add_tokens(state.deferred)
                state.deferred = None
            if stop_reason is None or isinstance(stop_reason, int):
                state.text += state.stops.feed(state.detok.flush())[0] + state.stops.flush()
            state.finish_reason, state.stop_reason = reason, stop_reason
            del seq.token_ids[position + 1:]  # a token the next step already took on is dropped
            self.scheduler.finish(seq, reason)

    def _select_beams(self, req: _Request, live: list[Sequence], out, rows: list[int], sampled: dict):
        """Chooses this step's beams; sets each continuing beam's token in `sampled` (before postprocess).

        Returns (req, forks: [(beam seq, token, cumulative)], drops: [seq]) to apply after postprocess.
        """
        p = req.params
        eos = set() if p.ignore_eos else self.eos_token_ids | set(p.stop_token_ids)
        offers = [(req.states[seq.seq_id].cumulative_logprob, out.top_ids[r], out.top_logprobs[r])
                  for seq, r in zip(live, rows)]
        continuing, finished = beam_search.select(offers, p.beam_width, eos)
        for cand in finished:
            seq = live[cand.beam]
            req.hypotheses.append(beam_search.Hypothesis(
                list(seq.output_token_ids) + [cand.token], cand.cumulative_logprob, "stop"))
        forks, used = [], set()
        for cand in continuing:
            seq = live[cand.beam]
            if cand.beam in used:
                forks.append((seq, cand.token, cand.cumulative_logprob))
            else:
                used.add(cand.beam)
                sampled[seq.seq_id] = cand.token
                req.states[seq.seq_id].cumulative_logprob = cand.cumulative_logprob
        drops = [seq for b, seq in enumerate(live) if b not in used]
        self.generation_tokens_total += len(continuing)
        req.first_token_time = req.first_token_time or time.monotonic()
        return req, forks, drops

    def _apply_beams(self, req: _Request, forks, drops) -> None:
        for seq, token, cumulative in forks:
            child = self.scheduler.fork(seq, next(self._seq_ids))
            child.token_ids[-1] = token
            req.seqs.append(child)
            req.states[child.seq_id] = self._seq_state(len(req.seqs) - 1, req.prompt_token_ids, req.params)
            req.states[child.seq_id].cumulative_logprob = cumulative
        for seq in drops:
            self.scheduler.finish(seq, "abort")
            req.seqs.remove(seq)
            del req.states[seq.seq_id]
        p = req.params
        live = req.seqs
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

    def _beam_outputs(self, req: _Request) -> list[CompletionOutput]:
        p = req.params
        best = sorted(req.hypotheses, reverse=True,
                      key=lambda h: beam_search.score(h.cumulative_logprob, len(h.token_ids), p.length_penalty))
        return [CompletionOutput(index=i, text=self.tokenizer.decode(h.token_ids, skip_special_tokens=p.skip_special_tokens),
                                 token_ids=h.token_ids, cumulative_logprob=h.cumulative_logprob,
                                 finish_reason=h.finish_reason)
                for i, h in enumerate(best[:p.n])]

    def _logprob_entry(self, out, row: int, token: int, k: int) -> dict[int, Logprob]:
        decode = self.tokenizer.decode
        entry = {token: Logprob(float(out.logprobs[row]), int(out.ranks[row]), decode([token]))}
        for rank, (tid, lp) in enumerate(zip(out.top_ids[row][:k], out.top_logprobs[row][:k]), start=1):
            entry.setdefault(int(tid), Logprob(float(lp), rank, decode([int(tid)])))
        return entry

    def _finish_or_report(self, req: _Request) -> RequestOutput:
        finished = req.finished
        if finished:
            del self.requests[req.request_id]
        if req.hypotheses is not None:
            return RequestOutput(request_id=req.request_id, prompt=req.prompt,
                                 prompt_token_ids=req.prompt_token_ids, outputs=self._beam_outputs(req),
                                 finished=finished, prompt_logprobs=req.prompt_logprobs,
                                 arrival_time=req.arrival_time, first_token_time=req.first_token_time)
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

    # -- introspection ---------------------------------------------------------------------------

    def stats(self) -> dict:
        s = self.scheduler
        return dict(num_running=s.num_running, num_waiting=s.num_waiting, num_free_pages=s.num_free_pages,
                    num_used_pages=s.num_used_pages, num_total_pages=self.runner.num_pages,
                    prefix_cache_queries=s.prefix_cache_queries, prefix_cache_hits=s.prefix_cache_hits,
                    num_preemptions=s.num_preemptions, prompt_tokens=self.prompt_tokens_total,
                    generation_tokens=self.generation_tokens_total, num_steps=self._num_steps,
                    num_compilations=self.runner.num_compilations)


@dataclasses.dataclass
class _Launched:
    """A step on the device: what it computes, who it samples for, and where those tokens go."""

    batch: object  # ScheduledBatch
    rows: list[SampleRow]
    positions: list[int]  # per row: the position its token takes in its sequence
    forks: list  # (request, row) of n > 1 samples to fork once read back
    handle: InFlight
    overlappable: bool  # the next step may be scheduled before this one is read back
    pending: dict[int, tuple[int, int]]  # seq_id -> (position, row): tokens the next step takes on device


def _needs_no_history(params: SamplingParams) -> bool:
    """Sampling that does not read the token history on the host (penalties do, beam search does)."""
    return not (params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0
                or params.use_beam_search)


def _known_output(seq: Sequence) -> list[int]:
    ids = seq.output_token_ids
    while ids and ids[-1] == PLACEHOLDER:
        ids.pop()
    return ids


@dataclasses.dataclass
class _SampleProxy:
    """A not-yet-forked sample of a request: the parent's history with the child's own params."""

    parent: Sequence
    sampling_params: SamplingParams

    def __getattr__(self, name):
        return getattr(self.parent, name)
