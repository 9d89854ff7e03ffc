"""Scheduler: who runs this step, how many of their tokens, and what pages must move first.

Where it sits: `Engine.step()` calls `schedule()` -> the runner performs the batch's page moves in the
order swap_out, swap_in, copy_pages, then runs the step over `entries` -> `postprocess(batch, sampled)`
records progress -> the output processor checks stop conditions and calls `finish(seq, reason)`.

One step under `max_num_batched_tokens` tokens, `max_num_seqs` sequences and `max_num_prefill_seqs`
sequences with more than one new token (a chunk of more would wait for the next step):
1. running sequences, decodes (one token left) first, then prefill chunks of admitted prompts;
   a chunk is cut to the remaining budget (chunked prefill), so decodes never wait for a long prompt;
2. swapped sequences, swapped back in when their pages fit;
3. waiting sequences (new, or preempted by recompute), admitted with their prefix-cache hits.
   With a host tier, hits past the device cache's chain are fetched from host pages: the sequence
   holds fresh device pages and waits (FETCHING) until `fetch_arrived(seq_id)` says the copy landed;
   the schedule that sees it lists the seq_id in `fetch_commit` and runs it.
Order within each queue: arrival (FCFS), or (priority, arrival) with scheduling_policy="priority".
A sequence that cannot get its pages preempts the most recently admitted running sequence not yet
in this batch (under "priority": the lowest priority one first), or itself when there is none.
Preemption by recompute frees the pages and sends the sequence back to waiting (it keeps its tokens
and is prefilled again); by swap, its pages are copied to host pages (when the host pool has room,
else recompute) and it is swapped back in before it runs again. Swap-ins and admissions never preempt,
and the head of a queue that does not fit blocks the ones behind it (no starvation of long prompts);
under "priority", a waiting sequence whose pages do not fit first preempts (by recompute) running
sequences of lower priority, the lowest first (vLLM's priority policy).
Without chunked prefill a prompt waits for a step with room for all of it; a recompute longer than
the whole budget is chunked anyway (it could never run otherwise).
Counters: num_preemptions; prefix_cache_queries / prefix_cache_hits count tokens at each admission.
A sequence whose prompt logprobs are pending (`seq.scores_pending`) is admitted without prefix-cache
hits and its chunks score at most `max_scored_prompt_tokens` positions per step, shared by all such
sequences of the step (jpaged/engine/prompt_logprobs.py).

API:
  Scheduler(config, num_blocks, max_model_len, sliding_window=None)
  add(seq); schedule(proposals=None) -> ScheduledBatch (proposals: speculative tokens by seq_id)
  postprocess(batch, sampled: {seq_id: [token, ...]})
    (= advance(batch) when the step is launched + fill(batch, sampled) when its output is read: with
    async scheduling the next schedule() runs in between, each token to sample a PLACEHOLDER)
  finish(seq, reason); abort(request_id) -> [Sequence]; fork(parent, child_seq_id) -> Sequence
  has_unfinished(); running, waiting, swapped, fetching (lists); num_running, num_waiting, num_swapped
  fetch_arrived (seq_id -> bool: the engine sets it to its runner's check)
  num_preemptions, prefix_cache_queries, prefix_cache_hits (tokens), num_free_pages, num_used_pages
  check_invariants(batch=None)
"""
from __future__ import annotations

import dataclasses
import itertools

from jpaged.config import EngineConfig
from jpaged.engine.block_manager import BlockManager, FetchOrder
from jpaged.engine.kv_tiers import PageTiers
from jpaged.engine.sequence import PLACEHOLDER, Sequence, SequenceStatus


@dataclasses.dataclass
class ScheduledSeq:
    """Compute seq.token_ids[start:start + num_tokens] at positions start..; then append `num_samples`
    sampled tokens (0: a prompt chunk short of the prompt's end; 1: a decode or a prompt's last chunk;
    more: a multi-token step, whose run of tokens may end early). `num_proposed` > 0: the last
    `num_proposed` computed tokens are speculative proposals (jpaged/engine/spec_decode/), sampled
    against at every position; the run read back keeps the accepted ones and the KV of the rest is
    rolled back."""

    seq: Sequence
    start: int
    num_tokens: int
    num_samples: int
    num_proposed: int = 0


