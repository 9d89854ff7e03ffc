"""Prefix cache: chain keys, exact hits, LRU eviction of idle pages, and hits across requests."""
from jpaged.config import EngineConfig
from jpaged.engine.block_manager import BlockManager
from jpaged.engine.prefix_cache import PrefixCache
from jpaged.engine.scheduler import Scheduler
from jpaged.engine.sequence import Sequence
from jpaged.sampling_params import SamplingParams
from tests.engine.test_block_manager import KVContents, compute, new_seq


def test_page_key_is_stable_and_covers_parent_tokens_and_adapter():
    key = PrefixCache.page_key(None, [1, 2, 3, 4])
    assert key == PrefixCache.page_key(None, [1, 2, 3, 4])
    assert key == 0x25DEA42455A0EE04  # blake2b: the same in every process, unlike hash()
    others = {PrefixCache.page_key(None, [1, 2, 3, 5]), PrefixCache.page_key(key, [1, 2, 3, 4]),
              PrefixCache.page_key(None, [1, 2, 3, 4], adapter_id=1)}
    assert key not in others and len(others) == 3


def test_lookup_verifies_tokens_parent_and_adapter_not_hash_alone():
    cache = PrefixCache()
    key = PrefixCache.page_key(None, [1, 2])
    assert cache.insert(key, None, [1, 2], 0, page=5)
    assert cache.lookup(key, None, [1, 2], 0) == 5
    assert cache.lookup(key, None, [9, 9], 0) is None  # same key, other tokens: a collision, a miss
    assert cache.lookup(key, 123, [1, 2], 0) is None
    assert cache.lookup(key, None, [1, 2], 7) is None
    assert not cache.insert(key, None, [1, 2], 0, page=6)  # the first page keeps the key


def test_evict_takes_least_recently_parked_page_first():
    cache = PrefixCache()
    for page in (3, 1, 2):
        cache.insert(PrefixCache.page_key(None, [page]), None, [page], 0, page)
        cache.park(page)
    cache.unpark(3)
    cache.park(3)  # used again: now the most recent
    assert cache.idle_pages() == [1, 2, 3]
    assert [cache.evict(), cache.evict()] == [1, 2]
    assert not cache.is_cached(1) and cache.lookup(PrefixCache.page_key(None, [1]), None, [1], 0) is None
    cache.check_invariants()


def test_block_manager_evicts_idle_pages_lru_and_a_chain_tail_first():
    ps = 4
    bm, kv = BlockManager(6, ps), KVContents(ps)
    first, second = new_seq(0, range(9)), new_seq(1, range(100, 109))  # 2 full pages + 1 token each
    for seq in (first, second):
        bm.admit(seq, [])
        compute(bm, kv, seq, 9)
    first_pages, second_pages = first.block_table[:2], second.block_table[:2]
    bm.release(first)
    bm.release(second)
    # Released last page first, so a chain's tail is older than its head; `first` went before `second`.
    assert bm.prefix_cache.idle_pages() == first_pages[::-1] + second_pages[::-1]
    assert bm.num_free_pages == 6

    third = new_seq(2, range(200, 220))  # needs 5 pages: the 2 free ones, then 3 idle, oldest first
    bm.admit(third, [])
    compute(bm, kv, third, 20)
    assert bm.prefix_cache.idle_pages() == [second_pages[0]]
    assert bm.cached_prefix(new_seq(3, range(100, 109))) == [second_pages[0]]
    assert bm.cached_prefix(new_seq(4, range(9))) == []
    bm.check_invariants([third])


def scheduler(**overrides) -> Scheduler:
    config = EngineConfig(**{"block_size": 8, "max_num_batched_tokens": 64, "max_num_seqs": 8, **overrides})
    return Scheduler(config, num_blocks=32, max_model_len=128)


def run_to_end(sched: Scheduler, max_tokens: int) -> None:
    """Runs the scheduler with a fake model (token = 50 + output count) until every sequence ends."""
    while sched.has_unfinished():
        batch = sched.schedule()
        sched.postprocess(batch, {e.seq.seq_id: [50 + e.seq.num_output_tokens] for e in batch.entries if e.num_samples})
        for e in batch.entries:
            if e.num_samples and e.seq.num_output_tokens >= max_tokens:
                sched.finish(e.seq, "length")


def test_requests_sharing_a_prefix_hit_its_pages():
    sched = scheduler()
    system = list(range(1, 25))  # 3 full pages
    params = SamplingParams(max_tokens=2)
    sched.add(Sequence(0, "a", system + [20, 21], params))
    run_to_end(sched, 2)
    assert (sched.prefix_cache_queries, sched.prefix_cache_hits) == (26, 0)

    sched.add(Sequence(1, "b", system + [30], params))
    sched.add(Sequence(2, "c", system + [40, 41, 42, 43, 44], params))
    batch = sched.schedule()
    assert [(e.start, e.num_tokens) for e in batch.entries] == [(24, 1), (24, 5)]
    assert sched.prefix_cache_queries == 26 + 25 + 29
    assert sched.prefix_cache_hits == 24 + 24
    b, c = (e.seq for e in batch.entries)
    assert b.block_table[:3] == c.block_table[:3]
    assert all(sched.block_manager.ref_count(p) == 2 for p in b.block_table[:3])


def test_hit_never_covers_the_last_prompt_token():
    sched = scheduler()
    prompt = list(range(1, 17))  # exactly 2 full pages
    sched.add(Sequence(0, "a", list(prompt), SamplingParams(max_tokens=1)))
    run_to_end(sched, 1)
    sched.add(Sequence(1, "b", list(prompt), SamplingParams(max_tokens=1)))
    (entry,) = sched.schedule().entries
    assert (entry.start, entry.num_tokens, entry.num_samples) == (8, 8, 1)  # one page reused, one recomputed


def test_adapter_id_separates_cached_pages():
    sched = scheduler()
    prompt = list(range(1, 18))
    sched.add(Sequence(0, "a", list(prompt), SamplingParams(max_tokens=1), adapter_id=1))
    run_to_end(sched, 1)
    sched.add(Sequence(1, "b", list(prompt), SamplingParams(max_tokens=1), adapter_id=2))
    sched.add(Sequence(2, "c", list(prompt), SamplingParams(max_tokens=1), adapter_id=1))
    starts = {e.seq.request_id: e.start for e in sched.schedule().entries}
    assert starts == {"b": 0, "c": 16}


def test_prefix_caching_off_never_hits():
    sched = scheduler(enable_prefix_caching=False)
    for i in range(2):
        sched.add(Sequence(i, f"r{i}", list(range(1, 26)), SamplingParams(max_tokens=1)))
        run_to_end(sched, 1)
    assert sched.prefix_cache_hits == 0 and sched.num_free_pages == 32
