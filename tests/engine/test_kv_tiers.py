"""The host and disk tiers of the KV cache.

- the block manager with tiers under a hypothesis state machine: the block manager's rules (the
  `BlockManagerMachine` of test_block_manager.py) plus fetch, offload, spill, load, a new process
  reading the disk tier, truncated files; the stand-in K/V must always read back each sequence's own
  tokens, and every host-cached page must hold its chain entry's tokens;
- the disk store: a truncated or corrupted file is a miss; LRU drops keep it under its capacity;
- the scheduler admits a fetching sequence only once its pages arrived;
- the engine on a tiny Llama: host- and disk-tier hits give the greedy tokens of recomputation, also
  in a new engine reading the disk tier another one wrote.
"""
import shutil
import tempfile

import hypothesis.strategies as st
import jax
import numpy as np
import pytest
from hypothesis import settings
from hypothesis.stateful import initialize, invariant, rule

from jpaged.config import EngineConfig
from jpaged.engine.block_manager import BlockManager
from jpaged.engine.kv_tiers import ChainEntry, DiskPageStore, HostPagePool, PageTiers, host_page_bytes
from jpaged.engine.llm_engine import Engine
from jpaged.engine.scheduler import Scheduler
from jpaged.engine.sequence import Sequence, SequenceStatus
from jpaged.sampling_params import SamplingParams
from models.kv_cache import KVCacheSpec
from tests.engine.test_block_manager import BlockManagerMachine, KVContents, compute, new_seq, tokens_st

PS = 4
TINY_SPEC = KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=1, page_size=PS, dtype=np.float32)


def encode(contents: dict) -> np.ndarray:
    """A stand-in page (slot -> (token, position)) as page bytes (HostPagePool.page) of [2, 1, PS, 1, 1]
    float32: K = token, V = position."""
    data = np.full((2, 1, PS, 1, 1), -1.0, np.float32)
    for slot, (token, pos) in contents.items():
        data[0, 0, slot], data[1, 0, slot] = token, pos
    return data.view(np.uint8).reshape(-1)


def decode(data: np.ndarray) -> dict:
    data = data.view(np.float32).reshape(2, 1, PS, 1, 1)
    return {s: (int(data[0, 0, s, 0, 0]), int(data[1, 0, s, 0, 0])) for s in range(PS) if data[0, 0, s, 0, 0] >= 0}


class StandInTiers(PageTiers):
    """The tiers over the stand-in host pages (KVContents.host) and a real DiskPageStore."""

    def __init__(self, kv: KVContents, disk: DiskPageStore):
        self.kv, self.disk, self.host = kv, disk, None

    def spill(self, host_page, entry):
        return entry.key in self.disk or self.disk.put(entry, encode(self.kv.host.get(host_page, {}))) > 0

    def load(self, entry, host_page):
        data = self.disk.get(entry)
        if data is None:
            return False
        self.kv.host[host_page] = decode(data)
        return True


class TieredKV(KVContents):
    """KVContents that first performs the block manager's offloads (device -> host), as the runner does
    before any write of a step."""

    bm: BlockManager | None = None

    def _offloads(self):
        if self.bm is not None:
            for dev, host in self.bm.take_offloads():
                self.host[host] = dict(self.device.get(dev, {}))

    def apply(self, swap_out=(), swap_in=(), copies=()):
        self._offloads()
        super().apply(swap_out, swap_in, copies)

    def write(self, seq, start, num_tokens):
        self._offloads()
        super().write(seq, start, num_tokens)


