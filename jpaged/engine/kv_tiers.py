"""The data of the host and disk tiers of the KV cache: host page arrays and page files on disk.

Where it sits: the `BlockManager` decides which host page or disk file holds which prefix page (by its
chain key, the prefix cache's); this module holds the bytes. `HostPagePool` is the host RAM pool shared
by swap preemption and the host tier: per-layer numpy arrays, filled from the device asynchronously
(`copy_to_host_async`, completed by `drain()` before anyone reads). `DiskPageStore` keeps one file per
page under `dir/<model fingerprint>/`, so a new process on the same model finds them; each file carries
its chain entry and a checksum, and a file that does not verify is a miss (and is deleted). `PageTiers`
is what the block manager calls: spill a host page to disk, load a disk page into a host page.

File format: b"JPKV1\\n", a 4-byte little-endian header length, a JSON header (chain entry, dtype,
shape, payload checksum), then the page's bytes (`HostPagePool.page`: K, V and, for 8-bit pages, their
scales, of every layer).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np

from models.kv_cache import KVCacheSpec

MAGIC = b"JPKV1\n"
SUFFIX = ".kvpage"


def host_page_bytes(spec: KVCacheSpec) -> int:
    """Host bytes of one page: K and V of every layer, every kv head (all shards together)."""
    return spec.bytes_per_page * spec.kv_shards


def host_pages_for(spec: KVCacheSpec, gib: float) -> int:
    """Pages of `spec` that `gib` GiB of host RAM hold."""
    return int(gib * (1 << 30)) // host_page_bytes(spec)


def model_fingerprint(spec: KVCacheSpec, model_name: str, embedding=None) -> str:
    """A short hex id of (model, page format): pages on disk are only ever read back by the same model.

    `embedding`: the model's token embedding table; a few of its values go into the hash, so two
    checkpoints under one name (or random presets of another seed) do not share files."""
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps([model_name, spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.page_size,
                         str(spec.dtype)]).encode())
    if embedding is not None:
        h.update(np.asarray(embedding[:4].reshape(-1)[:1024], np.float32).tobytes())
    return h.hexdigest()


class HostPagePool:
    """Host copies of KV pages: `pages`, a KVCache of numpy arrays [num_pages, ...] (`KVCacheSpec.host_pool`),
    so an 8-bit cache's scales live beside their pages here too."""

    def __init__(self, spec: KVCacheSpec, num_pages: int):
        self.spec = spec
        self.num_pages = num_pages
        self.pages = spec.host_pool(num_pages)
        self._leaves = jax.tree.leaves(self.pages)
        self._lock = threading.RLock()  # the runner's fetch thread reads while the engine thread writes
        self._pending: list[tuple[np.ndarray, list]] = []  # device reads not landed yet, in order

    @property
    def page_nbytes(self) -> int:
        """Bytes of one page over every leaf (pages and scales of every layer)."""
        return sum(leaf[0].nbytes for leaf in self._leaves) if self.num_pages else 0

    def write_from_device(self, pages, data) -> None:
        """Starts copying a device KVCache (leaves [B >= len(pages), ...]) into host pages `pages`; its
        first len(pages) rows land on drain()."""
        leaves = jax.tree.leaves(data)
        for x in leaves:
            x.copy_to_host_async()
        with self._lock:
            self._pending.append((np.asarray(pages, np.int64), leaves))

    def drain(self) -> None:
        """Completes every started device read, in the order they were started."""
        with self._lock:
            for pages, leaves in self._pending:
                for pool, x in zip(self._leaves, leaves):
                    pool[pages] = np.asarray(x)[:len(pages)]
            self._pending.clear()

    def read(self, pages):
        """Copies of host pages `pages` (a KVCache of numpy [n, ...]), safe to hand to an asynchronous transfer."""
        with self._lock:
            self.drain()
            idx = np.asarray(pages, np.int64)
            return jax.tree.map(lambda x: x[idx], self.pages)

    def write(self, pages, data) -> None:
        with self._lock:
            self.drain()
            idx = np.asarray(pages, np.int64)
            for pool, x in zip(self._leaves, jax.tree.leaves(data)):
                pool[idx] = x

    def page(self, page: int) -> np.ndarray:
        """One page as flat bytes (uint8 [page_nbytes]): every leaf's row, in leaf order."""
        with self._lock:
            self.drain()
            return np.concatenate([np.ascontiguousarray(leaf[page]).view(np.uint8).reshape(-1)
                                   for leaf in self._leaves])

    def set_page(self, page: int, data: np.ndarray) -> None:
        with self._lock:
            self.drain()
            offset = 0
            for leaf in self._leaves:
                n = leaf[page].nbytes
                leaf[page] = data[offset:offset + n].view(leaf.dtype).reshape(leaf.shape[1:])
                offset += n


