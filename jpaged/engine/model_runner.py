"""ModelRunner: a ScheduledBatch -> one ragged StepInput (bucketed shapes) -> one jitted step -> tokens.

Where it sits: Scheduler.schedule() decides who runs; the runner packs their new tokens into
padded numpy arrays, runs `_step` (model + sampling, the KV cache donated) and hands the sampled
tokens back to the engine. It also performs the page copies the block manager asks for
(copy-on-write, swap to and from host memory, the host tier's offloads and fetches).

Shapes come from buckets (powers of two): T tokens, S sequence rows (also the sampler's rows),
P pages per row. The jitted step compiles once per (T, P, sampler tier) (jpaged/engine/step_variants.py
lists them); `warmup()` compiles them all up front. A step that scores prompt positions (prompt
logprobs, jpaged/engine/prompt_logprobs.py) takes their logits after the sample rows' and returns
their scores after the samples.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jpaged import sampling, sharding
from jpaged.engine import packing, prompt_logprobs, step_variants
from jpaged.engine.expert_load import ExpertLoad
from jpaged.engine.kv_tiers import HostPagePool
from jpaged.sampling_params import SamplingParams
from models import fp8_linear
from models.kv_cache import MIN_STEP_TOKENS, KVCache, KVCacheSpec, StepInput
from models.sharding import tp_model_config
from pallas_kernels import Backend
from pallas_kernels.kv_quant import resolve_kv_cache_dtype


def bucket(n: int, minimum: int, maximum: int | None = None) -> int:
    """The smallest power of two >= n (and >= minimum), capped at `maximum` when given."""
    b = max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))
    return b if maximum is None else min(b, max(maximum, n))


def token_buckets(max_num_batched_tokens: int) -> list[int]:
    """The token counts a step is padded to: 4, 16, 64, 256, then powers of two, then the budget.

    Each bucket costs a compile. Up to 256 tokens, powers of four: padding a decode batch up to 4x costs
    little while the step is bound by reading the weights. Past 256 the GEMMs are compute-bound, so
    padding costs its full FLOPs: powers of two. The smallest is MIN_STEP_TOKENS (4), not 1 (see there)
    nor 16: each padding token costs a little in the attention and in the per-layer all-reduces under
    tensor parallelism (the measurements: bench/README.md).
    """
    buckets, t = [], MIN_STEP_TOKENS
    while t < max_num_batched_tokens:
        buckets.append(t)
        t *= 4 if t < 256 else 2
    return buckets + [max_num_batched_tokens]


@dataclasses.dataclass
class SampleRow:
    """One token to sample: from the logits of `token_index` (an index into the step's tokens)."""

    token_index: int
    seq: object  # jpaged.engine.sequence.Sequence whose params, seed and history drive sampling


@dataclasses.dataclass
class InFlight:
    """A launched step: its outputs still on the device (reading them waits for the step)."""

    packed: jax.Array  # [S + R, 3 + 2K] int32, packing.pack_outputs: S sample rows, then R scored rows
    tokens: jax.Array  # [max_pending_rows] int32, the sampled tokens: where the next step finds its pending ones
    num_rows: int
    num_sample_rows: int = 0  # S, where the scored rows start
    num_scored: int = 0  # real scored rows (the plan's)
    host: np.ndarray | None = None  # `packed` once read back
    expert_tokens: jax.Array | None = None  # MoE: [MoE layers, X] int32 tokens routed to each expert


def make_step_fn(graphdef, state_treedef, max_pending_rows: int):
    """The pure step over the model's flat weight list. graphdef and treedef are closed over, not jit
    arguments: hashing a static NNX graphdef on every call costs milliseconds of host time per step.

    `token_src[t] >= 0` takes token t from the previous step's sampled tokens (`prev_tokens`, still on
    the device) instead of `step.token_ids[t]`: how a step is launched before the one it follows has
    been read back (async scheduling)."""

    def step_fn(weights, kv_cache: KVCache, int_buf, float_buf, base_key, prev_tokens, lora=None, *, layout,
                backend: Backend, num_top_logprobs: int):
        model = nnx.merge(graphdef, jax.tree.unflatten(state_treedef, weights))
        step, tensors, step_counter, token_src, score_targets = packing.unpack(int_buf, float_buf, layout)
        token_ids = jnp.where(token_src >= 0, prev_tokens[jnp.maximum(token_src, 0)], step.token_ids)
        step = dataclasses.replace(step, token_ids=token_ids)
        key = jax.random.fold_in(base_key, step_counter)  # a fresh key per step, no host-side split
        logits, kv_cache, expert_tokens = model.forward(kv_cache, step, backend=backend, lora=lora)  # [S + R, V]
        num_rows = tensors.num_rows
        out = sampling.sample(logits[:num_rows], tensors, key, num_top_logprobs=num_top_logprobs)
        n = min(max_pending_rows, out.tokens.shape[0])
        tokens = jnp.zeros(max_pending_rows, jnp.int32).at[:n].set(out.tokens[:n].astype(jnp.int32))
        columns = (out.tokens, out.logprobs, out.ranks, out.top_ids, out.top_logprobs)
        if score_targets.shape[0]:  # prompt logprobs: the scored rows follow the sample rows
            logprobs, ranks, top_ids, top_logprobs = prompt_logprobs.score_rows(
                logits[num_rows:], score_targets, num_top_logprobs)
            columns = tuple(jnp.concatenate([a, b.astype(a.dtype)]) for a, b in zip(
                columns, (score_targets, logprobs, ranks, top_ids, top_logprobs)))
        packed = packing.pack_outputs(*columns)
        # An MoE model adds its per-expert token counts (models/moe.py); a dense one returns three outputs.
        return (packed, tokens, kv_cache) + (() if expert_tokens is None else (expert_tokens,))

    return step_fn


def _placed_on(model, mesh) -> bool:
    """Whether every weight of `model` already lives on `mesh` (a shard-direct load or shard_model)."""
    leaves = jax.tree.leaves(nnx.state(model))
    return all(isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding) and x.sharding.mesh == mesh
               for x in leaves)


