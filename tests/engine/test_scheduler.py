"""Scheduler: token budget, chunked prefill, decodes first, admission errors, preemption, priority, windows.

`FakeModel` plays the runner: it performs each batch's page moves on `KVContents`, writes every entry's
(token, position) into its slots, checks that every query reads back its own sequence's tokens, and
samples a token that depends only on the sequence (so outputs do not depend on how steps were batched).
"""
import hypothesis.strategies as st
import pytest
from hypothesis import event, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from jpaged.config import EngineConfig
from jpaged.engine.scheduler import ScheduledBatch, Scheduler
from jpaged.engine.sequence import Sequence, SequenceStatus
from jpaged.sampling_params import SamplingParams
from tests.engine.test_block_manager import KVContents

PS = 8


def next_token(seq: Sequence) -> int:
    return (7 * seq.seq_id + seq.num_tokens) % 50 + 1


def make_scheduler(num_blocks=64, max_model_len=256, sliding_window=None, **overrides) -> Scheduler:
    config = EngineConfig(**{"block_size": PS, "max_num_batched_tokens": 32, "max_num_seqs": 8, **overrides})
    return Scheduler(config, num_blocks=num_blocks, max_model_len=max_model_len, sliding_window=sliding_window)


class FakeModel:
    def __init__(self, sched: Scheduler):
        self.sched = sched
        self.kv = KVContents(sched.page_size, sched.sliding_window)

    def step(self) -> ScheduledBatch:
        """One engine step; sequences that reached max_tokens are finished, as the engine does."""
        sched = self.sched
        batch = self.schedule()
        sched.check_invariants(batch)
        self.kv.apply(batch.swap_out, batch.swap_in, batch.copy_pages)
        for e in batch.entries:
            self.kv.write(e.seq, e.start, e.num_tokens)
        for e in batch.entries:
            self.kv.check_reads(e.seq, e.start, e.start + e.num_tokens)
        sched.postprocess(batch, self.sampled(batch))
        for e in batch.entries:
            if e.num_samples and e.seq.num_output_tokens >= e.seq.sampling_params.max_tokens:
                sched.finish(e.seq, "length")
        sched.check_invariants()
        return batch

    def schedule(self) -> ScheduledBatch:
        return self.sched.schedule()

    def sampled(self, batch: ScheduledBatch) -> dict[int, list[int]]:
        """The tokens each sampling entry's sequence takes this step."""
        return {e.seq.seq_id: [next_token(e.seq)] for e in batch.entries if e.num_samples}

    def run(self, max_steps: int = 1000) -> list[ScheduledBatch]:
        batches = []
        while self.sched.has_unfinished():
            assert len(batches) < max_steps, "the scheduler stopped making progress"
            batches.append(self.step())
        return batches


def seq(seq_id: int, num_prompt: int, max_tokens: int = 4, *, priority: int = 0, first: int = 1) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", list(range(first, first + num_prompt)),
                    SamplingParams(max_tokens=max_tokens), priority=priority, arrival_time=float(seq_id))


def outputs(sched_kwargs: dict, seqs: list[Sequence]) -> dict[int, list[int]]:
    sched = make_scheduler(**sched_kwargs)
    for s in seqs:
        sched.add(s)
    FakeModel(sched).run()
    assert sched.num_used_pages == 0 and sched.num_free_pages == sched.block_manager.num_pages
    return {s.seq_id: s.output_token_ids for s in seqs}


# -- budget, chunking, ordering --------------------------------------------------------------------