class TieredBlockManagerMachine(BlockManagerMachine):
    """BlockManagerMachine with a host tier (8 pages, shared with swap) and a disk tier of 3 or 12 pages."""

    @initialize(window=st.sampled_from([None, 6]), disk_pages=st.sampled_from([3, 12]))
    def setup(self, window, disk_pages):
        self.ps, self.num_pages, self.num_host = PS, 10, 8
        self.dir = tempfile.mkdtemp(prefix="jpaged-tiers-")
        self.disk_capacity = disk_pages * self._file_bytes()
        self.kv = TieredKV(self.ps, window)
        self.tiers = StandInTiers(self.kv, DiskPageStore(self.dir, "test", self.disk_capacity, TINY_SPEC))
        self.bm = BlockManager(self.num_pages, self.ps, num_host_pages=self.num_host, sliding_window=window,
                               tiers=self.tiers)
        self.kv.bm = self.bm
        self.running, self.swapped, self.waiting, self.fetching = [], [], [], []
        self.orders = {}
        self.next_id = 0

    def _file_bytes(self) -> int:
        store = DiskPageStore(tempfile.mkdtemp(prefix="jpaged-probe-"), "p", 1 << 20, TINY_SPEC)
        size = store.put(ChainEntry(1, None, 0, (100, 100, 100, 100)), encode({}))
        shutil.rmtree(store.dir.parent, ignore_errors=True)
        return size

    def _admit(self, seq, chunk):
        self.next_step()  # each admission in a step of its own, as the scheduler would see it
        cached = self.bm.cached_prefix(seq)
        hosted = self.bm.host_prefix(seq, len(cached))
        start = (len(cached) + len(hosted)) * self.ps
        n = min(chunk, seq.num_tokens - start)
        if self.bm.pages_to_admit(seq, cached, start + n) > self.bm.num_free_pages:
            return False
        self.bm.admit(seq, cached)
        if hosted:
            order = self.bm.fetch(seq, hosted)
            assert seq.num_computed_tokens == start < seq.num_tokens
            self.orders[seq.seq_id] = order
            seq.status = SequenceStatus.FETCHING
            self.fetching.append(seq)
            return True
        self.kv.check_reads(seq, start, start)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        compute(self.bm, self.kv, seq, n)
        return True

    @rule(data=st.data(), chunk=st.integers(1, 20))
    def fetch_arrives(self, data, chunk):
        """A fetch lands: its host pages (read only now, as the runner's fetch thread may) go to its
        device pages, then the sequence runs."""
        seq = self._pick(data, self.fetching)
        if seq is None:
            return
        self.kv._offloads()
        order = self.orders.pop(seq.seq_id)
        for dev, host in zip(order.device_pages, order.host_pages):
            self.kv.device[dev] = dict(self.kv.host.get(host, {}))
        self.bm.fetch_done(seq.seq_id)
        self.fetching.remove(seq)
        self.bm.register_full_pages(seq)
        self.bm.release_outside_window(seq)
        self.kv.check_reads(seq, seq.num_computed_tokens, seq.num_computed_tokens)  # the fetched K/V: its own
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        n = min(chunk, seq.num_tokens - seq.num_computed_tokens)
        if self.bm.pages_to_grow(seq, seq.num_computed_tokens + n) <= self.bm.num_free_pages:
            compute(self.bm, self.kv, seq, n)

    @rule()
    def flush_device_cache(self):
        """A fresh sequence takes every available page (idle cached ones go to the host tier), then ends."""
        n = self.bm.num_free_pages
        if n:
            seq = new_seq(self._fresh_id(), [2000 + self.next_id] * (self.ps * n))
            if self._admit(seq, chunk=seq.num_tokens):
                self._end(seq)

    @rule(prefix=st.sampled_from([0, 1]), tail=tokens_st, chunk=st.integers(1, 20))
    def revisit(self, prefix, tail, chunk):
        """A shared prefix comes back after its device pages went: a host or disk hit, when they are there."""
        self.flush_device_cache()
        self.admit(prefix, tail, chunk)

    @rule()
    def next_step(self):
        self.kv._offloads()
        self.bm.begin_step()

    @rule()
    def new_process(self):
        """The disk tier as a new process finds it (its index rebuilt from the directory)."""
        self.tiers.disk.flush()
        self.tiers.disk = DiskPageStore(self.dir, "test", self.disk_capacity, TINY_SPEC)

    @rule(data=st.data(), keep=st.integers(0, 40))
    def truncate_a_file(self, data, keep):
        keys = self.tiers.disk.keys()
        if keys:
            self.tiers.disk.flush()
            path = self.tiers.disk.path(data.draw(st.sampled_from(keys)))
            if path.exists():
                path.write_bytes(path.read_bytes()[:keep])

    def _end(self, seq):
        if seq in self.fetching:
            self.fetching.remove(seq)
            self.orders.pop(seq.seq_id)
            self.bm.fetch_done(seq.seq_id)
        super()._end(seq)

    @rule(data=st.data())
    def abort_fetching(self, data):
        seq = self._pick(data, self.fetching)
        if seq is not None:
            self._end(seq)

    @invariant()
    def pool_is_consistent(self):
        if not hasattr(self, "bm"):
            return
        self.kv._offloads()
        self.bm.check_invariants(self.running + self.swapped + self.fetching)
        for seq in self.running:
            self.kv.check_reads(seq, seq.num_computed_tokens, seq.num_computed_tokens)
        for seq in self.swapped:
            self.kv.check_reads(seq, seq.num_computed_tokens, seq.num_computed_tokens, host=True)
        for page in self.bm.host_cache.cached_pages():
            entry = self.bm.host_cache.entry(page)
            got = [self.kv.host.get(page, {}).get(s, (None,))[0] for s in range(PS)]
            assert got == list(entry.token_ids), f"host page {page} holds {got}, not {entry.token_ids}"
        assert self.tiers.disk.num_bytes <= self.disk_capacity

    def teardown(self):
        if not hasattr(self, "bm"):
            return
        for seq in self.running + self.swapped + self.waiting + self.fetching:
            self.bm.release(seq)
        self.bm.check_invariants([])
        assert self.bm.num_free_pages == self.num_pages
        self.tiers.disk.flush()
        shutil.rmtree(self.dir, ignore_errors=True)