@dataclasses.dataclass(frozen=True)
class ChainEntry:
    """What a page's chain key stands for; a page file must match it exactly to be a hit."""

    key: int
    parent_key: int | None
    adapter_id: int
    token_ids: tuple[int, ...]


class DiskPageStore:
    """Page files under `directory/<fingerprint>/`, at most `capacity_bytes`, dropped least recently used
    first. Writes run on one background thread; a read of a page being written waits for it."""

    def __init__(self, directory: str | os.PathLike, fingerprint: str, capacity_bytes: int,
                 spec: KVCacheSpec):
        if capacity_bytes < 1:
            raise ValueError(f"kv_disk_cache_gb must be > 0, got {capacity_bytes} bytes")
        self.dir = Path(directory) / fingerprint
        self.dir.mkdir(parents=True, exist_ok=True)
        self.capacity_bytes = capacity_bytes
        self.spec = spec
        self.shape = (sum(leaf[0].nbytes for leaf in jax.tree.leaves(spec.host_pool(1))),)  # HostPagePool.page
        self._lock = threading.Lock()
        self._index: collections.OrderedDict[int, int] = collections.OrderedDict()  # key -> bytes, oldest first
        self._writing: dict[int, Future] = {}
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-disk")
        files = []
        for path in self.dir.glob("*" + SUFFIX):
            try:
                files.append((path.stat().st_mtime_ns, int(path.stem, 16), path.stat().st_size))
            except (OSError, ValueError):
                continue
        for _, key, size in sorted(files):
            self._index[key] = size
        self.num_bytes = sum(self._index.values())
        self._evict_to(self.capacity_bytes)

    def path(self, key: int) -> Path:
        return self.dir / f"{key:016x}{SUFFIX}"

    def __contains__(self, key: int) -> bool:
        return key in self._index

    @property
    def num_pages(self) -> int:
        return len(self._index)

    def keys(self) -> list[int]:
        return list(self._index)

    def put(self, entry: ChainEntry, data: np.ndarray) -> int:
        """Queues the page's file (data: `HostPagePool.page`'s bytes); the bytes it will take (0: not kept)."""
        payload = np.ascontiguousarray(data).view(np.uint8).tobytes()
        header = json.dumps({"parent_key": entry.parent_key, "adapter_id": entry.adapter_id,
                             "token_ids": list(entry.token_ids), "dtype": str(self.spec.dtype),
                             "shape": list(self.shape), "checksum": hashlib.blake2b(payload, digest_size=16).hexdigest()})
        blob = MAGIC + struct.pack("<I", len(header)) + header.encode() + payload
        if len(blob) > self.capacity_bytes or entry.key in self._index:
            return 0
        self._evict_to(self.capacity_bytes - len(blob))
        self._index[entry.key] = len(blob)
        self.num_bytes += len(blob)
        self._writing[entry.key] = self._writer.submit(self._write, entry.key, blob)
        return len(blob)

    def _write(self, key: int, blob: bytes) -> None:
        path = self.path(key)
        tmp = path.with_suffix(f".tmp{threading.get_ident()}")
        with open(tmp, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)  # a reader sees the whole file or none

    def _wait(self, key: int) -> None:
        future = self._writing.pop(key, None)
        if future is not None:
            try:
                future.result()
            except OSError:
                self._forget(key)

    def get(self, entry: ChainEntry) -> np.ndarray | None:
        """The page's data when its file exists, matches `entry` and verifies; else None (bad files go)."""
        if entry.key not in self._index:
            return None
        self._wait(entry.key)
        data = self._read(entry)
        if data is None:
            self.drop(entry.key)
            return None
        self._index.move_to_end(entry.key)
        with contextlib.suppress(OSError):
            os.utime(self.path(entry.key))  # the LRU order a new process rebuilds
        return data

    def _read(self, entry: ChainEntry) -> np.ndarray | None:
        try:
            blob = self.path(entry.key).read_bytes()
        except OSError:
            return None
        if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 4:
            return None
        (n,) = struct.unpack_from("<I", blob, len(MAGIC))
        start = len(MAGIC) + 4
        try:
            header = json.loads(blob[start:start + n])
        except ValueError:
            return None
        payload = blob[start + n:]
        if (header.get("parent_key"), header.get("adapter_id"), tuple(header.get("token_ids", ()))) != (
                entry.parent_key, entry.adapter_id, tuple(entry.token_ids)):
            return None  # a hash collision or another chain: a miss, never a wrong page
        if header.get("dtype") != str(self.spec.dtype) or header.get("shape") != list(self.shape):
            return None
        if hashlib.blake2b(payload, digest_size=16).hexdigest() != header.get("checksum"):
            return None  # truncated or corrupted
        return np.frombuffer(payload, np.uint8).reshape(self.shape)

    def drop(self, key: int) -> None:
        self._wait(key)
        self._forget(key)
        with contextlib.suppress(OSError):
            self.path(key).unlink()

    def _forget(self, key: int) -> None:
        size = self._index.pop(key, None)
        if size is not None:
            self.num_bytes -= size

    def _evict_to(self, limit: int) -> None:
        while self._index and self.num_bytes > limit:
            self.drop(next(iter(self._index)))

    def flush(self) -> None:
        """Waits for every queued write (a process about to exit calls it)."""
        for key in list(self._writing):
            self._wait(key)


