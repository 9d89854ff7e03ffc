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

API (the scheduler's):
  BlockManager(num_pages, page_size, *, num_host_pages=0, enable_prefix_caching=True, sliding_window=None)
  num_free_pages, num_used_pages, num_free_host_pages, ref_count(page)
  cached_prefix(seq) -> list[int]; admit(seq, cached_pages); pages_to_admit(seq, cached_pages, num_tokens)
  pages_to_grow(seq, num_tokens); grow(seq, num_tokens) -> copies [(src, dst)]
  fork(parent, child); release(seq); truncate(seq, num_tokens); register_full_pages(seq); release_outside_window(seq)
  can_swap_out(seq); swap_out(seq) -> [(device, host)]; pages_to_swap_in(seq); swap_in(seq) -> [(host, device)]
  check_invariants(holders)
"""
from __future__ import annotations

import collections
from typing import Iterable

from jpaged.engine.prefix_cache import PrefixCache
from jpaged.engine.sequence import Sequence


def _held(table: list[int]) -> list[int]:
    return [p for p in table if p >= 0]


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, *, num_host_pages: int = 0,
                 enable_prefix_caching: bool = True, sliding_window: int | None = None):
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
        return len(self._host_free)

    def ref_count(self, page: int) -> int:
        return self._ref_counts[page]

    # -- single pages ----------------------------------------------------------------------------

    def _take(self) -> int:
        page = self._free.popleft() if self._free else self.prefix_cache.evict()
        assert self._ref_counts[page] == 0, page
        self._ref_counts[page] = 1
        return page

    def _hold(self, page: int) -> None:
        if self._ref_counts[page] == 0:
            self.prefix_cache.unpark(page)
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
            seq.block_table[i] = -1
            i -= 1

    # -- swap ------------------------------------------------------------------------------------

    def can_swap_out(self, seq: Sequence) -> bool:
        return len(_held(seq.block_table)) <= len(self._host_free)

    def swap_out(self, seq: Sequence) -> list[tuple[int, int]]:
        """Moves seq's pages to private host pages; returns the (device, host) copies to perform."""
        assert self.can_swap_out(seq), seq.seq_id
        pairs, host_table = [], []
        for page in seq.block_table:
            host = self._host_free.popleft() if page >= 0 else -1
            host_table.append(host)
            if page >= 0:
                pairs.append((page, host))
        self._drop_all(seq.block_table)
        seq.block_table, seq.host_block_table = [], host_table
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
                self._host_free.append(host)
        seq.block_table, seq.host_block_table = table, []
        return pairs

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
        host_free = set(self._host_free)
        assert len(host_free) == len(self._host_free), "a host page is in the free deque twice"
        assert not host_free & set(host_held), "host pages both free and held"
        assert host_free | set(host_held) == set(range(self.num_host_pages)), "host pages lost from the pool"