TieredBlockManagerMachine.TestCase.settings = settings(max_examples=25, stateful_step_count=40, deadline=None)
TestTieredBlockManagerStateful = TieredBlockManagerMachine.TestCase


# -- the disk store -----------------------------------------------------------------------------------

def _page(value: float) -> np.ndarray:
    return np.full((2, 1, PS, 1, 1), value, np.float32).view(np.uint8).reshape(-1)


def test_disk_store_truncated_or_corrupted_file_is_a_miss(tmp_path):
    store = DiskPageStore(tmp_path, "fp", 1 << 20, TINY_SPEC)
    a, b = ChainEntry(1, None, 0, (1, 2, 3, 4)), ChainEntry(2, 1, 0, (5, 6, 7, 8))
    store.put(a, _page(1.0))
    store.put(b, _page(2.0))
    store.flush()
    np.testing.assert_array_equal(store.get(a), _page(1.0))
    path = store.path(a.key)
    path.write_bytes(path.read_bytes()[:-3])  # truncated
    blob = bytearray(store.path(b.key).read_bytes())
    blob[-1] ^= 0xFF  # one flipped bit of payload
    store.path(b.key).write_bytes(bytes(blob))
    fresh = DiskPageStore(tmp_path, "fp", 1 << 20, TINY_SPEC)  # a new process
    assert fresh.get(a) is None and fresh.get(b) is None
    assert fresh.num_pages == 0 and not path.exists()  # bad files are deleted


def test_disk_store_wrong_chain_entry_is_a_miss_and_lru_keeps_capacity(tmp_path):
    probe = DiskPageStore(tmp_path / "probe", "fp", 1 << 20, TINY_SPEC)
    size = probe.put(ChainEntry(9, None, 0, (1, 2, 3, 4)), _page(0.0))
    store = DiskPageStore(tmp_path, "fp", 3 * size, TINY_SPEC)
    entries = [ChainEntry(k, None, 0, (k, k, k, k)) for k in range(1, 6)]
    for e in entries[:3]:
        store.put(e, _page(float(e.key)))
    assert store.get(ChainEntry(1, None, 0, (9, 9, 9, 9))) is None  # same key, other tokens: a collision
    assert store.get(entries[1]) is not None  # touched: now the most recent
    for e in entries[3:]:
        store.put(e, _page(float(e.key)))
    store.flush()
    assert store.num_bytes <= 3 * size
    assert set(store.keys()) == {2, 4, 5}
    np.testing.assert_array_equal(DiskPageStore(tmp_path, "fp", 3 * size, TINY_SPEC).get(entries[4]), _page(5.0))


def test_host_pool_lands_device_reads_on_drain():
    import jax.numpy as jnp
    pool = HostPagePool(TINY_SPEC, 4)
    data = jax.tree.map(lambda x: jnp.full((2, *x.shape[1:]), 3.0, x.dtype), pool.pages)  # 2 rows: one padding
    pool.write_from_device([2], data)
    got = pool.read([2])
    assert all(float(x.reshape(-1)[0]) == 3.0 for x in jax.tree.leaves(got))


# -- the scheduler ----------------------------------------------------------------------------------

