"""BlockManager: pages, refcounts, copy-on-write, prefix reuse, sliding-window release, swap.

Besides the block manager's own invariants, these tests keep `KVContents`, a stand-in for the device and
host KV pages that stores (token, position) in each slot, apply every page move the block manager
reports, and check that each sequence reads back exactly its own tokens: so a missing copy-on-write, a
wrong prefix hit or a lost swap shows up as wrong "K/V", the way it would on the device.
"""
import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from jpaged.engine.block_manager import BlockManager
from jpaged.engine.sequence import Sequence, SequenceStatus


class KVContents:
    """What each device and host page holds: slot -> (token, position)."""

    def __init__(self, page_size: int, sliding_window: int | None = None):
        self.page_size = page_size
        self.sliding_window = sliding_window
        self.device: dict[int, dict[int, tuple[int, int]]] = {}
        self.host: dict[int, dict[int, tuple[int, int]]] = {}

    def apply(self, swap_out=(), swap_in=(), copies=()):
        """Page moves in the runner's order: swap out, swap in, copy-on-write."""
        for dev, host in swap_out:
            self.host[host] = dict(self.device.get(dev, {}))
        for host, dev in swap_in:
            self.device[dev] = dict(self.host.get(host, {}))
        for src, dst in copies:
            self.device[dst] = dict(self.device.get(src, {}))

    def write(self, seq: Sequence, start: int, num_tokens: int) -> None:
        ps = self.page_size
        for pos in range(start, start + num_tokens):
            page = seq.block_table[pos // ps]
            assert page >= 0, (seq.seq_id, pos)
            self.device.setdefault(page, {})[pos % ps] = (seq.token_ids[pos], pos)

    def first_visible(self, pos: int) -> int:
        return 0 if self.sliding_window is None else max(0, pos - self.sliding_window + 1)

    def check_reads(self, seq: Sequence, start: int, end: int, *, host: bool = False) -> None:
        """Every cached position the queries start..end-1 attend to holds seq's own token."""
        ps = self.page_size
        table, pages = (seq.host_block_table, self.host) if host else (seq.block_table, self.device)
        for pos in range(self.first_visible(start), end):
            page = table[pos // ps]
            assert page >= 0, f"seq {seq.seq_id} reads position {pos} from a released page"
            got = pages.get(page, {}).get(pos % ps)
            assert got == (seq.token_ids[pos], pos), f"seq {seq.seq_id} pos {pos}: page {page} holds {got}"


def new_seq(seq_id: int, tokens, request_id: str | None = None) -> Sequence:
    return Sequence(seq_id=seq_id, request_id=request_id or f"r{seq_id}", token_ids=list(tokens))


def compute(bm: BlockManager, kv: KVContents, seq: Sequence, num_tokens: int) -> list[tuple[int, int]]:
    """One step for one sequence, as the scheduler and runner do it: grow, move pages, write, record."""
    start = seq.num_computed_tokens
    copies = bm.grow(seq, start + num_tokens)
    kv.apply(copies=copies)
    kv.write(seq, start, num_tokens)
    kv.check_reads(seq, start, start + num_tokens)
    seq.num_computed_tokens = start + num_tokens
    bm.register_full_pages(seq)
    bm.release_outside_window(seq)
    return copies


# -- unit tests ----------------------------------------------------------------------------------

def test_fork_then_write_copies_partial_page():
    bm, kv = BlockManager(8, 4), KVContents(4)
    parent = new_seq(0, range(10))
    bm.admit(parent, [])
    compute(bm, kv, parent, 10)  # pages: full, full, 2/4 filled
    parent.append_token(100)
    child = parent.clone(1)
    bm.fork(parent, child)
    child.token_ids[-1] = 200
    assert child.block_table == parent.block_table
    assert all(bm.ref_count(p) == 2 for p in parent.block_table)

    copies = compute(bm, kv, child, 1)

    shared_partial = parent.block_table[2]
    assert copies == [(shared_partial, child.block_table[2])]
    assert child.block_table[:2] == parent.block_table[:2] and child.block_table[2] != shared_partial
    assert [bm.ref_count(p) for p in parent.block_table] == [2, 2, 1]
    assert compute(bm, kv, parent, 1) == []  # the parent now holds its partial page alone
    kv.check_reads(parent, 0, 11)
    kv.check_reads(child, 0, 11)
    bm.check_invariants([parent, child])


def test_fork_at_page_boundary_copies_nothing():
    bm, kv = BlockManager(8, 4), KVContents(4)
    parent = new_seq(0, range(8))
    bm.admit(parent, [])
    compute(bm, kv, parent, 8)
    parent.append_token(100)
    child = parent.clone(1)
    bm.fork(parent, child)
    assert compute(bm, kv, child, 1) == [] and compute(bm, kv, parent, 1) == []
    assert child.block_table[2] != parent.block_table[2]
    bm.check_invariants([parent, child])


def test_release_of_every_holder_returns_the_pool_whole():
    bm, kv = BlockManager(6, 4, num_host_pages=4), KVContents(4)
    a = new_seq(0, range(9))
    bm.admit(a, [])
    compute(bm, kv, a, 9)
    b = a.clone(1)
    bm.fork(a, b)
    kv.apply(swap_out=bm.swap_out(b))
    bm.release(a)
    bm.release(b)
    bm.check_invariants([])
    assert bm.num_free_pages == 6 and bm.num_used_pages == 0 and bm.num_free_host_pages == 4


def test_swap_out_and_in_restores_contents_on_fresh_pages():
    bm, kv = BlockManager(6, 4, num_host_pages=3), KVContents(4)
    seq = new_seq(0, range(11))
    bm.admit(seq, [])
    compute(bm, kv, seq, 11)
    old_pages = list(seq.block_table)
    kv.apply(swap_out=bm.swap_out(seq))
    assert seq.block_table == [] and len(seq.host_block_table) == 3 and bm.num_free_pages == 6
    kv.check_reads(seq, 0, 11, host=True)

    other = new_seq(1, range(50, 58))  # takes some of the freed pages, overwriting them
    bm.admit(other, [])
    compute(bm, kv, other, 8)
    kv.apply(swap_in=bm.swap_in(seq))
    assert set(seq.block_table).isdisjoint(other.block_table) and seq.block_table != old_pages
    kv.check_reads(seq, 0, 11)
    bm.check_invariants([seq, other])


def test_swap_out_needs_room_in_the_host_pool():
    bm, kv = BlockManager(6, 4, num_host_pages=2), KVContents(4)
    seq = new_seq(0, range(9))
    bm.admit(seq, [])
    compute(bm, kv, seq, 9)
    assert not bm.can_swap_out(seq)


def test_sliding_window_holds_at_most_window_pages_however_long_it_runs():
    window, ps = 10, 4
    bound = -(-window // ps) + 1
    bm, kv = BlockManager(8, ps, sliding_window=window), KVContents(ps, window)
    seq = new_seq(0, range(5))
    bm.admit(seq, [])
    compute(bm, kv, seq, 5)
    for step in range(200):  # 205 tokens through a pool of 8 pages
        seq.append_token(step)
        compute(bm, kv, seq, 1)
        assert sum(p >= 0 for p in seq.block_table) <= bound
        assert all(p == -1 for p in seq.block_table[:-bound])
    bm.check_invariants([seq])
    bm.release(seq)
    assert bm.num_free_pages == 8


def test_grow_reports_pages_it_needs_before_taking_them():
    bm, kv = BlockManager(3, 4), KVContents(4)
    seq = new_seq(0, range(13))
    bm.admit(seq, [])
    assert bm.pages_to_grow(seq, 13) == 4 > bm.num_free_pages
    assert bm.pages_to_grow(seq, 12) == 3
    compute(bm, kv, seq, 12)
    assert bm.num_free_pages == 0


# -- stateful ------------------------------------------------------------------------------------

PREFIXES = [[7] * 4 + [8] * 4 + [9] * 4, [7] * 4 + [1] * 8]  # share a first page; 3 pages each
tokens_st = st.lists(st.integers(0, 20), max_size=10)


class BlockManagerMachine(RuleBasedStateMachine):
    """Random admit / grow / fork / write-to-shared / finish / abort / preempt / swap / evict."""

    @initialize(prefix_caching=st.booleans(), window=st.sampled_from([None, 6, 9]))
    def setup(self, prefix_caching, window):
        self.ps, self.num_pages, self.num_host = 4, 14, 8
        self.bm = BlockManager(self.num_pages, self.ps, num_host_pages=self.num_host,
                               enable_prefix_caching=prefix_caching, sliding_window=window)
        self.kv = KVContents(self.ps, window)
        self.running: list[Sequence] = []
        self.swapped: list[Sequence] = []
        self.waiting: list[Sequence] = []
        self.next_id = 0

    @staticmethod
    def _pick(data, seqs: list[Sequence]) -> Sequence | None:
        return data.draw(st.sampled_from(seqs)) if seqs else None

    def _fresh_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def _admit(self, seq: Sequence, chunk: int) -> bool:
        cached = self.bm.cached_prefix(seq)
        start = len(cached) * self.ps
        n = min(chunk, seq.num_tokens - start)
        if self.bm.pages_to_admit(seq, cached, start + n) > self.bm.num_free_pages:
            return False
        self.bm.admit(seq, cached)
        assert seq.num_computed_tokens == start < seq.num_tokens
        self.kv.check_reads(seq, start, start)  # the reused pages hold this prompt's tokens
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        compute(self.bm, self.kv, seq, n)
        return True

    @rule(prefix=st.sampled_from([None, 0, 1]), tail=tokens_st, chunk=st.integers(1, 20))
    def admit(self, prefix, tail, chunk):
        tokens = (PREFIXES[prefix] if prefix is not None else []) + tail
        if tokens:
            self._admit(new_seq(self._fresh_id(), tokens), chunk)

    @rule(data=st.data(), chunk=st.integers(1, 20))
    def readmit_preempted(self, data, chunk):
        seq = self._pick(data, self.waiting)
        if seq is not None and self._admit(seq, chunk):
            self.waiting.remove(seq)

    @rule(data=st.data(), token=st.integers(0, 20), chunk=st.integers(1, 20))
    def grow(self, data, token, chunk):
        """A decode (append a token, compute it) or the next prefill chunk."""
        seq = self._pick(data, self.running)
        if seq is None:
            return
        if seq.num_computed_tokens == seq.num_tokens:
            seq.append_token(token)
        n = min(chunk, seq.num_tokens - seq.num_computed_tokens)
        if self.bm.pages_to_grow(seq, seq.num_computed_tokens + n) <= self.bm.num_free_pages:
            compute(self.bm, self.kv, seq, n)

    @rule(data=st.data())
    def fork(self, data):
        parent = self._pick(data, self.running)
        if parent is None:
            return
        child = parent.clone(self._fresh_id())
        self.bm.fork(parent, child)
        child.status = SequenceStatus.RUNNING
        self.running.append(child)

    @rule(data=st.data(), token=st.integers(0, 20))
    def write_to_shared(self, data, token):
        seq = self._pick(data, [s for s in self.running if self._writes_shared_page(s)])
        if seq is None:
            return
        if seq.num_computed_tokens == seq.num_tokens:
            seq.append_token(token)
        if self.bm.pages_to_grow(seq, seq.num_computed_tokens + 1) <= self.bm.num_free_pages:
            shared = seq.block_table[seq.num_computed_tokens // self.ps]
            copies = compute(self.bm, self.kv, seq, 1)
            assert copies and copies[0][0] == shared

    def _writes_shared_page(self, seq: Sequence) -> bool:
        i = seq.num_computed_tokens // self.ps
        return i < len(seq.block_table) and self.bm.ref_count(seq.block_table[i]) > 1

    @rule(data=st.data())
    def finish(self, data):
        seq = self._pick(data, self.running + self.swapped + self.waiting)
        if seq is not None:
            self._end(seq)

    @rule(data=st.data())
    def abort_request(self, data):
        """Ends a sequence and every fork of it (a fork keeps its parent's request id)."""
        victim = self._pick(data, self.running + self.swapped + self.waiting)
        if victim is None:
            return
        request_id = victim.request_id
        for seq in [s for s in self.running + self.swapped + self.waiting if s.request_id == request_id]:
            self._end(seq)

    def _end(self, seq: Sequence) -> None:
        for queue in (self.running, self.swapped, self.waiting):
            if seq in queue:
                queue.remove(seq)
        self.bm.release(seq)
        seq.status = SequenceStatus.FINISHED

    @rule(data=st.data())
    def preempt_recompute(self, data):
        seq = self._pick(data, self.running)
        if seq is None:
            return
        self.running.remove(seq)
        self.bm.release(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    @rule(data=st.data())
    def preempt_swap(self, data):
        seq = self._pick(data, self.running)
        if seq is not None and self.bm.can_swap_out(seq):
            self.kv.apply(swap_out=self.bm.swap_out(seq))
            self.running.remove(seq)
            seq.status = SequenceStatus.SWAPPED
            self.swapped.append(seq)

    @rule(data=st.data())
    def swap_in(self, data):
        seq = self._pick(data, self.swapped)
        if seq is not None and self.bm.pages_to_swap_in(seq) <= self.bm.num_free_pages:
            self.kv.apply(swap_in=self.bm.swap_in(seq))
            self.swapped.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)

    @rule(tail=st.lists(st.integers(100, 120), min_size=1, max_size=12))
    def evict(self, tail):
        """A new sequence that needs more than the free deque: idle cached pages go, oldest first."""
        if self.bm.prefix_cache is None or not self.bm.prefix_cache.num_idle:
            return
        idle = self.bm.prefix_cache.idle_pages()
        num_free = self.bm.num_free_pages - len(idle)
        seq_id = self._fresh_id()
        seq = new_seq(seq_id, [1000 + seq_id] * (self.ps * num_free + 1) + tail)  # no prefix hits
        if self._admit(seq, chunk=seq.num_tokens):
            taken = -(-seq.num_computed_tokens // self.ps) - num_free
            assert taken >= 1
            # The oldest idle pages went; the rest kept their order (pages a window released since come after).
            assert self.bm.prefix_cache.idle_pages()[:len(idle) - taken] == idle[taken:]

    @invariant()
    def pool_is_consistent(self):
        if not hasattr(self, "bm"):
            return
        self.bm.check_invariants(self.running + self.swapped)
        for seq in self.running:
            self.kv.check_reads(seq, seq.num_computed_tokens, seq.num_computed_tokens)
        for seq in self.swapped:
            self.kv.check_reads(seq, seq.num_computed_tokens, seq.num_computed_tokens, host=True)

    def teardown(self):
        if not hasattr(self, "bm"):
            return
        for seq in self.running + self.swapped + self.waiting:
            self.bm.release(seq)
        self.bm.check_invariants([])
        assert self.bm.num_free_pages == self.num_pages
        assert self.bm.num_free_host_pages == self.num_host


BlockManagerMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
TestBlockManagerStateful = BlockManagerMachine.TestCase
