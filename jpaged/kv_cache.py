"""The paged KV cache and one step's ragged batch, as pytrees passed into jitted steps.

Shapes: T tokens in the step, S sequence slots, P pages per sequence, L layers,
N pages in the pool, page_size tokens per page, Hkv kv heads, D head dim.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


# The fewest tokens a step runs (padding included). With one token, XLA on the GPU rewrites every
# projection under 10M weights as an elementwise multiply + reduce that writes the product, the
# weight's size, and reads it back: on the H200 a Llama-3-8B batch-1 step took 5.6 ms with one token
# and 4.5 with 2 or 4 (bench/README.md "Session 5").
MIN_STEP_TOKENS = 4


@struct.dataclass
class KVCache:
    """Per-layer page pools. k[l], v[l]: [N, page_size, Hkv, D]. Donate it into the step."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[0]

    @property
    def page_size(self) -> int:
        return self.k[0].shape[1]

    @classmethod
    def create(cls, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
               head_dim: int, dtype=jnp.bfloat16, sharding=None) -> "KVCache":
        shape = (num_pages, page_size, num_kv_heads, head_dim)

        def zeros():
            return jnp.zeros(shape, dtype, device=sharding) if sharding is not None else jnp.zeros(shape, dtype)

        return cls(k=tuple(zeros() for _ in range(num_layers)), v=tuple(zeros() for _ in range(num_layers)))

    @staticmethod
    def bytes_per_page(num_layers: int, page_size: int, num_kv_heads: int, head_dim: int,
                       dtype=jnp.bfloat16) -> int:
        return 2 * num_layers * page_size * num_kv_heads * head_dim * jnp.dtype(dtype).itemsize


@struct.dataclass
class StepInput:
    """One ragged batch (DESIGN.md "StepInput"); every shape comes from a bucket."""

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