# Page movement maps over every leaf of the cache (each has the page axis first), so the scales of
# 8-bit pages go wherever their pages go. Moves are padded to step_variants.move_buckets sizes; a
# padding entry's destination is one past the last page, and mode="drop" skips it.
def _copy_pages(kv_cache: KVCache, src: jax.Array, dst: jax.Array) -> KVCache:
    return jax.tree.map(lambda x: x.at[dst].set(x[src], mode="drop"), kv_cache)


def _read_pages(kv_cache: KVCache, pages: jax.Array) -> KVCache:
    return jax.tree.map(lambda x: x[pages], kv_cache)


def _write_pages(kv_cache: KVCache, pages: jax.Array, data: KVCache) -> KVCache:
    return jax.tree.map(lambda x, d: x.at[pages].set(d, mode="drop"), kv_cache, data)


def serving_mesh(config, devices=None):
    """The ("data", "model") mesh of one replica's tensor-parallel group, or None with one device.
    `devices`: the group (default the first tensor_parallel_size of jax.devices())."""
    if config.tensor_parallel_size == 1:
        return None
    return sharding.make_mesh(config.tensor_parallel_size, devices=devices)


def serving_spec(model, config) -> KVCacheSpec:
    """The pages the engine serves `model` with: its kv heads (repeated under tensor parallelism, as
    `shard_model` does) split over the tensor-parallel group, in config.kv_cache_dtype ('auto': the model's)."""
    tp = config.tensor_parallel_size
    dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, model.dtype)
    return KVCacheSpec.for_model(tp_model_config(model.config, tp), config.block_size, dtype, kv_shards=tp)


