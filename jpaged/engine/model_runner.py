"""ModelRunner: a ScheduledBatch -> one ragged StepInput (bucketed shapes) -> one jitted step -> tokens.

Where it sits: Scheduler.schedule() decides who runs; the runner packs their new tokens into
padded numpy arrays, runs `_step` (model + sampling, the KV cache donated) and hands the sampled
tokens back to the engine. It also performs the page copies the block manager asks for
(copy-on-write, swap to and from host memory).

Shapes come from buckets (powers of two): T tokens, S sequence rows (also the sampler's rows),
P pages per row. The jitted step compiles once per (T, S, P, sampler flags) seen; `warmup()` can
compile the common ones up front.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jpaged import sampling, sharding
from jpaged.engine import packing
from jpaged.kv_cache import KVCache, StepInput
from jpaged.sampling_params import SamplingParams


def bucket(n: int, minimum: int, maximum: int | None = None) -> int:
    """The smallest power of two >= n (and >= minimum), capped at `maximum` when given."""
    b = max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))
    return b if maximum is None else min(b, max(maximum, n))


@dataclasses.dataclass
class SampleRow:
    """One token to sample: from the logits of `token_index` (an index into the step's tokens)."""

    token_index: int
    seq: object  # jpaged.engine.sequence.Sequence whose params, seed and history drive sampling


def make_step_fn(graphdef, state_treedef):
    """The pure step over the model's flat weight list. graphdef and treedef are closed over, not jit
    arguments: hashing a static NNX graphdef on every call cost ~10 ms of host time per step."""

    def step_fn(weights, kv_cache: KVCache, int_buf, float_buf, base_key, *, layout, attn_impl: str,
                num_top_logprobs: int):
        model = nnx.merge(graphdef, jax.tree.unflatten(state_treedef, weights))
        step, tensors, step_counter = packing.unpack(int_buf, float_buf, layout)
        key = jax.random.fold_in(base_key, step_counter)  # a fresh key per step, no host-side split
        logits, kv_cache = model(kv_cache, step, attn_impl=attn_impl)
        out = sampling.sample(logits, tensors, key, num_top_logprobs=num_top_logprobs)
        return packing.pack_outputs(out.tokens, out.logprobs, out.ranks, out.top_ids, out.top_logprobs), kv_cache

    return step_fn


def _copy_pages(kv_cache: KVCache, src: jax.Array, dst: jax.Array) -> KVCache:
    return KVCache(k=tuple(k.at[dst].set(k[src]) for k in kv_cache.k),
                   v=tuple(v.at[dst].set(v[src]) for v in kv_cache.v))


def _read_pages(kv_cache: KVCache, pages: jax.Array):
    return [k[pages] for k in kv_cache.k], [v[pages] for v in kv_cache.v]


def _write_pages(kv_cache: KVCache, pages: jax.Array, k_data, v_data) -> KVCache:
    return KVCache(k=tuple(k.at[pages].set(d) for k, d in zip(kv_cache.k, k_data)),
                   v=tuple(v.at[pages].set(d) for v, d in zip(kv_cache.v, v_data)))


class ModelRunner:
    def __init__(self, model, *, num_pages: int, page_size: int, max_model_len: int,
                 max_num_batched_tokens: int, max_num_seqs: int, num_host_pages: int = 0,
                 attn_impl: str = "reference", kv_dtype=None, seed: int = 0, tensor_parallel_size: int = 1):
        # Tensor parallel: weights and pages split over a "model" mesh axis, attention per shard
        # (jpaged/sharding.py); the step is traced under the mesh.
        self.mesh = sharding.make_mesh(tensor_parallel_size) if tensor_parallel_size > 1 else None
        if self.mesh is not None:
            model = sharding.shard_model(model, self.mesh)
        cfg = model.config
        self.model_config = cfg
        self.page_size = page_size
        self.num_pages = num_pages
        self.max_pages_per_seq = -(-max_model_len // page_size)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.attn_impl = attn_impl
        self.base_key = jax.random.PRNGKey(seed)
        graphdef, state = nnx.split(model)
        self.weights, treedef = jax.tree.flatten(state)
        self.kv_cache = (model.new_kv_cache(num_pages, page_size, kv_dtype) if self.mesh is None
                         else sharding.new_kv_cache(model, self.mesh, num_pages, page_size, kv_dtype))
        page_shape = (num_host_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
        kv_np_dtype = self.kv_cache.k[0].dtype
        self.host_k = [np.zeros(page_shape, kv_np_dtype) for _ in range(cfg.num_layers)]
        self.host_v = [np.zeros(page_shape, kv_np_dtype) for _ in range(cfg.num_layers)]
        self._jit_step = jax.jit(make_step_fn(graphdef, treedef),
                                 static_argnames=("layout", "attn_impl", "num_top_logprobs"),
                                 donate_argnames=("kv_cache",))
        self._jit_copy = jax.jit(_copy_pages, donate_argnames=("kv_cache",))
        self._jit_read = jax.jit(_read_pages)
        self._jit_write = jax.jit(_write_pages, donate_argnames=("kv_cache",))

    def _mesh_context(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    @property
    def num_compilations(self) -> int:
        return self._jit_step._cache_size()

    # -- page movement ---------------------------------------------------------------------------

    def copy_pages(self, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        src, dst = (jnp.asarray(np.array(x, np.int32)) for x in zip(*pairs))
        self.kv_cache = self._jit_copy(self.kv_cache, src, dst)

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """Device page -> host page, for each (device, host) pair."""
        if not pairs:
            return
        dev, host = (np.array(x, np.int32) for x in zip(*pairs))
        k_data, v_data = jax.device_get(self._jit_read(self.kv_cache, jnp.asarray(dev)))
        for layer in range(len(self.host_k)):
            self.host_k[layer][host] = k_data[layer]
            self.host_v[layer][host] = v_data[layer]

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """Host page -> device page, for each (host, device) pair."""
        if not pairs:
            return
        host, dev = (np.array(x, np.int32) for x in zip(*pairs))
        k_data = [jnp.asarray(h[host]) for h in self.host_k]
        v_data = [jnp.asarray(h[host]) for h in self.host_v]
        self.kv_cache = self._jit_write(self.kv_cache, jnp.asarray(dev), k_data, v_data)

    # -- the step --------------------------------------------------------------------------------

    def token_buckets(self) -> list[int]:
        # Powers of four: each bucket costs a compile (~9 s for Llama-3-8B on the H100), and padding a
        # decode batch up to 4x costs little while the step is bound by reading the weights.
        buckets, t = [], 16
        while t < self.max_num_batched_tokens:
            buckets.append(t)
            t *= 4
        return buckets + [self.max_num_batched_tokens]

    def page_buckets(self) -> list[int]:
        # The kernels read only up to kv_lens, so P costs them nothing: one bucket. The jnp reference
        # gathers all P pages per token, so on it P follows the batch's longest sequence.
        if self.attn_impl != "reference":
            return [self.max_pages_per_seq]
        buckets, p = [], 4
        while p < self.max_pages_per_seq:
            buckets.append(p)
            p *= 2
        return buckets + [self.max_pages_per_seq]

    def shape_for(self, num_tokens: int, num_rows: int, max_pages: int) -> tuple[int, int, int]:
        """(T, S, P) buckets. S follows T (a step has at most T sequences with tokens, plus n > 1
        sample rows), so the step compiles once per (T, P) and not per (T, S, P)."""
        t = next((b for b in self.token_buckets() if b >= num_tokens), num_tokens)
        s = max(min(t, self.max_num_seqs), bucket(num_rows, 4))
        p = next(b for b in self.page_buckets() if b >= max_pages)
        return t, s, p

    def warmup(self) -> None:
        """Compiles the step for every (T, P) bucket with default sampling, so serving never waits."""
        for t in self.token_buckets():
            for p in self.page_buckets():
                _, s, _ = self.shape_for(t, 1, p)
                step = StepInput(
                    token_ids=np.zeros(t, np.int32), positions=np.zeros(t, np.int32),
                    cu_q_lens=np.zeros(s + 1, np.int32), kv_lens=np.zeros(s, np.int32),
                    page_table=np.zeros((s, p), np.int32), slot_mapping=np.full(t, -1, np.int32),
                    logits_index=np.zeros(s, np.int32), num_seqs=np.int32(0))
                self._run(step, [], 0, [])

    def build_step_input(self, entries, sample_rows: list[SampleRow]) -> StepInput:
        """Packs scheduled entries (seq, start, num_tokens) into padded numpy arrays."""
        num_tokens = sum(e.num_tokens for e in entries)
        max_pages = max((-(-(e.start + e.num_tokens) // self.page_size) for e in entries), default=1)
        t, s, p = self.shape_for(num_tokens, max(len(entries), len(sample_rows)), max_pages)

        token_ids = np.zeros(t, np.int32)
        positions = np.zeros(t, np.int32)
        slot_mapping = np.full(t, -1, np.int32)
        cu_q_lens = np.full(s + 1, num_tokens, np.int32)
        kv_lens = np.zeros(s, np.int32)
        page_table = np.zeros((s, p), np.int32)
        logits_index = np.zeros(s, np.int32)
        offset = 0
        for i, e in enumerate(entries):
            seq, n = e.seq, e.num_tokens
            cu_q_lens[i] = offset
            pos = np.arange(e.start, e.start + n, dtype=np.int32)
            table = np.asarray(seq.block_table, np.int32)
            token_ids[offset:offset + n] = seq.token_ids[e.start:e.start + n]
            positions[offset:offset + n] = pos
            slot_mapping[offset:offset + n] = table[pos // self.page_size] * self.page_size + pos % self.page_size
            kv_lens[i] = e.start + n
            used = min(len(table), p)
            page_table[i, :used] = np.maximum(table[:used], 0)  # -1: released by the window, never read
            offset += n
        for r, row in enumerate(sample_rows):
            logits_index[r] = row.token_index
        return StepInput(token_ids=token_ids, positions=positions, cu_q_lens=cu_q_lens, kv_lens=kv_lens,
                         page_table=page_table, slot_mapping=slot_mapping, logits_index=logits_index,
                         num_seqs=np.int32(len(entries)))

    def execute(self, entries, sample_rows: list[SampleRow], step_counter: int):
        """Runs one step; returns the sampler's outputs for the real rows, as numpy arrays.

        Rows without a seed draw from fold_in(the runner's key, step_counter)."""
        step = self.build_step_input(entries, sample_rows)
        out = self._run(step, [row.seq for row in sample_rows], step_counter,
                        [row.seq.sampling_params for row in sample_rows])
        return jax.tree.map(lambda x: x[:len(sample_rows)], out)

    def _run(self, step: StepInput, seqs, step_counter: int, params: list[SamplingParams]):
        penalties = any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0
                        for p in params)
        tensors = sampling.SamplingTensors.from_params(
            params, num_rows=step.logits_index.shape[0], vocab_size=self.model_config.vocab_size,
            output_positions=[seq.num_output_tokens for seq in seqs],
            prompt_token_ids=[seq.token_ids[:seq.num_prompt_tokens] for seq in seqs] if penalties else None,
            output_token_ids=[seq.output_token_ids for seq in seqs] if penalties else None)
        # Two sizes only, so logprobs requests do not multiply compilations.
        top = 0 if all(p.logprobs is None and not p.use_beam_search for p in params) else SamplingParams.MAX_LOGPROBS
        int_buf, float_buf, layout = packing.pack((step, tensors, np.int32(step_counter)))
        with self._mesh_context():
            out, self.kv_cache = self._jit_step(self.weights, self.kv_cache, int_buf, float_buf, self.base_key,
                                                layout=layout, attn_impl=self.attn_impl, num_top_logprobs=top)
        return sampling.SamplerOutput(**packing.unpack_outputs(np.asarray(out)))
