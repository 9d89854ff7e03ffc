"""The paged KV cache, what one of its pages is (`KVCacheSpec`), and one step's ragged batch, as pytrees
passed into jitted steps.

Shapes: T tokens in the step, S sequence slots, P pages per sequence, L layers,
N pages in the pool, page_size tokens per page, Hkv kv heads, D head dim.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from pallas_kernels import kv_quant

# The fewest tokens a step runs (padding included). With one token, XLA on the GPU rewrites every small
# projection as an elementwise multiply + reduce that writes the product, the weight's size, and reads it
# back; 2 or more tokens keep the GEMV (the measurement: bench/README.md).
MIN_STEP_TOKENS = 4


@struct.dataclass
class KVCache:
    """Per-layer page pools. k[l], v[l]: [N, page_size, Hkv, D]. Donate it into the step.

    Quantized pages (8-bit, `pallas_kernels.kv_quant`) carry k_scale[l], v_scale[l]: [N, page_size, Hkv]
    float32, one per (token, kv head); unquantized pages have none (empty tuples). Every leaf has the page
    axis first, so whatever moves pages (copy-on-write, swap, `jax.tree.map` over the cache) moves the
    scales with them.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    k_scale: tuple[jax.Array, ...] = ()
    v_scale: tuple[jax.Array, ...] = ()

    @property
    def quantized(self) -> bool:
        return bool(self.k_scale)

    def layers(self):
        """(k, v, k_scale, v_scale) of each layer; the scales are None for unquantized pages."""
        none = (None,) * len(self.k)
        return zip(self.k, self.v, self.k_scale or none, self.v_scale or none)

    @classmethod
    def from_layers(cls, layers) -> "KVCache":
        """The inverse of `layers()`: a list of (k, v, k_scale, v_scale), scales None or arrays."""
        k, v, ks, vs = (tuple(x) for x in zip(*layers))
        return cls(k=k, v=v, k_scale=() if ks[0] is None else ks, v_scale=() if vs[0] is None else vs)

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[0]

    @property
    def page_size(self) -> int:
        return self.k[0].shape[1]


@dataclasses.dataclass(frozen=True)
class KVCacheSpec:
    """What a KV page is: the one owner of its format and size, which the engine, prompt scoring,
    `jpaged.generate`, the sharding helpers and the backend selection all ask.

    A page holds `page_size` tokens of K and of V for every layer: `[page_size, Hkv, D]` per layer and
    tensor. Under tensor parallelism the kv heads are split over `kv_shards` devices (each holds
    Hkv / kv_shards of every page). An 8-bit `dtype` (`pallas_kernels.kv_quant.QUANTIZED_DTYPES`) makes
    the pages quantized: each also holds a float32 scale per (token, kv head). `page_scales` (one scale per
    page instead) is not implemented, so True is refused.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: jnp.dtype = jnp.dtype(jnp.bfloat16)
    kv_shards: int = 1
    page_scales: bool = False

    def __post_init__(self):
        for name in ("num_layers", "num_kv_heads", "head_dim", "page_size", "kv_shards"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"KVCacheSpec.{name} must be a positive integer, got {value!r}")
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        if self.num_kv_heads % self.kv_shards:
            raise ValueError(f"KVCacheSpec: {self.num_kv_heads} kv heads do not split over kv_shards="
                             f"{self.kv_shards} devices")
        if self.page_scales:
            raise ValueError("KVCacheSpec.page_scales: per-page scales are not implemented (quantized pages "
                             "have one scale per token and kv head)")
        if self.dtype.itemsize == 1 and not kv_quant.is_quantized(self.dtype):
            raise ValueError(f"KVCacheSpec.dtype: 8-bit pages must be one of "
                             f"{[str(d) for d in kv_quant.QUANTIZED_DTYPES]}, got {self.dtype}")

    @classmethod
    def for_model(cls, config, page_size: int, dtype, kv_shards: int = 1) -> "KVCacheSpec":
        """The pages of a model of `config` (a models.ModelConfig; under tensor parallelism the one with
        its kv heads repeated, `models.sharding.tp_model_config`)."""
        return cls(num_layers=config.num_layers, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                   page_size=page_size, dtype=dtype, kv_shards=kv_shards)

    @property
    def page_shape(self) -> tuple[int, int, int]:
        """[page_size, Hkv, D]: one layer's K (or V) of one page, all shards together."""
        return (self.page_size, self.num_kv_heads, self.head_dim)

    @property
    def quantized(self) -> bool:
        """Whether pages are 8-bit values with a float32 scale per (token, kv head)."""
        return kv_quant.is_quantized(self.dtype)

    @property
    def scale_shape(self) -> tuple[int, int]:
        """[page_size, Hkv]: one layer's K (or V) scales of one page, all shards together."""
        return (self.page_size, self.num_kv_heads)

    @property
    def bytes_per_page(self) -> int:
        """Device bytes of one page on one shard: K and V of every layer, with their scales."""
        heads = self.num_kv_heads // self.kv_shards
        per_token_head = self.head_dim * self.dtype.itemsize
        if self.quantized:
            per_token_head += kv_quant.SCALE_DTYPE.itemsize
        return 2 * self.num_layers * self.page_size * heads * per_token_head

    def pages_for(self, num_tokens: int) -> int:
        """Pages that hold `num_tokens` tokens of one sequence."""
        return -(-num_tokens // self.page_size)

    def create(self, num_pages: int, sharding=None, leading: tuple[int, ...] = ()) -> KVCache:
        """A zeroed pool of `num_pages` pages on the default device, or placed by `sharding` (one
        sharding, or a callable rank -> sharding for leaves of that rank). `leading`: extra leading axes
        (a data-parallel replica axis)."""
        def zeros(shape, dtype):
            shape = (*leading, num_pages, *shape)
            where = sharding(len(shape)) if callable(sharding) else sharding
            return jnp.zeros(shape, dtype, device=where) if where is not None else jnp.zeros(shape, dtype)

        def per_layer(shape, dtype):
            return tuple(zeros(shape, dtype) for _ in range(self.num_layers))

        if not self.quantized:
            return KVCache(k=per_layer(self.page_shape, self.dtype), v=per_layer(self.page_shape, self.dtype))
        return KVCache(k=per_layer(self.page_shape, self.dtype), v=per_layer(self.page_shape, self.dtype),
                       k_scale=per_layer(self.scale_shape, kv_quant.SCALE_DTYPE),
                       v_scale=per_layer(self.scale_shape, kv_quant.SCALE_DTYPE))

    def host_pool(self, num_pages: int) -> KVCache:
        """Host (numpy) arrays of `num_pages` pages, shaped as `create`'s, for pages swapped out of the device."""
        return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype),
                            jax.eval_shape(lambda: self.create(num_pages)))