def test_chunked_prefill_never_exceeds_the_budget_and_decodes_go_first():
    sched = make_scheduler(max_num_batched_tokens=16, max_num_seqs=4)
    model = FakeModel(sched)
    sched.add(seq(0, 3, max_tokens=20))
    sched.add(seq(1, 5, max_tokens=20))
    model.step()
    long = seq(2, 100, max_tokens=2)
    sched.add(long)
    chunks = []
    while long.num_computed_tokens < 100:
        batch = model.step()
        assert batch.num_tokens <= 16
        kinds = [(e.seq.seq_id, e.num_tokens) for e in batch.entries]
        assert kinds[:2] == [(0, 1), (1, 1)]  # both decodes every step, before the prefill chunk
        chunks.append(kinds[2][1])
    assert sum(chunks) == 100 and max(chunks) == 14 and len(chunks) == 8


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_budget():
    sched = make_scheduler(max_num_batched_tokens=16, enable_chunked_prefill=False)
    model = FakeModel(sched)
    sched.add(seq(0, 10, max_tokens=5))
    sched.add(seq(1, 10, max_tokens=5, first=100))
    assert [(e.seq.seq_id, e.num_tokens) for e in model.step().entries] == [(0, 10)]
    assert [(e.seq.seq_id, e.num_tokens) for e in model.step().entries] == [(0, 1), (1, 10)]


def test_max_num_seqs_caps_running_sequences_and_batch_rows():
    sched = make_scheduler(max_num_seqs=2)
    for i in range(5):
        sched.add(seq(i, 3, max_tokens=3))
    for batch in FakeModel(sched).run():
        assert len(batch.entries) <= 2 and sched.num_running <= 2


def test_max_num_prefill_seqs_caps_the_prefill_chunks_of_a_step_but_not_its_decodes():
    sched = make_scheduler(max_num_batched_tokens=64, max_num_prefill_seqs=2)
    model = FakeModel(sched)
    for i in range(5):
        sched.add(seq(i, 6, max_tokens=4, first=10 * i + 1))
    batches = model.run()
    assert [[(e.seq.seq_id, e.num_tokens) for e in b.entries] for b in batches[:3]] == [
        [(0, 6), (1, 6)],
        [(0, 1), (1, 1), (2, 6), (3, 6)],     # the cap counts prefill chunks only
        [(0, 1), (1, 1), (2, 1), (3, 1), (4, 6)]]
    assert all(sum(e.num_tokens > 1 for e in b.entries) <= 2 for b in batches)


def test_empty_batch_when_nothing_can_run():
    sched = make_scheduler()
    batch = sched.schedule()
    assert batch.entries == [] and batch.copy_pages == batch.swap_in == batch.swap_out == batch.preempted == []


# -- admission -------------------------------------------------------------------------------------

def test_rejects_prompt_plus_max_tokens_over_max_model_len_and_keeps_nothing():
    sched = make_scheduler(max_model_len=128)
    with pytest.raises(ValueError, match=r"prompt \(100 tokens\) \+ max_tokens \(50\) = 150 exceeds max_model_len "
                                         r"\(128\); shorten the prompt or lower max_tokens"):
        sched.add(seq(0, 100, max_tokens=50))
    assert not sched.has_unfinished() and sched.num_waiting == 0
    sched.add(seq(0, 100, max_tokens=28))  # the same seq_id is free to use
    assert sched.num_waiting == 1


def test_rejects_request_larger_than_the_whole_pool():
    sched = make_scheduler(num_blocks=4, max_model_len=1024)
    with pytest.raises(ValueError, match=r"needs 5 KV pages of 8 tokens, more than the whole pool \(4\)"):
        sched.add(seq(0, 30, max_tokens=10))
    assert not sched.has_unfinished()
    sched.add(seq(0, 30, max_tokens=3))  # 32 tokens, the last never written: 4 pages


def test_rejects_prompt_over_budget_without_chunked_prefill():
    sched = make_scheduler(max_num_batched_tokens=16, enable_chunked_prefill=False)
    with pytest.raises(ValueError, match=r"prompt \(17 tokens\) exceeds max_num_batched_tokens \(16\) with "
                                         r"chunked prefill disabled"):
        sched.add(seq(0, 17))


def test_rejects_a_seq_id_already_scheduled():
    sched = make_scheduler()
    sched.add(seq(0, 3))
    with pytest.raises(ValueError, match="seq_id 0 is already scheduled"):
        sched.add(seq(0, 3))


# -- preemption ------------------------------------------------------------------------------------