def test_scheduler_admits_a_fetching_sequence_only_when_its_pages_arrived():
    config = EngineConfig(model="test", block_size=8, max_num_seqs=4, max_num_batched_tokens=64)
    pool = HostPagePool(KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=1, page_size=8, dtype=np.float32), 8)
    sched = Scheduler(config, num_blocks=4, max_model_len=128, num_host_pages=8, tiers=PageTiers(pool))
    arrived = set()
    sched.fetch_arrived = lambda seq_id: seq_id in arrived
    prompt = list(range(3, 27))  # 3 pages

    def seq_of(seq_id, tokens):
        return Sequence(seq_id, f"r{seq_id}", list(tokens), SamplingParams(max_tokens=1))

    first = seq_of(1, prompt)
    sched.add(first)
    while not first.is_finished:
        batch = sched.schedule()
        sched.postprocess(batch, {e.seq.seq_id: [5] for e in batch.entries if e.num_samples})
        if first.num_tokens > len(prompt):
            sched.finish(first, "length")
    other = seq_of(2, list(range(100, 124)))  # evicts the first prompt's two cached pages
    sched.add(other)
    batch = sched.schedule()
    assert len(batch.offload) == 2
    sched.finish(other, "abort")
    again = seq_of(3, prompt + [1])
    sched.add(again)
    batch = sched.schedule()
    assert [len(o.device_pages) for o in batch.fetch] == [2] and not batch.entries
    assert again.status is SequenceStatus.FETCHING
    batch = sched.schedule()
    assert not batch.entries and not batch.fetch_commit  # not arrived: it waits
    arrived.add(3)
    batch = sched.schedule()
    assert batch.fetch_commit == [3]
    assert [(e.seq.seq_id, e.start) for e in batch.entries] == [(3, 24)]
    sched.check_invariants(batch)


# -- the engine -------------------------------------------------------------------------------------

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def _engine(model, tokenizer, **kw):
    cfg = dict(model="test", dtype="float32", block_size=16, max_num_seqs=4, max_num_batched_tokens=256,
               max_model_len=512, num_kv_blocks=16)
    return Engine(EngineConfig(**(cfg | kw)), model=model, tokenizer=tokenizer)


def _run(engine, prompt, request_id):
    engine.add_request(request_id, prompt, GREEDY)
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                tokens = out.outputs[0].token_ids
        engine.scheduler.check_invariants()
    return tokens


def test_host_and_disk_hits_give_the_tokens_of_recomputation(tiny_llama, byte_tokenizer, tmp_path):
    _, model = tiny_llama
    rng = np.random.RandomState(0)
    first, *others = [rng.randint(3, 256, n).tolist() for n in (150, 200, 200, 200)]
    spec = KVCacheSpec.for_model(model.config, 16, np.float32)
    gb = 14 * host_page_bytes(spec) / (1 << 30)  # 14 host pages: less than the prompts' 48 evicted pages
    engine = _engine(model, byte_tokenizer, kv_host_cache_gb=gb, kv_disk_cache_dir=str(tmp_path))
    recomputed = _run(engine, first, "first")  # its 9 full pages computed here
    outs = [_run(engine, prompt, f"other{i}") for i, prompt in enumerate(others)]  # evict them: to the
    # host tier, the oldest on to disk
    stats = engine.stats()
    assert stats["kv_pages_offloaded"] > 14 and stats["kv_pages_spilled"] > 0
    assert _run(engine, first, "again") == recomputed
    stats = engine.stats()
    assert stats["kv_disk_hit_pages"] > 0 and stats["kv_pages_fetched"] == 9
    assert _run(engine, others[-1], "host") == outs[-1]
    assert engine.stats()["kv_host_hit_pages"] > 0
    engine.scheduler.block_manager.tiers.disk.flush()

    # A new process on the same model finds the first prompt's pages on disk.
    fresh = _engine(model, byte_tokenizer, kv_host_cache_gb=gb, kv_disk_cache_dir=str(tmp_path))
    assert _run(fresh, first, "new-process") == recomputed
    assert fresh.stats()["kv_disk_hit_pages"] == 9 and fresh.stats()["prefix_cache_hits"] == 0
    cache_map = fresh.cache_map()
    assert cache_map["disk"]["num_pages"] > 0 and cache_map["host"]["counts"]["cached"] == 9


def test_host_tier_needs_prefix_caching_and_disk_needs_host():
    with pytest.raises(ValueError, match="kv_host_cache_gb > 0 needs prefix caching"):
        EngineConfig(kv_host_cache_gb=1.0, enable_prefix_caching=False)
    with pytest.raises(ValueError, match="kv_disk_cache_dir needs a host tier"):
        EngineConfig(kv_disk_cache_dir="/tmp/x")