class ModelRunner:
    """Tensors in, tokens out, for one replica: the jitted step over `model` (placed on `mesh` when it is
    not already; `model` itself is changed in place only on one device, where its projections are fused)
    and the page pool of `spec`, with `backend`'s kernels."""

    def __init__(self, config, model, *, spec: KVCacheSpec, backend: Backend, num_pages: int, max_model_len: int,
                 mesh=None, eos_token_ids=(), lora=None, constraints=None, host_pool: HostPagePool | None = None):
        if (mesh is None) != (config.tensor_parallel_size == 1):
            raise ValueError(f"tensor_parallel_size={config.tensor_parallel_size} needs a mesh of that many "
                             "devices (serving_mesh), one device none")
        self.mesh = mesh
        if self.mesh is not None:
            if not _placed_on(model, self.mesh) or config.enable_expert_parallel:
                model = sharding.shard_model(model, self.mesh, expert_parallel=config.enable_expert_parallel)
        elif config.fuse_projections and hasattr(model, "fuse_projections"):
            model.fuse_projections()  # in place: 2 GEMVs per layer where there were 5
        if config.quantization == "fp8":
            fp8_linear.quantize_model(model, jax.devices()[0])  # in place, after the fusion
        if spec.page_size != config.block_size or spec.kv_shards != config.tensor_parallel_size:
            raise ValueError(f"spec {spec} does not match block_size={config.block_size}, "
                             f"tensor_parallel_size={config.tensor_parallel_size}")
        self.model = model
        self.model_config = model.config
        self.lora = lora  # a jpaged.lora.LoRAManager: its slots are the step's `lora` argument
        self.spec, self.backend = spec, backend
        self.page_size = spec.page_size
        self.num_pages = num_pages
        self.max_pages_per_seq = spec.pages_for(max_model_len)
        self.move_buckets = step_variants.move_buckets(self.max_pages_per_seq)
        # The "full" tier's token histories: one width for every step (a prompt + output never exceeds it).
        self.history_width = max(16, 1 << (max_model_len - 1).bit_length())
        self.max_scored = config.max_scored_prompt_tokens
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_num_seqs = config.max_num_seqs
        # The scheduler's cap on sequences with > 1 new token per step, carried to the kernels as a static
        # bound (StepInput.max_prefill_seqs); build_step_input checks every batch against it.
        self.max_prefill_seqs = config.max_num_prefill_seqs
        self.eos_token_ids = tuple(eos_token_ids)  # the sampler bars them before a row's min_tokens
        self.constraints = constraints  # jpaged.structured.grammar.Constraints: token bitmasks, or None
        self.base_key = jax.random.PRNGKey(config.seed)
        self.expert_load = ExpertLoad(model.config.num_experts if model.config.is_moe else 0)
        graphdef, state = nnx.split(model)
        self.weights, treedef = jax.tree.flatten(state)
        self.kv_cache = (spec.create(num_pages) if self.mesh is None
                         else sharding.new_kv_cache(spec, self.mesh, num_pages))
        # Host pages of swap preemption and the host tier (jpaged/engine/kv_tiers.py).
        self.host = host_pool if host_pool is not None else HostPagePool(spec, config.num_host_kv_blocks)
        self._fetches: dict[int, list[tuple[np.ndarray, Future]]] = {}  # seq_id -> [(device pages, staged)]
        self._fetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-fetch")
        # Rows of one step whose tokens the next step may take on the device (async scheduling):
        # one per sequence, so as many as a step has sequences.
        self.max_pending_rows = max(4, min(self.token_buckets()[-1], self.max_num_seqs))
        # Placed as the step places its sampled tokens (replicated over the mesh), or the first step
        # after an idle spell would compile again for another input sharding.
        self._no_prev_tokens = jnp.zeros(self.max_pending_rows, jnp.int32)
        if self.mesh is not None:
            self._no_prev_tokens = jax.device_put(
                self._no_prev_tokens, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))
        # The device calls, by name: every jitted function the runner calls goes through `self.calls`,
        # so a multi-host leader can publish each call and its followers replay it (engine/multihost.py).
        self.calls = {
            "step": jax.jit(make_step_fn(graphdef, treedef, self.max_pending_rows),
                            static_argnames=("layout", "backend", "num_top_logprobs"),
                            donate_argnames=("kv_cache",)),
            "copy_pages": jax.jit(_copy_pages, donate_argnames=("kv_cache",)),
            "read_pages": jax.jit(_read_pages),
            "write_pages": jax.jit(_write_pages, donate_argnames=("kv_cache",)),
        }

    def _mesh_context(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    @property
    def num_compilations(self) -> int:
        return self.calls["step"]._cache_size()

    # -- page movement ---------------------------------------------------------------------------

    def copy_pages(self, pairs: list[tuple[int, int]]) -> None:
        for src, dst, _ in step_variants.padded_moves(pairs, self.move_buckets, (0, self.num_pages)):
            self.kv_cache = self.calls["copy_pages"](self.kv_cache, src, dst)

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """Device page -> host page, for each (device, host) pair: the read is queued on the device and
        lands in the host pool asynchronously (the host pool drains it before its next read)."""
        for dev, host, n in step_variants.padded_moves(pairs, self.move_buckets, (0, 0)):
            self.host.write_from_device(host[:n], self.calls["read_pages"](self.kv_cache, dev))

    offload = swap_out  # an evicted cached page -> its host-tier page: the same copy

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """Host page -> device page, for each (host, device) pair."""
        for host, dev, _ in step_variants.padded_moves(pairs, self.move_buckets, (0, self.num_pages)):
            # numpy straight into the jitted call: jnp.asarray would compile a transfer per shape
            self.kv_cache = self.calls["write_pages"](self.kv_cache, dev, self.host.read(host))

    def start_fetch(self, orders) -> None:
        """Starts the host -> device copies of host-tier hits (block_manager.FetchOrder) on the fetch
        thread (host read, then transfer into staging arrays); commit_fetch writes them into the pool
        once fetch_arrived says they landed. Moves are padded to move_buckets like every page move."""
        for order in orders:
            pairs = list(zip(order.host_pages, order.device_pages))
            self._fetches[order.seq_id] = [
                (dev, self._fetcher.submit(self._stage, host))
                for host, dev, _ in step_variants.padded_moves(pairs, self.move_buckets, (0, self.num_pages))]

    def _stage(self, host_pages: np.ndarray) -> KVCache:
        data = self.host.read(host_pages)
        sharding = (jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
                    if self.mesh is not None else None)
        return jax.device_put(data, sharding)

    def fetch_arrived(self, seq_id: int) -> bool:
        for _, staged in self._fetches[seq_id]:
            if not staged.done() or not all(x.is_ready() for x in jax.tree.leaves(staged.result())):
                return False
        return True

    def commit_fetch(self, seq_ids) -> None:
        for seq_id in seq_ids:
            for dev, staged in self._fetches.pop(seq_id):
                self.kv_cache = self.calls["write_pages"](self.kv_cache, dev, staged.result())

    def cancel_fetch(self, seq_ids) -> None:
        for seq_id in seq_ids:
            self._fetches.pop(seq_id, None)

    def move_pages(self, batch) -> None:
        """A ScheduledBatch's page moves, reads before writes: offloads and swap-outs read pages this
        step may overwrite; then the fetches, swap-ins and copy-on-write copies."""
        self.offload(batch.offload)
        self.swap_out(batch.swap_out)
        self.cancel_fetch(batch.fetch_cancel)
        self.commit_fetch(batch.fetch_commit)
        self.start_fetch(batch.fetch)
        self.swap_in(batch.swap_in)
        self.copy_pages(batch.copy_pages)

    # -- the step --------------------------------------------------------------------------------

    def token_buckets(self) -> list[int]:
        return token_buckets(self.max_num_batched_tokens)

    def page_buckets(self) -> list[int]:
        # The kernels read only up to kv_lens, so P costs them nothing: one bucket. The jnp reference
        # gathers all P pages per token, so on it P follows the batch's longest sequence, in powers of
        # four (each bucket is a compile; CPU test runs spent most of their time compiling).
        if self.backend.uses_kernels:
            return [self.max_pages_per_seq]
        buckets, p = [], 4
        while p < self.max_pages_per_seq:
            buckets.append(p)
            p *= 4
        return buckets + [self.max_pages_per_seq]

    def shape_for(self, num_tokens: int, num_rows: int, max_pages: int) -> tuple[int, int, int]:
        """(T, S, P) buckets. S follows T (a step has at most T sequences with tokens, plus n > 1
        sample rows), so the step compiles once per (T, P) and not per (T, S, P)."""
        t = next((b for b in self.token_buckets() if b >= num_tokens), num_tokens)
        s = max(min(t, self.max_num_seqs), bucket(num_rows, 4))
        p = next(b for b in self.page_buckets() if b >= max_pages)
        return t, s, p

    def variants(self, tiers=step_variants.TIERS) -> list[step_variants.Variant]:
        return step_variants.step_variants(self.token_buckets(), self.page_buckets(), tiers)

    def warmup(self, tiers=step_variants.TIERS) -> None:
        """Compiles the step for every (T, P, tier) of `tiers` and every page-move size, so serving never
        waits for a compilation (steps of a tier left out compile on first use)."""
        for v in self.variants(tiers):
            _, s, _ = self.shape_for(v.num_tokens, 1, v.max_pages)
            r = step_variants.num_scored_rows(v.tier, v.num_tokens, self.max_scored)
            t = v.num_tokens
            step = StepInput(
                token_ids=np.zeros(t, np.int32), positions=np.zeros(t, np.int32),
                cu_q_lens=np.zeros(s + 1, np.int32), kv_lens=np.zeros(s, np.int32),
                page_table=np.zeros((s, v.max_pages), np.int32), slot_mapping=np.full(t, -1, np.int32),
                logits_index=np.zeros(s + r, np.int32), num_seqs=np.int32(0),
                max_prefill_seqs=self.max_prefill_seqs,
                lora_index=None if self.lora is None else np.full(t, -1, np.int32))
            self.fetch(self._dispatch(step, [], 0, [], tier=v.tier, num_sample_rows=s,
                                      score_targets=np.zeros(r, np.int32)))
        idle = np.full(self.move_buckets[-1], self.num_pages, np.int32)  # every destination dropped
        for b in self.move_buckets:
            self.kv_cache = self.calls["copy_pages"](self.kv_cache, np.zeros(b, np.int32), idle[:b])
            jax.device_get(self.calls["read_pages"](self.kv_cache, np.zeros(b, np.int32)))
            zeros = jax.tree.map(lambda h: np.zeros((b, *h.shape[1:]), h.dtype), self.host.pages)
            self.kv_cache = self.calls["write_pages"](self.kv_cache, idle[:b], zeros)
        jax.block_until_ready(self.kv_cache)

    def build_step_input(self, entries, sample_rows: list[SampleRow], pending=None, scored=None,
                         tier: str = "plain", lora_slots=None) -> tuple[StepInput, np.ndarray]:
        """Packs scheduled entries (seq, start, num_tokens) into padded numpy arrays.

        `pending` maps seq_id -> (position, row): that token is row `row` of the previous step's
        samples, not read back yet. `scored` (a prompt_logprobs.ScorePlan) adds its token indices to
        logits_index after the S sample rows, padded to the tier's R rows. `lora_slots` ({adapter_id:
        slot}, LoRA on) gives each token its adapter's slot (-1: base). Returns the StepInput and
        token_src ([T], the row or -1)."""
        # Vectorised over the entries: at large batches a per-entry loop of numpy calls costs milliseconds.
        ps, n_e = self.page_size, len(entries)
        starts = np.fromiter((e.start for e in entries), np.int64, n_e)
        counts = np.fromiter((e.num_tokens for e in entries), np.int64, n_e)
        ends = starts + counts
        offsets = np.zeros(n_e + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        num_tokens = int(offsets[-1])
        max_pages = int((-(-ends // ps)).max()) if n_e else 1
        t, s, p = self.shape_for(num_tokens, max(n_e, len(sample_rows)), max_pages)
        num_prefills = int((counts > 1).sum())
        if self.max_prefill_seqs is not None and num_prefills > self.max_prefill_seqs:
            raise ValueError(f"the batch has {num_prefills} sequences with more than one new token, "
                             f"more than max_prefill_seqs ({self.max_prefill_seqs})")

        token_ids = np.zeros(t, np.int32)
        positions = np.zeros(t, np.int32)
        slot_mapping = np.full(t, -1, np.int32)
        cu_q_lens = np.full(s + 1, num_tokens, np.int32)
        kv_lens = np.zeros(s, np.int32)
        page_table = np.zeros((s, p), np.int32)
        num_scored = step_variants.num_scored_rows(tier, t, self.max_scored)
        if scored is not None and len(scored) > num_scored:
            raise ValueError(f"the step scores {len(scored)} prompt positions, more than its {num_scored} rows "
                             f"(tier {tier!r}, max_scored_prompt_tokens {self.max_scored})")
        logits_index = np.zeros(s + num_scored, np.int32)
        token_src = np.full(t, -1, np.int32)
        if n_e:
            token_row = np.repeat(np.arange(n_e), counts)
            pos = np.arange(num_tokens) - offsets[token_row] + starts[token_row]
            token_ids[:num_tokens] = np.fromiter(itertools.chain.from_iterable(
                e.seq.token_ids[e.start:e.start + e.num_tokens] for e in entries), np.int32, num_tokens)
            positions[:num_tokens] = pos
            tables = [e.seq.block_table if len(e.seq.block_table) <= p else e.seq.block_table[:p] for e in entries]
            used = np.fromiter(map(len, tables), np.int64, n_e)
            table_start = np.zeros(n_e, np.int64)
            np.cumsum(used[:-1], out=table_start[1:])
            table_row = np.repeat(np.arange(n_e), used)
            flat = np.fromiter(itertools.chain.from_iterable(tables), np.int32, int(used.sum()))
            page_table[table_row, np.arange(flat.size) - table_start[table_row]] = flat
            slot_mapping[:num_tokens] = page_table[token_row, pos // ps] * ps + pos % ps
            np.maximum(page_table, 0, out=page_table)  # -1: released by the window, never read
            cu_q_lens[:n_e] = offsets[:-1]
            kv_lens[:n_e] = ends
        if pending:
            for i, e in enumerate(entries):
                hit = pending.get(e.seq.seq_id)
                if hit is not None and e.start <= hit[0] < e.start + e.num_tokens:
                    token_src[offsets[i] + hit[0] - e.start] = hit[1]
        logits_index[:len(sample_rows)] = [row.token_index for row in sample_rows]
        if scored is not None:
            logits_index[s:s + len(scored)] = scored.token_index
        step = StepInput(token_ids=token_ids, positions=positions, cu_q_lens=cu_q_lens, kv_lens=kv_lens,
                         page_table=page_table, slot_mapping=slot_mapping, logits_index=logits_index,
                         num_seqs=np.int32(len(entries)), max_prefill_seqs=self.max_prefill_seqs)
        if self.lora is not None:
            lora_index = np.full(t, -1, np.int32)
            slots = lora_slots or {}  # every adapter of the batch has a slot (LoRAManager.activate)
            lora_index[:num_tokens] = np.repeat(
                np.fromiter((slots[e.seq.adapter_id] if e.seq.adapter_id else -1 for e in entries),
                            np.int32, n_e), counts)
            step = dataclasses.replace(step, lora_index=lora_index)
        return step, token_src

    def execute(self, entries, sample_rows: list[SampleRow], step_counter: int):
        """Runs one step and waits for it; returns the sampler's outputs for the real rows (numpy)."""
        return self.fetch(self.launch(entries, sample_rows, step_counter))

    def launch(self, entries, sample_rows: list[SampleRow], step_counter: int, *, pending=None,
               prev: InFlight | None = None, scored=None, lora_slots=None) -> InFlight:
        """Starts one step on the device and returns at once (JAX dispatch is asynchronous).

        Tokens listed in `pending` (seq_id -> (position, row of `prev`)) come from `prev`'s samples on
        the device. Rows without a seed draw from fold_in(the runner's key, step_counter). `scored`: the
        prompt positions to score (prompt_logprobs.plan_scores), read with `fetch_scores`."""
        params = [row.seq.sampling_params for row in sample_rows]
        tier = step_variants.tier_of(params, self.model_config.vocab_size, scored is not None)
        step, token_src = self.build_step_input(entries, sample_rows, pending, scored, tier, lora_slots)
        s = step.kv_lens.shape[0]
        targets = np.zeros(step.logits_index.shape[0] - s, np.int32)
        if scored is not None:
            targets[:len(scored)] = scored.targets
        return self._dispatch(step, [row.seq for row in sample_rows], step_counter, params, token_src, prev,
                              pending, tier=tier, num_sample_rows=s, score_targets=targets,
                              num_scored=len(scored) if scored is not None else 0)

    def _bitmask(self, seqs, num_rows: int, prev: InFlight | None, pending) -> np.ndarray | None:
        """The structured-outputs mask of the rows, or None. A constrained row whose last token is still
        on the device (async scheduling) waits here for `prev`'s tokens: only those, not the whole
        readback, so the previous step's host bookkeeping still overlaps this step."""
        if self.constraints is None:
            return None
        prev_tokens = []

        def pending_token(seq):
            hit = (pending or {}).get(seq.seq_id)
            if hit is None or prev is None:
                return None
            if not prev_tokens:
                prev_tokens.append(np.asarray(prev.tokens))
            return int(prev_tokens[0][hit[1]])

        return self.constraints.bitmask(seqs, num_rows, pending_token)

    def fetch(self, inflight: InFlight):
        """Waits for a launched step; the sampler's outputs for its real rows, as numpy arrays."""
        if inflight.host is None:
            inflight.host = np.asarray(inflight.packed)
        if inflight.expert_tokens is not None:
            self.expert_load.record(np.asarray(inflight.expert_tokens))
            inflight.expert_tokens = None  # recorded once, however often the step is read
        return sampling.SamplerOutput(**packing.unpack_outputs(inflight.host[:inflight.num_rows]))

    def fetch_scores(self, inflight: InFlight):
        """The scored prompt rows of a fetched step, in plan order: a SamplerOutput whose `tokens` are
        the scored tokens, `logprobs` / `ranks` theirs, and the top K."""
        if inflight.host is None:
            inflight.host = np.asarray(inflight.packed)
        start = inflight.num_sample_rows
        return sampling.SamplerOutput(**packing.unpack_outputs(inflight.host[start:start + inflight.num_scored]))

    def _dispatch(self, step: StepInput, seqs, step_counter: int, params: list[SamplingParams],
                  token_src: np.ndarray | None = None, prev: InFlight | None = None, pending=None, *, tier: str,
                  num_sample_rows: int, score_targets: np.ndarray, num_scored: int = 0) -> InFlight:
        penalties = any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0
                        for p in params)
        tensors = sampling.SamplingTensors.from_params(
            params, num_rows=num_sample_rows, vocab_size=self.model_config.vocab_size,
            output_positions=[seq.num_output_tokens for seq in seqs],
            prompt_token_ids=[seq.token_ids[:seq.num_prompt_tokens] for seq in seqs] if penalties else None,
            output_token_ids=[seq.output_token_ids for seq in seqs] if penalties else None,
            eos_token_ids=self.eos_token_ids,
            token_bitmask=self._bitmask(seqs, num_sample_rows, prev, pending))
        tensors = step_variants.fit_tensors(tensors, tier, self.history_width)
        top = step_variants.num_top_logprobs(tier)
        if token_src is None:
            token_src = np.full(step.token_ids.shape, -1, np.int32)
        int_buf, float_buf, layout = packing.pack((step, tensors, np.int32(step_counter), token_src, score_targets))
        prev_tokens = prev.tokens if prev is not None else self._no_prev_tokens
        lora = () if self.lora is None else (self.lora.weights,)
        with self._mesh_context():
            packed, tokens, self.kv_cache, *expert_tokens = self.calls["step"](
                self.weights, self.kv_cache, int_buf, float_buf, self.base_key, prev_tokens, *lora,
                layout=layout, backend=self.backend, num_top_logprobs=top)
        return InFlight(packed=packed, tokens=tokens, num_rows=len(seqs), num_sample_rows=num_sample_rows,
                        num_scored=num_scored, expert_tokens=expert_tokens[0] if expert_tokens else None)