def crowd() -> list[Sequence]:
    return [seq(i, 15, max_tokens=20, first=10 * i) for i in range(3)]  # 3 x 2 pages, growing to 5 each


def test_recompute_preemption_takes_the_most_recently_admitted_and_resumes():
    expected = outputs({}, crowd())
    sched = make_scheduler(num_blocks=8)
    seqs = crowd()
    for s in seqs:
        sched.add(s)
    model = FakeModel(sched)
    model.step()
    batch = model.step()
    while not batch.preempted:
        batch = model.step()
    assert batch.preempted == [seqs[2]] and seqs[2].status is SequenceStatus.WAITING
    assert seqs[2].num_computed_tokens == 0 and seqs[2].block_table == []
    model.run()
    assert sched.num_preemptions >= 1
    assert {s.seq_id: s.output_token_ids for s in seqs} == expected
    assert sched.num_free_pages == 8


def test_swap_preemption_swaps_out_and_back_in_before_running():
    expected = outputs({}, crowd())
    sched = make_scheduler(num_blocks=8, preemption_mode="swap", num_host_kv_blocks=8)
    seqs = crowd()
    for s in seqs:
        sched.add(s)
    batches = FakeModel(sched).run()
    swapped_out = [b for b in batches if b.swap_out]
    swapped_in = [b for b in batches if b.swap_in]
    assert swapped_out and swapped_in and sched.num_preemptions >= 1
    assert batches.index(swapped_out[0]) < batches.index(swapped_in[0])
    assert {s.seq_id: s.output_token_ids for s in seqs} == expected
    assert sched.num_free_pages == 8 and sched.block_manager.num_free_host_pages == 8


def test_swap_falls_back_to_recompute_when_the_host_pool_is_full():
    sched = make_scheduler(num_blocks=8, preemption_mode="swap", num_host_kv_blocks=1)
    seqs = crowd()
    for s in seqs:
        sched.add(s)
    batches = FakeModel(sched).run()
    assert sched.num_preemptions >= 1 and not any(b.swap_out for b in batches)


# -- priority --------------------------------------------------------------------------------------

def admission_order(policy: str) -> list[int]:
    sched = make_scheduler(max_num_seqs=1, scheduling_policy=policy)
    for i, priority in enumerate([5, 0, 2]):
        sched.add(seq(i, 3, max_tokens=2, priority=priority))
    order = []
    for batch in FakeModel(sched).run():
        order += [e.seq.seq_id for e in batch.entries if e.seq.seq_id not in order]
    return order


def test_priority_policy_runs_lower_values_first():
    assert admission_order("priority") == [1, 2, 0]


def test_fcfs_policy_runs_in_arrival_order():
    assert admission_order("fcfs") == [0, 1, 2]


def test_priority_policy_preempts_the_lowest_priority_first():
    sched = make_scheduler(num_blocks=8, scheduling_policy="priority")
    seqs = [seq(0, 15, 20, priority=0, first=1), seq(1, 15, 20, priority=9, first=20),
            seq(2, 15, 20, priority=1, first=40)]
    for s in seqs:
        sched.add(s)
    model = FakeModel(sched)
    preempted = []
    while not preempted:
        preempted = model.step().preempted
    assert preempted[0] is seqs[1]


# -- sliding window, abort, fork -------------------------------------------------------------------

