"""BlockManager: the pool of KV pages (device and host), refcounts, copy-on-write, window release, swap.

Where it sits: the `Scheduler` decides who runs; this decides which physical pages hold their K/V and
fills each `Sequence.block_table` (logical page i -> physical page; -1 where a sliding window released
it). Plain Python over a free deque and refcounts; the runner performs the page copies it reports.

Every device page is in exactly one of three places: the free deque, held (refcount > 0, in one or
more block tables), or idle in the `PrefixCache` (cached, refcount 0, reusable until evicted LRU when
the free deque is empty). "Available" pages = free + idle.

Rules:
- fork shares every page; the first write into a shared page copies it (copy-on-write). Only partly
  filled pages are ever written, so only those are copied.
- a full computed page is offered to the prefix cache; admission reuses the longest cached chain.
- with a window W, pages wholly before `num_computed_tokens - W + 1` are released, so between steps a
  sequence holds at most ceil(W / page_size) + 1 pages (a prefill chunk also holds its own tokens' pages).
- swap moves a sequence's pages to private host pages and back to fresh device pages.
- with a host tier (`tiers` given), an evicted cached page is copied to a host page kept in a host
  prefix cache (LRU, by the same chain key); a full host pool drops its least recently used page, to
  the disk tier when there is one. Lookup walks the device cache, then the host, then disk; host hits
  are fetched into fresh device pages (`fetch`), disk hits are read into host pages first. Swap takes
  its host pages from the same pool (free ones, else the host cache's oldest).

Every host page is free, held by one swapped sequence, or cached (idle in the host cache). A host page
written this step (an offload not yet started) is not readable until the next `begin_step()`.

API (the scheduler's):
  BlockManager(num_pages, page_size, *, num_host_pages=0, enable_prefix_caching=True, sliding_window=None)
  num_free_pages, num_used_pages, num_free_host_pages, ref_count(page)
  cached_prefix(seq) -> list[int]; admit(seq, cached_pages); pages_to_admit(seq, cached_pages, num_tokens)
  pages_to_grow(seq, num_tokens); grow(seq, num_tokens) -> copies [(src, dst)]
  fork(parent, child); release(seq); truncate(seq, num_tokens); register_full_pages(seq); release_outside_window(seq)
  can_swap_out(seq); swap_out(seq) -> [(device, host)]; pages_to_swap_in(seq); swap_in(seq) -> [(host, device)]
  host tier: begin_step(); host_prefix(seq, start) -> host pages; fetch(seq, host_pages) -> FetchOrder;
    take_offloads() -> [(device, host)]; host_states(); free_pages(); counters (kv_tiers.TierCounters)
  check_invariants(holders)
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Iterable

from jpaged.engine.kv_tiers import ChainEntry, PageTiers, TierCounters
from jpaged.engine.prefix_cache import PrefixCache
from jpaged.engine.sequence import Sequence


def _held(table: list[int]) -> list[int]:
    return [p for p in table if p >= 0]


@dataclasses.dataclass
class FetchOrder:
    """Host -> device copies of one sequence's prefix hits: host page host_pages[i] -> device page
    device_pages[i]. The host pages stay unwritten until fetch_done(seq_id)."""

    seq_id: int
    host_pages: list[int]
    device_pages: list[int]


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, *, num_host_pages: int = 0,
                 enable_prefix_caching: bool = True, sliding_window: int | None = None,
                 tiers: PageTiers | None = None):
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if num_host_pages < 0:
            raise ValueError(f"num_host_pages must be >= 0, got {num_host_pages}")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_host_pages = num_host_pages
        self.sliding_window = sliding_window
        self.prefix_cache = PrefixCache() if enable_prefix_caching else None
        self._ref_counts = [0] * num_pages
        self._free: collections.deque[int] = collections.deque(range(num_pages))
        self._host_free: collections.deque[int] = collections.deque(range(num_host_pages))
        if tiers is not None and (self.prefix_cache is None or num_host_pages < 1):
            raise ValueError("a host tier needs prefix caching and num_host_pages >= 1")
        self.tiers = tiers
        self.host_cache = PrefixCache() if tiers is not None else None  # host page ids, all idle
        self.counters = TierCounters()
        self.window_released: set[int] = set()  # free or idle pages a window released last (the cache map)
        self._offloads: list[tuple[int, int]] = []  # (device, host) copies this step must start
        self._host_unreadable: set[int] = set()  # host pages whose data this step's copies bring
        self._host_busy: set[int] = set()  # host pages a lookup found and a fetch will read
        self._host_reading: dict[int, list[int]] = {}  # seq_id -> host pages its fetch still reads
        self._from_disk: set[int] = set()  # of those, the ones the lookup read from disk
        self._host_freed: list[int] = []  # host pages a swap-in of this step reads: free from the next

    # -- counts ----------------------------------------------------------------------------------

    @property
    def num_free_pages(self) -> int:
        """Pages an allocation can take now: free ones and idle cached ones."""
        return len(self._free) + (self.prefix_cache.num_idle if self.prefix_cache else 0)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - self.num_free_pages

    @property
    def num_free_host_pages(self) -> int:
        return len(self._host_free) + len(self._host_freed)

    def ref_count(self, page: int) -> int:
        return self._ref_counts[page]

    # -- single pages ----------------------------------------------------------------------------

    def _take(self) -> int:
        if self._free:
            page = self._free.popleft()
        else:
            page = self.prefix_cache.oldest_idle()
            if self.host_cache is not None:
                self._offload(page, self.prefix_cache.entry(page))
            self.prefix_cache.evict()
        assert self._ref_counts[page] == 0, page
        self._ref_counts[page] = 1
        self.window_released.discard(page)
        return page

    def _hold(self, page: int) -> None:
        if self._ref_counts[page] == 0:
            self.prefix_cache.unpark(page)
            self.window_released.discard(page)
        self._ref_counts[page] += 1

    def _drop(self, page: int) -> None:
        self._ref_counts[page] -= 1
        assert self._ref_counts[page] >= 0, page
        if self._ref_counts[page] == 0:
            if self.prefix_cache is not None and self.prefix_cache.is_cached(page):
                self.prefix_cache.park(page)
            else:
                self._free.append(page)

    def _drop_all(self, table: list[int]) -> None:
        # Last page first: a chain's tail becomes the older idle page, so eviction takes it first.
        for page in reversed(table):
            if page >= 0:
                self._drop(page)

    # -- prefix cache ----------------------------------------------------------------------------

    def _keys_upto(self, seq: Sequence, num_pages: int) -> list[int]:
        """Extends seq.page_keys (chain keys of full pages of token_ids) to num_pages entries."""
        ps = self.page_size
        while len(seq.page_keys) < num_pages:
            i = len(seq.page_keys)
            parent = seq.page_keys[-1] if seq.page_keys else None
            seq.page_keys.append(PrefixCache.page_key(parent, seq.token_ids[i * ps:(i + 1) * ps], seq.adapter_id))
        return seq.page_keys

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Pages of the longest cached chain of seq's full pages, never covering its last token."""
        if self.prefix_cache is None:
            return []
        ps, max_pages = self.page_size, (seq.num_tokens - 1) // self.page_size
        keys = self._keys_upto(seq, max_pages)
        pages: list[int] = []
        for i in range(max_pages):
            parent = keys[i - 1] if i else None
            page = self.prefix_cache.lookup(keys[i], parent, seq.token_ids[i * ps:(i + 1) * ps], seq.adapter_id)
            if page is None:
                break
            pages.append(page)
        return pages

    def register_full_pages(self, seq: Sequence, num_known_tokens: int | None = None) -> None:
        """Offers every full, computed, not yet offered page of seq to the prefix cache (only pages
        within the first `num_known_tokens` tokens when given: the rest are not sampled yet)."""
        if self.prefix_cache is None:
            return
        known = seq.num_computed_tokens if num_known_tokens is None else min(seq.num_computed_tokens, num_known_tokens)
        ps, full = self.page_size, known // self.page_size
        if full <= seq.num_registered_pages:
            return  # most steps: no page filled up
        keys = self._keys_upto(seq, full)
        for i in range(seq.num_registered_pages, full):
            if seq.block_table[i] >= 0:
                self.prefix_cache.insert(keys[i], keys[i - 1] if i else None, seq.token_ids[i * ps:(i + 1) * ps],
                                         seq.adapter_id, seq.block_table[i])
        seq.num_registered_pages = max(seq.num_registered_pages, full)

    # -- admission and growth --------------------------------------------------------------------

    def pages_to_admit(self, seq: Sequence, cached_pages: list[int], num_tokens: int) -> int:
        """Available pages that admit(seq, cached_pages) + grow(seq, num_tokens) would consume."""
        idle_hits = sum(1 for p in cached_pages if self._ref_counts[p] == 0)
        return idle_hits + max(0, self._num_pages_for(num_tokens) - len(cached_pages))

    def admit(self, seq: Sequence, cached_pages: list[int]) -> None:
        """Gives a page-less sequence the cached pages of its prefix; those tokens count as computed."""
        assert not seq.block_table and not seq.host_block_table, seq.seq_id
        for page in cached_pages:
            self._hold(page)
        seq.block_table = list(cached_pages)
        seq.num_computed_tokens = len(cached_pages) * self.page_size
        seq.num_registered_pages = len(cached_pages)
        self.release_outside_window(seq)

    def _num_pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def _shared_written_pages(self, seq: Sequence, num_tokens: int) -> list[int]:
        """Logical pages the next write (tokens num_computed..num_tokens) touches that others hold too."""
        table, refs = seq.block_table, self._ref_counts
        first, last = seq.num_computed_tokens // self.page_size, min(len(table), -(-num_tokens // self.page_size))
        if last - first == 1:  # a decode, most of the time: one page
            return [first] if refs[table[first]] > 1 else []
        return [i for i in range(first, last) if refs[table[i]] > 1]

    def pages_to_grow(self, seq: Sequence, num_tokens: int) -> int:
        """Available pages grow(seq, num_tokens) would consume (new pages + copy-on-write copies)."""
        new = max(0, -(-num_tokens // self.page_size) - len(seq.block_table))
        return new + len(self._shared_written_pages(seq, num_tokens))

    def grow(self, seq: Sequence, num_tokens: int) -> list[tuple[int, int]]:
        """Makes seq's first num_tokens tokens writable: new pages, and private copies of shared ones.

        The caller checks pages_to_grow(seq, num_tokens) <= num_free_pages first.
        Returns the (src, dst) page copies the runner must perform before the step.
        """
        copies = []
        for i in self._shared_written_pages(seq, num_tokens):
            src, dst = seq.block_table[i], self._take()
            self._drop(src)
            seq.block_table[i] = dst
            copies.append((src, dst))
        for _ in range(-(-num_tokens // self.page_size) - len(seq.block_table)):
            seq.block_table.append(self._take())
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child holds every page the parent holds (copy-on-write on the first write)."""
        assert not child.block_table and not child.host_block_table, child.seq_id
        for page in _held(parent.block_table):
            self._hold(page)
        child.block_table = list(parent.block_table)
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_registered_pages = parent.num_registered_pages

    def release(self, seq: Sequence) -> None:
        """Returns all of seq's device and host pages to their pools."""
        self._drop_all(seq.block_table)
        self._host_free.extend(_held(seq.host_block_table))
        seq.block_table = []
        seq.host_block_table = []
        seq.num_registered_pages = 0

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Returns the pages past seq's first num_tokens tokens (speculative rollback); a page the
        prefix cache holds is never past them, as only known tokens' pages are registered."""
        keep = self._num_pages_for(num_tokens)
        assert seq.num_registered_pages <= keep, (seq.seq_id, seq.num_registered_pages, keep)
        self._drop_all(seq.block_table[keep:])
        del seq.block_table[keep:]

    def release_outside_window(self, seq: Sequence) -> None:
        """Releases pages wholly before the window of the next token to compute (marks them -1)."""
        if self.sliding_window is None:
            return
        first_needed = max(0, seq.num_computed_tokens - self.sliding_window + 1)
        i = min(first_needed // self.page_size, len(seq.block_table)) - 1
        while i >= 0 and seq.block_table[i] >= 0:
            self._drop(seq.block_table[i])
            if self._ref_counts[seq.block_table[i]] == 0:
                self.window_released.add(seq.block_table[i])
            seq.block_table[i] = -1
            i -= 1

    # -- swap ------------------------------------------------------------------------------------

    def can_swap_out(self, seq: Sequence) -> bool:
        return len(_held(seq.block_table)) <= len(self._host_free) + self._num_host_evictable()

    def swap_out(self, seq: Sequence) -> list[tuple[int, int]]:
        """Moves seq's pages to private host pages; returns the (device, host) copies to perform."""
        assert self.can_swap_out(seq), seq.seq_id
        pairs, host_table = [], []
        for page in seq.block_table:
            host = self._host_slot() if page >= 0 else -1
            host_table.append(host)
            if page >= 0:
                pairs.append((page, host))
        self._drop_all(seq.block_table)
        seq.block_table, seq.host_block_table = [], host_table
        self.counters.swapped_out += len(pairs)
        return pairs

    def pages_to_swap_in(self, seq: Sequence) -> int:
        return len(_held(seq.host_block_table))

    def swap_in(self, seq: Sequence) -> list[tuple[int, int]]:
        """Moves seq's host pages to fresh device pages; returns the (host, device) copies to perform."""
        assert self.pages_to_swap_in(seq) <= self.num_free_pages, seq.seq_id
        pairs, table = [], []
        for host in seq.host_block_table:
            page = self._take() if host >= 0 else -1
            table.append(page)
            if host >= 0:
                pairs.append((host, page))
        # With a host tier, free from the next step on: this step's offloads run before its swap-ins,
        # and must not land in a host page a swap-in still reads.
        (self._host_freed if self.host_cache is not None else self._host_free).extend(h for h, _ in pairs)
        seq.block_table, seq.host_block_table = table, []
        self.counters.swapped_in += len(pairs)
        return pairs

    # -- host and disk tiers ---------------------------------------------------------------------

    @property
    def has_host_tier(self) -> bool:
        return self.host_cache is not None

    def begin_step(self) -> None:
        """A new schedule: the copies the last one asked for have been started, so their pages are readable."""
        self._host_unreadable.clear()
        self._host_busy.clear()
        self._host_free.extend(self._host_freed)
        self._host_freed.clear()

    def take_offloads(self) -> list[tuple[int, int]]:
        """The (device, host) copies of evicted cached pages since the last call; the runner starts them
        before any write of this step (the device pages get new contents)."""
        offloads, self._offloads = self._offloads, []
        return offloads

    def _host_pinned(self, page: int) -> bool:
        """Not to be overwritten now: written this step, found by this step's lookup, or being fetched."""
        return (page in self._host_busy or page in self._host_unreadable
                or any(page in pages for pages in self._host_reading.values()))

    def _num_host_evictable(self) -> int:
        if self.host_cache is None:
            return 0
        return sum(1 for p in self.host_cache.iter_idle() if not self._host_pinned(p))

    def _host_victim(self) -> int | None:
        """The least recently used host-cached page that is readable and no fetch will read."""
        return next((p for p in self.host_cache.iter_idle() if not self._host_pinned(p)), None)

    def _host_slot(self) -> int | None:
        """A host page to write: a free one, else the host cache's least recently used readable one
        (spilled to disk first when there is a disk tier), or None when there is none."""
        if self._host_free:
            return self._host_free.popleft()
        page = self._host_victim() if self.host_cache is not None else None
        if page is None:
            return None
        entry = self.host_cache.entry(page)
        self.host_cache.unpark(page)
        self.host_cache.evict_page(page)
        if self.tiers.spill(page, ChainEntry(entry.key, entry.parent_key, entry.adapter_id, entry.token_ids)):
            self.counters.spilled += 1
        else:
            self.counters.host_dropped += 1
        return page

    def _offload(self, page: int, entry) -> None:
        """An evicted cached device page goes to a host page (already there: it is touched instead)."""
        hit = self.host_cache.lookup(entry.key, entry.parent_key, entry.token_ids, entry.adapter_id)
        if hit is not None:
            self.host_cache.unpark(hit)
            self.host_cache.park(hit)
            return
        host = self._host_slot()
        if host is None:
            self.counters.host_dropped += 1  # every host page is held or on its way: the page is dropped
            return
        self.host_cache.insert(entry.key, entry.parent_key, entry.token_ids, entry.adapter_id, host)
        self.host_cache.park(host)
        self._host_unreadable.add(host)
        self._offloads.append((page, host))
        self.counters.offloaded += 1

    def host_prefix(self, seq: Sequence, start: int) -> list[int]:
        """Host pages continuing seq's cached chain from logical page `start` (disk hits are read into
        host pages on the way), never covering its last token. They stay untouched until fetch() or
        the next lookup."""
        self._host_busy.clear()
        self._from_disk.clear()
        if self.host_cache is None:
            return []
        ps, max_pages = self.page_size, (seq.num_tokens - 1) // self.page_size
        keys = self._keys_upto(seq, max_pages)
        found: list[int] = []
        for i in range(start, max_pages):
            parent, tokens = keys[i - 1] if i else None, seq.token_ids[i * ps:(i + 1) * ps]
            host = self.host_cache.lookup(keys[i], parent, tokens, seq.adapter_id)
            if host is not None:
                if host in self._host_unreadable:
                    break
                self.host_cache.unpark(host)
                self.host_cache.park(host)
            elif self.tiers.on_disk(keys[i]):
                host = self._host_slot()
                if host is None:
                    break
                if not self.tiers.load(ChainEntry(keys[i], parent, seq.adapter_id, tuple(tokens)), host):
                    self._host_free.append(host)
                    break
                self.host_cache.insert(keys[i], parent, tokens, seq.adapter_id, host)
                self.host_cache.park(host)
                self.counters.loaded += 1
                self._from_disk.add(host)
            else:
                break
            self._host_busy.add(host)
            found.append(host)
        return found

    def fetch(self, seq: Sequence, host_pages: list[int]) -> FetchOrder:
        """After admit(seq, ...): fresh device pages for the host hits `host_pages` (from host_prefix),
        appended to seq's table; those tokens count as computed. The caller checked the room. The host
        pages are kept unwritten until fetch_done(seq.seq_id) (the copy has landed, or was cancelled)."""
        assert len(seq.block_table) * self.page_size == seq.num_computed_tokens, seq.seq_id
        self._host_reading[seq.seq_id] = list(host_pages)  # before any take: a take may reuse a host page
        disk_hits = len(self._from_disk.intersection(host_pages))
        self.counters.disk_hits += disk_hits
        self.counters.host_hits += len(host_pages) - disk_hits
        self._host_busy.clear()
        self._from_disk.clear()
        device = [self._take() for _ in host_pages]
        seq.block_table.extend(device)
        seq.num_computed_tokens = len(seq.block_table) * self.page_size
        self.counters.fetched += len(device)
        return FetchOrder(seq.seq_id, list(host_pages), device)

    def fetch_done(self, seq_id: int) -> None:
        """The fetch of seq_id landed (or was cancelled): its host pages may be overwritten again."""
        self._host_reading.pop(seq_id, None)

    def host_states(self) -> list[str]:
        """Each host page's state: 'free', 'swapped' (held by a swapped sequence) or 'cached'."""
        states = ["swapped"] * self.num_host_pages
        for page in (*self._host_free, *self._host_freed):
            states[page] = "free"
        for page in self.host_cache.cached_pages() if self.host_cache is not None else ():
            states[page] = "cached"
        return states

    def free_pages(self) -> list[int]:
        return list(self._free)

    # -- invariants ------------------------------------------------------------------------------

    def check_invariants(self, holders: Iterable[Sequence]) -> None:
        """Asserts the rules above, given every sequence that holds pages (device or host)."""
        holders = list(holders)
        held = collections.Counter()
        host_held = collections.Counter()
        for seq in holders:
            pages, hosts = _held(seq.block_table), _held(seq.host_block_table)
            assert len(set(pages)) == len(pages), f"seq {seq.seq_id} holds a page twice: {seq.block_table}"
            assert not (pages and hosts), f"seq {seq.seq_id} holds device and host pages"
            held.update(pages)
            host_held.update(hosts)
        for page in range(self.num_pages):
            assert self._ref_counts[page] == held[page], (
                f"page {page}: refcount {self._ref_counts[page]} != {held[page]} holders")
        free = set(self._free)
        idle = set(self.prefix_cache.idle_pages()) if self.prefix_cache else set()
        live = set(held)
        assert len(free) == len(self._free), "a page is in the free deque twice"
        assert not free & live, f"pages both free and live: {sorted(free & live)}"
        assert not idle & live, f"pages both idle and live: {sorted(idle & live)}"
        assert not free & idle, f"pages both free and idle: {sorted(free & idle)}"
        assert free | idle | live == set(range(self.num_pages)), "pages lost from the pool"
        if self.prefix_cache is not None:
            self.prefix_cache.check_invariants()
            assert not free & self.prefix_cache.cached_pages(), "a free page is still in the prefix cache"
        assert all(n == 1 for n in host_held.values()), "a host page has two holders"
        host_free = set(self._host_free) | set(self._host_freed)
        host_cached = self.host_cache.cached_pages() if self.host_cache is not None else set()
        assert len(host_free) == len(self._host_free) + len(self._host_freed), "a host page is free twice"
        assert not host_free & set(host_held), "host pages both free and held"
        assert not host_cached & set(host_held), "host pages both cached and held by a swapped sequence"
        assert not host_cached & host_free, "host pages both cached and free"
        assert host_free | set(host_held) | host_cached == set(range(self.num_host_pages)), "host pages lost from the pool"
        if self.host_cache is not None:
            self.host_cache.check_invariants()
            assert set(self.host_cache.idle_pages()) == host_cached, "a host-cached page is not evictable"
        assert not self.window_released & live, "a held page is marked window-released"
