"""PrefixCache: full pages of K/V found again by a hash chain over their tokens; LRU of idle ones.

Where it sits: owned by the `BlockManager`. When a page of a sequence is full and computed, the block
manager offers it here under its chain key; when a new sequence is admitted, the block manager walks
the chain of its prompt's pages and reuses every page found, so those tokens are never recomputed.

Keys: `key(page i) = hash(key(page i-1), adapter_id, tokens of page i)` (blake2b, 64 bits, stable
across processes). The hash only finds a candidate: an entry also stores its parent key, adapter id
and tokens, and `lookup` checks all three, so a hit is exact by induction along the chain.

A cached page with no holder is "idle": it stays in the cache, reusable, until the block manager runs
out of free pages and `evict()` takes the least recently released idle page.

API:
  PrefixCache.page_key(parent_key, token_ids, adapter_id) -> int
  lookup(key, parent_key, token_ids, adapter_id) -> page | None
  insert(key, parent_key, token_ids, adapter_id, page) -> bool (False: key already cached)
  is_cached(page), park(page) (now idle, most recent), unpark(page) (held again), evict() -> page
  entry(page) -> (key, parent_key, adapter_id, token_ids); oldest_idle() -> page | None; evict_page(page); iter_idle()
  num_idle, idle_pages(), cached_pages()
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
from array import array
from typing import Sequence as Seq


@dataclasses.dataclass(frozen=True)
class _Entry:
    key: int
    parent_key: int | None
    adapter_id: int
    token_ids: tuple[int, ...]


class PrefixCache:
    def __init__(self):
        self._page_of_key: dict[int, int] = {}
        self._entry_of_page: dict[int, _Entry] = {}
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # oldest first

    @staticmethod
    def page_key(parent_key: int | None, token_ids: Seq[int], adapter_id: int = 0) -> int:
        h = hashlib.blake2b(digest_size=8)
        h.update(b"root" if parent_key is None else parent_key.to_bytes(8, "little"))
        h.update(adapter_id.to_bytes(8, "little", signed=True))
        h.update(array("q", token_ids).tobytes())
        return int.from_bytes(h.digest(), "little")

    def lookup(self, key: int, parent_key: int | None, token_ids: Seq[int], adapter_id: int = 0) -> int | None:
        page = self._page_of_key.get(key)
        if page is None:
            return None
        entry = self._entry_of_page[page]
        if (entry.parent_key, entry.adapter_id, entry.token_ids) != (parent_key, adapter_id, tuple(token_ids)):
            return None  # a hash collision: a miss, never a wrong page
        return page

    def insert(self, key: int, parent_key: int | None, token_ids: Seq[int], adapter_id: int, page: int) -> bool:
        """Registers a held, full, computed page; False when the key (or the page) is cached already."""
        if key in self._page_of_key or page in self._entry_of_page:
            return False
        self._page_of_key[key] = page
        self._entry_of_page[page] = _Entry(key, parent_key, adapter_id, tuple(token_ids))
        return True

    def is_cached(self, page: int) -> bool:
        return page in self._entry_of_page

    def park(self, page: int) -> None:
        """The page's last holder let go: keep it reusable, as the most recently used idle page."""
        assert page in self._entry_of_page and page not in self._idle, page
        self._idle[page] = None

    def unpark(self, page: int) -> None:
        """An idle page is held again (a prefix hit)."""
        del self._idle[page]

    def entry(self, page: int) -> _Entry:
        """The chain entry a cached page stands for."""
        return self._entry_of_page[page]

    def oldest_idle(self) -> int | None:
        """The idle page evict() would take next, or None."""
        return next(iter(self._idle), None)

    def evict(self) -> int:
        """Forgets the least recently used idle page and returns it, ready for new contents."""
        page, _ = self._idle.popitem(last=False)
        self.evict_page(page)
        return page

    def evict_page(self, page: int) -> None:
        """Forgets a cached page that is not idle (the caller unparked it)."""
        assert page not in self._idle, page
        entry = self._entry_of_page.pop(page)
        del self._page_of_key[entry.key]

    @property
    def num_idle(self) -> int:
        return len(self._idle)

    def iter_idle(self):
        """Idle pages, least recently used first, without a copy (do not change the cache meanwhile)."""
        return iter(self._idle)

    def idle_pages(self) -> list[int]:
        """Idle pages, least recently used first (the eviction order)."""
        return list(self._idle)

    def cached_pages(self) -> set[int]:
        return set(self._entry_of_page)

    def check_invariants(self) -> None:
        assert len(self._page_of_key) == len(self._entry_of_page)
        for page, entry in self._entry_of_page.items():
            assert self._page_of_key[entry.key] == page, (page, entry.key)
        assert set(self._idle) <= set(self._entry_of_page)