def test_sliding_window_bounds_pages_per_sequence():
    window = 16
    bound = -(-window // PS) + 1
    sched = make_scheduler(num_blocks=64, sliding_window=window, max_num_batched_tokens=16)
    for i in range(3):
        sched.add(seq(i, 60 + 20 * i, max_tokens=40, first=3 * i))
    model = FakeModel(sched)
    while sched.has_unfinished():
        model.step()
        for s in sched.running:
            assert sum(p >= 0 for p in s.block_table) <= bound
    assert sched.num_free_pages == 64


def test_abort_frees_every_sequence_of_the_request_in_any_state():
    sched = make_scheduler(num_blocks=8, preemption_mode="swap", num_host_kv_blocks=8)
    model = FakeModel(sched)
    seqs = crowd()
    for s in seqs:
        sched.add(s)
    batch = model.step()
    while not batch.preempted:
        batch = model.step()
    child = sched.fork(seqs[0], 10)
    sched.add(seq(11, 5))
    states = {s.status for s in seqs + [child]} | {SequenceStatus.WAITING}
    assert states >= {SequenceStatus.RUNNING, SequenceStatus.SWAPPED, SequenceStatus.WAITING}
    for request_id in ("r0", "r1", "r2", "r11"):
        assert sched.abort(request_id)
    assert sched.abort("missing") == []
    assert not sched.has_unfinished() and child.finish_reason == "abort"
    sched.check_invariants()
    assert sched.num_free_pages == 8 and sched.block_manager.num_free_host_pages == 8


def test_fork_shares_pages_and_reports_the_copy_of_the_partial_page():
    sched = make_scheduler()
    model = FakeModel(sched)
    parent = seq(0, 20, max_tokens=5)
    sched.add(parent)
    model.step()
    child = sched.fork(parent, 1)
    assert child.block_table == parent.block_table and child.status is SequenceStatus.RUNNING
    assert [sched.block_manager.ref_count(p) for p in parent.block_table] == [2, 2, 2]
    batch = model.step()
    assert len(batch.copy_pages) == 1 and batch.copy_pages[0][0] in parent.block_table + child.block_table
    assert parent.block_table[:2] == child.block_table[:2] and parent.block_table[2] != child.block_table[2]
    model.run()
    assert sched.num_free_pages == 64


def test_fork_of_a_waiting_parent_waits_too():
    sched = make_scheduler()
    parent = seq(0, 5)
    sched.add(parent)
    child = sched.fork(parent, 1)
    assert child.status is SequenceStatus.WAITING and sched.num_waiting == 2
    FakeModel(sched).run()
    assert parent.output_token_ids and child.output_token_ids


# -- stateful --------------------------------------------------------------------------------------

PREFIX = list(range(30, 46))  # two full pages shared by some prompts


class SchedulerMachine(RuleBasedStateMachine):
    """Random add / step / fork / finish / abort under random engine settings; every step is checked."""

    @initialize(mode=st.sampled_from(["recompute", "swap"]), policy=st.sampled_from(["fcfs", "priority"]),
                prefix_caching=st.booleans(), chunked=st.booleans(), window=st.sampled_from([None, 16]),
                num_blocks=st.integers(6, 12), budget=st.sampled_from([16, 32]),
                prefill_cap=st.sampled_from([None, 1, 2]))
    def setup(self, mode, policy, prefix_caching, chunked, window, num_blocks, budget, prefill_cap):
        self.sched = make_scheduler(
            num_blocks=num_blocks, max_model_len=64, sliding_window=window, max_num_batched_tokens=budget,
            max_num_seqs=4, max_num_prefill_seqs=prefill_cap,
            preemption_mode=mode, num_host_kv_blocks=6 if mode == "swap" else 0,
            scheduling_policy=policy, enable_prefix_caching=prefix_caching, enable_chunked_prefill=chunked)
        self.model = FakeModel(self.sched)
        self.next_id = 0

    @rule(shared=st.booleans(), tail=st.lists(st.integers(1, 9), min_size=1, max_size=30),
          max_tokens=st.integers(1, 16), priority=st.integers(0, 3))
    def add(self, shared, tail, max_tokens, priority):
        self.next_id += 1
        tokens = (PREFIX if shared else []) + tail
        new = Sequence(self.next_id, f"r{self.next_id}", tokens, SamplingParams(max_tokens=max_tokens),
                       priority=priority)
        num_waiting = self.sched.num_waiting
        try:
            self.sched.add(new)
        except ValueError:
            assert self.sched.num_waiting == num_waiting
        self.sched.check_invariants()

    @rule(tail=st.lists(st.integers(1, 9), min_size=1, max_size=14), max_tokens=st.integers(2, 12),
          n=st.integers(1, 3))
    def add_with_samples(self, tail, max_tokens, n):
        """n > 1 sampling: prefill one sequence, then fork it once it has its first token."""
        self.next_id += 1
        parent = Sequence(self.next_id, f"r{self.next_id}", tail, SamplingParams(max_tokens=max_tokens))
        self.sched.add(parent)
        for _ in range(20):
            if parent.num_output_tokens or parent.is_finished:
                break
            self._step()
        for _ in range(n if parent.status is SequenceStatus.RUNNING else 0):
            self.next_id += 1
            child = self.sched.fork(parent, self.next_id)
            child.token_ids[-1] = 10 + self.next_id % 7  # each sample drew its own first token

    @rule(num_steps=st.integers(1, 4))
    def step(self, num_steps):
        for _ in range(num_steps):
            self._step()

    def _step(self):
        hits = self.sched.prefix_cache_hits
        batch = self.model.step()
        happened = {"preempt": batch.preempted, "swap out": batch.swap_out, "swap in": batch.swap_in,
                    "copy-on-write": batch.copy_pages, "prefix hit": self.sched.prefix_cache_hits > hits}
        for name in (name for name, yes in happened.items() if yes):
            event(name)  # shown by --hypothesis-show-statistics: the runs reach every kind of step

    @rule(data=st.data())
    def fork(self, data):
        seqs = self.sched.running + self.sched.waiting
        if seqs:
            self.next_id += 1
            self.sched.fork(data.draw(st.sampled_from(seqs)), self.next_id)

    @rule(data=st.data())
    def finish(self, data):
        seqs = self.sched.running + self.sched.waiting + self.sched.swapped
        if seqs:
            self.sched.finish(data.draw(st.sampled_from(seqs)), "stop")

    @rule(data=st.data())
    def abort(self, data):
        seqs = self.sched.running + self.sched.waiting + self.sched.swapped
        if seqs:
            request_id = data.draw(st.sampled_from(seqs)).request_id
            aborted = self.sched.abort(request_id)
            assert aborted and all(s.finish_reason == "abort" for s in aborted)

    @invariant()
    def consistent(self):
        if hasattr(self, "sched"):
            self.sched.check_invariants()

    def teardown(self):
        if not hasattr(self, "sched"):
            return
        for _ in range(500):  # every request ends: the scheduler never livelocks
            if not self.sched.has_unfinished():
                break
            self._step()
        assert not self.sched.has_unfinished()
        assert self.sched.num_free_pages == self.sched.block_manager.num_pages
        assert self.sched.block_manager.num_free_host_pages == self.sched.block_manager.num_host_pages


SchedulerMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=30, deadline=None)
TestSchedulerStateful = SchedulerMachine.TestCase