@dataclasses.dataclass
class TierCounters:
    """Pages moved between tiers since start (bytes: times the host page size)."""

    host_hits: int = 0        # prefix pages found on the host tier
    disk_hits: int = 0        # prefix pages found on the disk tier
    offloaded: int = 0        # device -> host (an evicted cached page)
    fetched: int = 0          # host -> device (a prefix hit)
    spilled: int = 0          # host -> disk
    loaded: int = 0           # disk -> host
    host_dropped: int = 0     # pages the host tier let go without a disk copy, or could not take (all in use)
    swapped_out: int = 0
    swapped_in: int = 0


class PageTiers:
    """The block manager's handle on the tiers' data: the host pool and, optionally, the disk store."""

    def __init__(self, host: HostPagePool, disk: DiskPageStore | None = None):
        self.host = host
        self.disk = disk

    def on_disk(self, key: int) -> bool:
        return self.disk is not None and key in self.disk

    def spill(self, host_page: int, entry: ChainEntry) -> bool:
        """Copies a host page to disk (unless it is there already); False: not kept."""
        if self.disk is None:
            return False
        if entry.key in self.disk:
            return True
        return self.disk.put(entry, self.host.page(host_page)) > 0

    def load(self, entry: ChainEntry, host_page: int) -> bool:
        """Reads a disk page into a host page; False when the file is missing or does not verify."""
        data = self.disk.get(entry) if self.disk is not None else None
        if data is None:
            return False
        self.host.set_page(host_page, data)
        return True


def build(config, spec: KVCacheSpec, model) -> tuple[HostPagePool, PageTiers | None]:
    """The host pool (swap pages + host tier) of an engine config, and its tiers (None: no host tier)."""
    host_tier_pages = host_pages_for(spec, config.kv_host_cache_gb)
    if config.kv_host_cache_gb > 0 and host_tier_pages < 1:
        raise ValueError(f"kv_host_cache_gb={config.kv_host_cache_gb} holds no page of "
                         f"{host_page_bytes(spec)} bytes; give at least {host_page_bytes(spec) / (1 << 30):.6f}")
    pool = HostPagePool(spec, config.num_host_kv_blocks + host_tier_pages)
    if config.kv_host_cache_gb <= 0:
        return pool, None
    disk = None
    if config.kv_disk_cache_dir:
        embed = getattr(getattr(model, "embed_tokens", None), "embedding", None)
        fingerprint = model_fingerprint(spec, config.model, embed[...] if embed is not None else None)
        disk = DiskPageStore(config.kv_disk_cache_dir, fingerprint, int(config.kv_disk_cache_gb * (1 << 30)), spec)
    return pool, PageTiers(pool, disk)


def tier_stats(block_manager, spec: KVCacheSpec) -> dict:
    """The tiers' sizes, hits and page moves (pages; bytes = pages x host_page_bytes) for stats()."""
    bm, c = block_manager, block_manager.counters
    page_bytes = host_page_bytes(spec)
    page_tokens = bm.page_size
    disk = bm.tiers.disk if bm.tiers is not None else None
    host_cached = bm.host_cache.num_idle if bm.host_cache is not None else 0
    return dict(kv_host_pages_total=bm.num_host_pages, kv_host_pages_cached=host_cached,
                kv_disk_pages=disk.num_pages if disk else 0, kv_disk_bytes=disk.num_bytes if disk else 0,
                kv_host_hit_pages=c.host_hits, kv_disk_hit_pages=c.disk_hits, kv_page_bytes=page_bytes,
                kv_page_tokens=page_tokens,
                **{f"kv_pages_{name}": getattr(c, name) for name in
                   ("offloaded", "fetched", "spilled", "loaded", "host_dropped", "swapped_out", "swapped_in")})