@dataclasses.dataclass
class ScheduledBatch:
    entries: list[ScheduledSeq] = dataclasses.field(default_factory=list)  # decodes first, then prefills
    copy_pages: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # device src -> dst
    swap_out: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # device -> host
    swap_in: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # host -> device
    preempted: list[Sequence] = dataclasses.field(default_factory=list)
    # Host tier, in the runner's order: start the offloads (device -> host reads of evicted cached pages)
    # before any write; start the fetches; write the landed fetches of `fetch_commit` (seq_ids) into
    # their device pages; forget the fetches of `fetch_cancel` (aborted while fetching).
    offload: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # device -> host
    fetch: list[FetchOrder] = dataclasses.field(default_factory=list)
    fetch_commit: list[int] = dataclasses.field(default_factory=list)
    fetch_cancel: list[int] = dataclasses.field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(e.num_tokens for e in self.entries)


class Scheduler:
    def __init__(self, config: EngineConfig, num_blocks: int, max_model_len: int, sliding_window: int | None = None,
                 *, num_host_pages: int | None = None, tiers: PageTiers | None = None):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {max_model_len}")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
        self.config = config
        self.page_size = config.block_size
        self.max_model_len = max_model_len
        self.sliding_window = sliding_window
        self.block_manager = BlockManager(
            num_blocks, config.block_size,
            num_host_pages=config.num_host_kv_blocks if num_host_pages is None else num_host_pages,
            enable_prefix_caching=config.enable_prefix_caching, sliding_window=sliding_window, tiers=tiers)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []  # in admission order
        self.swapped: list[Sequence] = []
        self.fetching: list[Sequence] = []  # FETCHING: admitted, waiting for host pages to land
        self.fetch_arrived = lambda seq_id: True  # the engine asks its runner
        self._cancelled_fetches: list[int] = []
        self._seq_ids: set[int] = set()
        self._admitted_at: dict[int, int] = {}  # seq_id -> admission counter, for victim choice
        self._admissions = itertools.count()
        self.num_preemptions = 0
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # -- counts ----------------------------------------------------------------------------------

    num_running = property(lambda self: len(self.running))
    num_waiting = property(lambda self: len(self.waiting))
    num_swapped = property(lambda self: len(self.swapped))
    num_free_pages = property(lambda self: self.block_manager.num_free_pages)
    num_used_pages = property(lambda self: self.block_manager.num_used_pages)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped or self.fetching)

    # -- admission -------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queues a new sequence; ValueError (nothing kept) when it could never run."""
        if seq.seq_id in self._seq_ids:
            raise ValueError(f"seq_id {seq.seq_id} is already scheduled")
        if seq.status is not SequenceStatus.WAITING or seq.block_table or seq.num_computed_tokens:
            raise ValueError(f"seq must be a new WAITING sequence without pages, got status {seq.status.name}")
        self._check_fits(seq)
        self._seq_ids.add(seq.seq_id)
        self.waiting.append(seq)

    def _check_fits(self, seq: Sequence) -> None:
        n_prompt, max_tokens = seq.num_tokens, seq.sampling_params.max_tokens
        total = n_prompt + (max_tokens if max_tokens is not None else 1)
        if total > self.max_model_len:
            raise ValueError(
                f"request {seq.request_id!r}: prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) = {total} "
                f"exceeds max_model_len ({self.max_model_len}); shorten the prompt or lower max_tokens")
        budget = self.config.max_num_batched_tokens
        if not self.config.enable_chunked_prefill and n_prompt > budget:
            raise ValueError(
                f"request {seq.request_id!r}: prompt ({n_prompt} tokens) exceeds max_num_batched_tokens ({budget}) "
                f"with chunked prefill disabled; enable chunked prefill or raise max_num_batched_tokens")
        needed = self._peak_pages(total)
        if needed > self.block_manager.num_pages:
            raise ValueError(
                f"request {seq.request_id!r}: needs {needed} KV pages of {self.page_size} tokens, more than the "
                f"whole pool ({self.block_manager.num_pages}); shorten the request or add KV pages")

    def _peak_pages(self, total: int) -> int:
        """The most pages one sequence of `total` tokens can hold at once (the last token is never written)."""
        pages = -(-(total - 1) // self.page_size)
        if self.sliding_window is None:
            return pages
        # With a window: the window's pages plus those of one step's tokens (at most a whole budget).
        step_tokens = self.config.max_num_batched_tokens
        return min(pages, -(-(self.sliding_window + step_tokens) // self.page_size) + 1)

    # -- one step --------------------------------------------------------------------------------

    def schedule(self, proposals: dict[int, list[int]] | None = None) -> ScheduledBatch:
        """The next step. `proposals` (seq_id -> speculative tokens) are verified as part of those
        decodes when budget, prefill-chunk cap and pages allow; otherwise the decode runs plain."""
        batch = ScheduledBatch()
        self._proposals = proposals or {}
        self._budget = self.config.max_num_batched_tokens
        self._num_prefills = 0  # entries with more than one token
        self._score_budget = self.config.max_scored_prompt_tokens  # prompt positions left to score this step
        self._in_batch: set[int] = set()
        self._adapters: set[int] = set()  # LoRA adapters of this step's entries, at most max_loras
        self.block_manager.begin_step()
        batch.fetch_cancel, self._cancelled_fetches = self._cancelled_fetches, []
        for seq_id in batch.fetch_cancel:
            self.block_manager.fetch_done(seq_id)
        self._commit_fetches(batch)
        if self.config.scheduling_policy == "priority":
            self._preempt_for_priority(batch)
        running = [s for s in self.running if not self._ends_with_pending(s)]
        decodes = [s for s in running if s.num_tokens - s.num_computed_tokens == 1]
        prefills = [s for s in running if s.num_tokens - s.num_computed_tokens > 1]
        for seq in decodes + prefills:
            if seq.status is SequenceStatus.RUNNING and not self._batch_full(batch):
                self._schedule_running(seq, batch)
        self._resume_swapped(batch)
        self._admit_waiting(batch)
        batch.entries.sort(key=lambda e: e.seq.num_tokens - e.start != 1)  # stable: decodes first
        batch.offload = self.block_manager.take_offloads()
        return batch

    def _commit_fetches(self, batch: ScheduledBatch) -> None:
        """Fetching sequences whose pages landed run from this step on (never preempted before it:
        their pages are written by this step's commit)."""
        for seq in [s for s in self.fetching if self.fetch_arrived(s.seq_id)]:
            self.fetching.remove(seq)
            self.block_manager.fetch_done(seq.seq_id)
            batch.fetch_commit.append(seq.seq_id)
            self.block_manager.register_full_pages(seq)
            self.block_manager.release_outside_window(seq)
            self._start_running(seq)
            self._in_batch.add(seq.seq_id)

    def _ends_with_pending(self, seq: Sequence) -> bool:
        """Its not-yet-read token is its last (max_tokens or max_model_len): nothing more to compute."""
        if not seq.has_pending_token:
            return False
        max_tokens = seq.sampling_params.max_tokens
        return seq.num_tokens >= self.max_model_len or (max_tokens is not None and seq.num_output_tokens >= max_tokens)

    def _batch_full(self, batch: ScheduledBatch) -> bool:
        return self._budget == 0 or len(batch.entries) >= self.config.max_num_seqs

    def _chunk(self, seq: Sequence, start: int) -> int:
        """Tokens of seq to compute this step from `start` (0: wait for a step with more budget, or with
        room for one more prefill chunk, or with scoring rows left)."""
        n = self._budget_chunk(seq, start)
        if n and seq.scores_pending and min(start + n, seq.num_prompt_tokens - 1) - start > self._score_budget:
            n = self._score_budget  # positions start.. up to the prompt's last are scored
        return n

    def _budget_chunk(self, seq: Sequence, start: int) -> int:
        remaining = seq.num_tokens - start
        if (seq.adapter_id and seq.adapter_id not in self._adapters
                and len(self._adapters) >= self.config.max_loras):
            return 0  # the step's LoRA slots are taken by other adapters
        cap = self.config.max_num_prefill_seqs
        if remaining > 1 and self._budget > 1 and cap is not None and self._num_prefills >= cap:
            return 0
        if remaining <= self._budget:
            return remaining
        # Without chunked prefill a prompt waits for a whole budget; a recompute longer than any
        # budget (prompt + outputs after preemption) is chunked anyway, or it could never run.
        if self.config.enable_chunked_prefill or remaining > self.config.max_num_batched_tokens:
            return self._budget
        return 0

    def _add_entry(self, seq: Sequence, n: int, batch: ScheduledBatch) -> None:
        start = seq.num_computed_tokens
        batch.copy_pages += self.block_manager.grow(seq, start + n)
        batch.entries.append(ScheduledSeq(seq, start, n, num_samples=int(start + n == seq.num_tokens)))
        self._budget -= n
        self._num_prefills += n > 1
        if seq.scores_pending:
            self._score_budget -= max(0, min(start + n, seq.num_prompt_tokens - 1) - start)
        self._in_batch.add(seq.seq_id)
        if seq.adapter_id:
            self._adapters.add(seq.adapter_id)

    def _schedule_running(self, seq: Sequence, batch: ScheduledBatch) -> None:
        proposal = self._proposals.get(seq.seq_id)
        if proposal and seq.num_tokens - seq.num_computed_tokens == 1 and self._schedule_proposal(seq, proposal, batch):
            return
        n = self._chunk(seq, seq.num_computed_tokens)
        if n == 0:
            return
        end = seq.num_computed_tokens + n
        while self.block_manager.pages_to_grow(seq, end) > self.block_manager.num_free_pages:
            victim = self._pick_victim(exclude=seq)
            self._preempt(victim or seq, batch)
            if victim is None:
                return
        self._add_entry(seq, n, batch)

    def _schedule_proposal(self, seq: Sequence, proposal: list[int], batch: ScheduledBatch) -> bool:
        """Schedules a decode with the proposals that fit (never preempting for them); False: none fit."""
        cap = self.config.max_num_prefill_seqs
        if cap is not None and self._num_prefills >= cap:
            return False
        max_tokens = seq.sampling_params.max_tokens
        room = self.max_model_len - seq.num_tokens - 1  # the run's last token must fit max_model_len
        if max_tokens is not None:
            room = min(room, max_tokens - seq.num_output_tokens - 1)
        k = min(len(proposal), self._budget - 1, room)
        start = seq.num_computed_tokens
        if k < 1 or self.block_manager.pages_to_grow(seq, start + 1 + k) > self.block_manager.num_free_pages:
            return False
        seq.token_ids.extend(proposal[:k])
        batch.copy_pages += self.block_manager.grow(seq, start + 1 + k)
        batch.entries.append(ScheduledSeq(seq, start, 1 + k, num_samples=k + 1, num_proposed=k))
        self._budget -= 1 + k
        self._num_prefills += 1
        self._in_batch.add(seq.seq_id)
        return True

    def _resume_swapped(self, batch: ScheduledBatch) -> None:
        bm = self.block_manager
        while self.swapped and not self._batch_full(batch) and len(self.running) < self.config.max_num_seqs:
            seq = min(self.swapped, key=self._order)
            n = self._chunk(seq, seq.num_computed_tokens)
            num_pages = -(-(seq.num_computed_tokens + n) // self.page_size)
            if n == 0 or bm.pages_to_swap_in(seq) + max(0, num_pages - len(seq.host_block_table)) > bm.num_free_pages:
                return
            self.swapped.remove(seq)
            batch.swap_in += bm.swap_in(seq)
            self._start_running(seq)
            self._add_entry(seq, n, batch)

    def _admit_waiting(self, batch: ScheduledBatch) -> None:
        bm = self.block_manager
        while (self.waiting and not self.swapped and not self._batch_full(batch)
               and len(self.running) + len(self.fetching) < self.config.max_num_seqs):
            candidates = [s for s in self.waiting if not self._ends_with_pending(s)]
            if not candidates:
                return
            seq = min(candidates, key=self._order)
            cached = [] if seq.scores_pending else bm.cached_prefix(seq)
            hosted = bm.host_prefix(seq, len(cached)) if bm.has_host_tier and not seq.scores_pending else []
            prefix = (len(cached) + len(hosted)) * self.page_size
            n = self._chunk(seq, prefix)
            if n == 0 or bm.pages_to_admit(seq, cached, prefix + n) > bm.num_free_pages:
                return
            self.waiting.remove(seq)
            bm.admit(seq, cached)
            if bm.prefix_cache is not None:
                self.prefix_cache_queries += seq.num_tokens
                self.prefix_cache_hits += seq.num_computed_tokens
            if hosted:
                batch.fetch.append(bm.fetch(seq, hosted))
                seq.status = SequenceStatus.FETCHING
                self.fetching.append(seq)
                continue
            self._start_running(seq)
            self._add_entry(seq, n, batch)

    def _order(self, seq: Sequence) -> tuple:
        arrival = (seq.arrival_time, seq.seq_id)
        return (seq.priority, *arrival) if self.config.scheduling_policy == "priority" else arrival

    def _start_running(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        self._admitted_at[seq.seq_id] = next(self._admissions)

    # -- preemption ------------------------------------------------------------------------------

    def _pick_victim(self, exclude: Sequence) -> Sequence | None:
        candidates = [s for s in self.running if s is not exclude and s.seq_id not in self._in_batch]
        if not candidates:
            return None
        by_priority = self.config.scheduling_policy == "priority"
        return max(candidates, key=lambda s: (s.priority if by_priority else 0, self._admitted_at[s.seq_id]))

    def _preempt_for_priority(self, batch: ScheduledBatch) -> None:
        """Frees pages for the first waiting sequence by preempting running ones of lower priority."""
        bm = self.block_manager
        candidates = [s for s in self.waiting if not self._ends_with_pending(s)]
        if not candidates:
            return
        seq = min(candidates, key=self._order)
        cached = bm.cached_prefix(seq)
        n = self._chunk(seq, len(cached) * self.page_size)
        while n and bm.pages_to_admit(seq, cached, len(cached) * self.page_size + n) > bm.num_free_pages:
            lower = [s for s in self.running if s.priority > seq.priority]
            if not lower:
                return
            self._preempt(max(lower, key=lambda s: (s.priority, self._admitted_at[s.seq_id])), batch, recompute=True)
            cached = bm.cached_prefix(seq)

    def _preempt(self, seq: Sequence, batch: ScheduledBatch, recompute: bool = False) -> None:
        self.running.remove(seq)
        if not recompute and self.config.preemption_mode == "swap" and self.block_manager.can_swap_out(seq):
            batch.swap_out += self.block_manager.swap_out(seq)
            seq.status = SequenceStatus.SWAPPED
            self.swapped.append(seq)
        else:
            self.block_manager.release(seq)
            seq.num_computed_tokens = 0
            seq.status = SequenceStatus.WAITING
            self.waiting.append(seq)
        self.num_preemptions += 1
        batch.preempted.append(seq)

    # -- after the step --------------------------------------------------------------------------

    def postprocess(self, batch: ScheduledBatch, sampled: dict[int, list[int]]) -> None:
        """Records the step: progress, sampled tokens (by seq_id), prefix-cache pages, window release.

        Ending a sequence (EOS, stop, max_tokens, max_model_len) is the output processor's call:
        finish(seq, reason).
        """
        self.advance(batch)
        self.fill(batch, sampled)

    def advance(self, batch: ScheduledBatch) -> None:
        """The step is launched: its tokens count as computed, each entry gets `num_samples`
        PLACEHOLDER tokens, full pages of known tokens go to the prefix cache, and pages wholly
        outside the window are released."""
        for entry in batch.entries:
            seq = entry.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue  # finished or aborted since schedule()
            assert seq.num_computed_tokens == entry.start, (seq.seq_id, seq.num_computed_tokens, entry.start)
            seq.num_computed_tokens = entry.start + entry.num_tokens
            if entry.num_proposed:  # one placeholder after the proposals, which are not known tokens
                seq.token_ids.append(PLACEHOLDER)
                self._register_full_pages(seq, entry.start + 1)
            else:
                seq.token_ids.extend([PLACEHOLDER] * entry.num_samples)
                self._register_full_pages(seq)
            self.block_manager.release_outside_window(seq)

    def fill(self, batch: ScheduledBatch, sampled: dict[int, list[int]]) -> None:
        """The step's output is read: the run of 1..num_samples tokens sampled for each entry takes
        its PLACEHOLDERs' places (a shorter run drops the rest, which were never computed), and full
        computed pages that held one go to the prefix cache."""
        for entry in batch.entries:
            seq = entry.seq
            if seq.status is SequenceStatus.FINISHED:
                continue
            if entry.num_proposed:
                self._fill_verified(seq, entry, sampled.get(seq.seq_id))
            elif entry.num_samples:
                run = sampled.get(seq.seq_id)
                position = entry.start + entry.num_tokens
                if run is not None and len(run) == 1 == entry.num_samples and seq.token_ids[position] == PLACEHOLDER:
                    seq.token_ids[position] = run[0]
                else:  # a multi-token run, or a bad one
                    self._fill_run(seq, entry, run)
            if seq.status is SequenceStatus.RUNNING:
                self._register_full_pages(seq)

    def _fill_run(self, seq: Sequence, entry: ScheduledSeq, run: list[int] | None) -> None:
        if not run or len(run) > entry.num_samples:
            raise ValueError(f"sampled must hold 1 to {entry.num_samples} tokens for seq_id {seq.seq_id}, "
                             f"got {run!r}")
        position = entry.start + entry.num_tokens
        end = position + entry.num_samples
        assert seq.token_ids[position] == PLACEHOLDER, (seq.seq_id, position)
        if len(run) < entry.num_samples and end != seq.num_tokens:
            raise ValueError(f"seq_id {seq.seq_id}: a run shorter than its {entry.num_samples} samples "
                             "must be read back before the next step is launched")
        seq.token_ids[position:position + len(run)] = run
        del seq.token_ids[position + len(run):end]

    def _fill_verified(self, seq: Sequence, entry: ScheduledSeq, run: list[int] | None) -> None:
        """Rollback after verification: the run (accepted proposals + one more token) replaces the
        proposals and the placeholder; the KV of rejected proposals is discarded, the pages past the
        computed tokens go back to the pool."""
        first = entry.start + 1  # the first proposal's position
        end = entry.start + entry.num_tokens + 1  # past the placeholder
        if not run or len(run) > entry.num_samples or run[:-1] != seq.token_ids[first:first + len(run) - 1]:
            raise ValueError(f"seq_id {seq.seq_id}: a verified run must be 1 to {entry.num_samples} tokens, "
                             f"all but the last its accepted proposals, got {run!r}")
        assert seq.token_ids[end - 1] == PLACEHOLDER and seq.num_tokens == end, (seq.seq_id, end)
        seq.token_ids[first:end] = run
        seq.num_computed_tokens = first + len(run) - 1
        self.block_manager.truncate(seq, seq.num_computed_tokens)

    def _register_full_pages(self, seq: Sequence, num_known: int | None = None) -> None:
        """Offers seq's full pages of known tokens to the prefix cache (the check first: most steps fill no page)."""
        if seq.num_computed_tokens // self.page_size > seq.num_registered_pages:
            self.block_manager.register_full_pages(seq, _num_known_tokens(seq) if num_known is None else num_known)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends seq (no-op if it already ended) and frees all its pages."""
        if seq.status is SequenceStatus.FINISHED:
            return
        queue = {SequenceStatus.WAITING: self.waiting, SequenceStatus.RUNNING: self.running,
                 SequenceStatus.SWAPPED: self.swapped, SequenceStatus.FETCHING: self.fetching}[seq.status]
        if seq not in queue:
            raise ValueError(f"seq {seq.seq_id} was never added to this scheduler")
        if seq.status is SequenceStatus.FETCHING:
            # The runner may still be reading its host pages: they stay pinned until the next schedule
            # tells it to forget the fetch (fetch_done there).
            self._cancelled_fetches.append(seq.seq_id)
        queue.remove(seq)
        self.block_manager.release(seq)
        self._seq_ids.discard(seq.seq_id)
        self._admitted_at.pop(seq.seq_id, None)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def abort(self, request_id: str) -> list[Sequence]:
        """Finishes every sequence of the request with reason "abort", whatever its state."""
        seqs = [s for s in self.waiting + self.running + self.swapped + self.fetching if s.request_id == request_id]
        for seq in seqs:
            self.finish(seq, "abort")
        return seqs

    def fork(self, parent: Sequence, child_seq_id: int) -> Sequence:
        """A copy of parent (tokens, params) that shares all its device pages (copy-on-write).

        A RUNNING parent's child runs at once; otherwise (waiting, swapped or finished parent) the
        child waits and is prefilled like a new sequence, reusing cached prefix pages.
        """
        if child_seq_id in self._seq_ids:
            raise ValueError(f"child_seq_id {child_seq_id} is already scheduled")
        child = parent.clone(child_seq_id)
        self._seq_ids.add(child_seq_id)
        if parent.status is SequenceStatus.RUNNING:
            self.block_manager.fork(parent, child)
            self._start_running(child)
        else:
            self.waiting.append(child)
        return child

    # -- checks ----------------------------------------------------------------------------------

    def check_invariants(self, batch: ScheduledBatch | None = None) -> None:
        """Asserts the block manager's invariants and, given a batch, that no two entries write one slot."""
        for queue, status in ((self.waiting, SequenceStatus.WAITING), (self.running, SequenceStatus.RUNNING),
                              (self.swapped, SequenceStatus.SWAPPED), (self.fetching, SequenceStatus.FETCHING)):
            assert all(s.status is status for s in queue), status
        assert all(not s.block_table and not s.host_block_table and s.num_computed_tokens == 0
                   for s in self.waiting), "a waiting sequence holds pages"
        assert all(not s.block_table for s in self.swapped), "a swapped sequence holds device pages"
        self.block_manager.check_invariants(self.running + self.swapped + self.fetching)
        if batch is not None:
            self._check_batch(batch)

    def _check_batch(self, batch: ScheduledBatch) -> None:
        assert batch.num_tokens <= self.config.max_num_batched_tokens, batch.num_tokens
        assert len(batch.entries) <= self.config.max_num_seqs
        cap = self.config.max_num_prefill_seqs
        assert cap is None or sum(e.num_tokens > 1 for e in batch.entries) <= cap, "too many prefill chunks"
        slots = set()
        for e in batch.entries:
            ps, table = self.page_size, e.seq.block_table
            for pos in range(e.start, e.start + e.num_tokens):
                page = table[pos // ps]
                assert page >= 0 and self.block_manager.ref_count(page) == 1, (e.seq.seq_id, pos, page)
                assert (page, pos % ps) not in slots, f"two entries write page {page} slot {pos % ps}"
                slots.add((page, pos % ps))


def _num_known_tokens(seq: Sequence) -> int:
    """Tokens before the first PLACEHOLDER (placeholders only ever trail)."""
    known = seq.num_tokens
    while known and seq.token_ids[known - 1] == PLACEHOLDER:
        known -= 1
    return known