def test_fill_takes_a_run_of_one_to_num_samples_tokens_and_refuses_others():
    sched = make_scheduler()
    seq = Sequence(0, "r", [5] * 10, SamplingParams(max_tokens=8))
    sched.add(seq)
    batch = sched.schedule()
    (entry,) = batch.entries
    entry.num_samples = 3  # a multi-token step
    sched.advance(batch)
    assert seq.token_ids[10:] == [-1, -1, -1]
    with pytest.raises(ValueError, match="1 to 3 tokens"):
        sched.fill(batch, {0: [1, 2, 3, 4]})
    with pytest.raises(ValueError, match="1 to 3 tokens"):
        sched.fill(batch, {})
    sched.fill(batch, {0: [7, 8]})
    assert seq.token_ids[10:] == [7, 8] and seq.num_computed_tokens == 10
    assert [(e.start, e.num_tokens, e.num_samples) for e in sched.schedule().entries] == [(10, 2, 1)]


def test_a_short_run_behind_a_launched_step_is_refused():
    sched = make_scheduler()
    seq = Sequence(0, "r", [5] * 10, SamplingParams(max_tokens=8))
    sched.add(seq)
    batch = sched.schedule()
    batch.entries[0].num_samples = 2
    sched.advance(batch)
    seq.token_ids.append(-1)  # the next step's PLACEHOLDER, as async scheduling leaves it
    with pytest.raises(ValueError, match="read back before the next step"):
        sched.fill(batch, {0: [7]})