@struct.dataclass
class StepInput:
    """One ragged batch: the new tokens of every scheduled sequence, flattened; every shape comes from a bucket."""

    token_ids: jax.Array     # [T] int32, new tokens of all sequences, flattened
    positions: jax.Array     # [T] int32
    cu_q_lens: jax.Array     # [S + 1] int32, boundaries of each sequence's new tokens
    kv_lens: jax.Array       # [S] int32, context length of each sequence after this step
    page_table: jax.Array    # [S, P] int32, logical page -> physical page
    slot_mapping: jax.Array  # [T] int32, page * page_size + offset of each new token; -1 = padding
    logits_index: jax.Array  # [S] int32, token whose hidden state gives each sequence's logits
    num_seqs: jax.Array      # [] int32, sequences that are real; the rest is padding
    # Static (part of the tree structure, so a jit cache key): a bound on the sequences with more than one
    # new token, which the engine's scheduler guarantees; the Mosaic prefill kernel sizes its work list by it.
    max_prefill_seqs: int | None = struct.field(pytree_node=False, default=None)
    # Multi-LoRA steps only: [T] int32, the device slot of each token's adapter (-1: the base model alone).
    lora_index: jax.Array | None = None

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]


def contiguous_step_input(token_ids, positions_start, page_size: int, num_pages: int,
                          page_offset: int = 0, all_logits: bool = False) -> StepInput:
    """A one-sequence StepInput over pages [page_offset, page_offset + num_pages) used in order.

    token_ids: [T] new tokens starting at position `positions_start`. Host-side helper for the simple
    single-sequence path and for tests.
    """
    token_ids = jnp.asarray(token_ids, jnp.int32)
    t = token_ids.shape[0]
    positions = positions_start + jnp.arange(t, dtype=jnp.int32)
    pages = page_offset + jnp.arange(num_pages, dtype=jnp.int32)
    slots = pages[positions // page_size] * page_size + positions % page_size
    return StepInput(
        token_ids=token_ids,
        positions=positions,
        cu_q_lens=jnp.array([0, t], jnp.int32),
        kv_lens=jnp.array([positions_start + t], jnp.int32),
        page_table=pages[None, :],
        slot_mapping=slots.astype(jnp.int32),
        logits_index=jnp.arange(t, dtype=jnp.int32) if all_logits else jnp.array([t - 1], jnp.int32),
        num_seqs=jnp.array(1, jnp.int32),
    )
