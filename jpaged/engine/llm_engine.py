"""Engine: add_request / step / abort. The loop that ties scheduler, runner and output processor together.

One `step()`: the scheduler picks sequences under the token budget -> the runner moves pages it was
asked to (swap, copy-on-write), runs the jitted model+sampling step -> the output processor
(jpaged/engine/output_processor.py) writes the sampled tokens into the sequences and turns them into
RequestOutputs (n > 1 forks, beam search, detokenization, stop checks).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging

import jax
import numpy as np

from jpaged import sharding
from jpaged.config import EngineConfig, resolve_dtype
from jpaged.engine import kv_tiers
from jpaged.engine.model_runner import InFlight, ModelRunner, SampleRow, serving_mesh, serving_spec
from jpaged.engine.output_processor import OutputProcessor, StepResult
from jpaged.engine import step_variants
from jpaged.engine.prompt_logprobs import PromptScores, ScorePlan, plan_scores, record_step
from jpaged.engine.scheduler import ScheduledBatch, Scheduler
from jpaged.lora import LoRAManager, LoRARequest
from models.sharding import tp_model_config
from jpaged.engine.spec_decode.setup import load_draft, make_speculator
from jpaged.outputs import RequestOutput
from jpaged.sampling_params import SamplingParams
from jpaged.structured.grammar import Constraints
from pallas_kernels import select_backend

CPU_KV_CACHE_BYTES = 1 << 30  # pool size on CPU when num_kv_blocks is not given
log = logging.getLogger("jpaged.engine")




class Engine:
    def __init__(self, config: EngineConfig, *, model=None, tokenizer=None, devices=None, draft=None):
        """One replica of the model. `devices`: its tensor-parallel group when tensor_parallel_size > 1
        (default the first tensor_parallel_size devices). data_parallel_size > 1: `data_parallel.make_engine`.
        `draft`: (model, tokenizer) of the speculative draft, instead of loading speculative_config's."""
        if config.data_parallel_size > 1:
            raise ValueError("Engine is one replica; build data_parallel_size > 1 with "
                             "jpaged.engine.data_parallel.make_engine (LLM and jpaged serve do)")
        config = dataclasses.replace(config, dtype=resolve_dtype(config.dtype))
        mesh = serving_mesh(config, devices)
        if model is None:  # under tensor parallelism each weight is read straight into its shards
            from jpaged.loader import load_model
            model, tokenizer = load_model(config.model, dtype=config.dtype, mesh=mesh)
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = config.model
        mcfg = model.config
        self.max_model_len = config.max_model_len or mcfg.max_position_embeddings
        self.eos_token_ids = tuple(getattr(tokenizer, "eos_token_ids", None) or mcfg.eos_token_ids)
        self.kv_spec = serving_spec(model, config)
        self.backend = select_backend(mesh.devices.flat[0] if mesh is not None else jax.devices()[0], self.kv_spec,
                                      config.backend)
        self.lora = _lora_manager(config, model, mesh)
        # The draft's page pool has as many pages as the target's: they share the memory budget.
        draft_net = load_draft(config, model, tokenizer, draft)
        num_pages = config.num_kv_blocks or self._default_num_pages(draft_net)
        log.info("KV cache: %d pages of %d tokens, %s, %.1f KiB a page per device", num_pages, config.block_size,
                 self.kv_spec.dtype, self.kv_spec.bytes_per_page / 1024)
        host_pool, tiers = kv_tiers.build(config, self.kv_spec, model)
        self.scheduler = Scheduler(config, num_blocks=num_pages, max_model_len=self.max_model_len,
                                   sliding_window=mcfg.sliding_window, num_host_pages=host_pool.num_pages, tiers=tiers)
        self.speculator = make_speculator(config, draft_net, num_pages=num_pages, max_model_len=self.max_model_len)
        self.constraints = Constraints(tokenizer, mcfg.vocab_size, self.eos_token_ids)  # structured outputs
        self.runner = ModelRunner(config, model, spec=self.kv_spec, backend=self.backend, num_pages=num_pages,
                                  max_model_len=self.max_model_len, mesh=mesh, eos_token_ids=self.eos_token_ids,
                                  lora=self.lora, constraints=self.constraints, host_pool=host_pool)
        self.scheduler.fetch_arrived = self.runner.fetch_arrived
        self.model = self.runner.model  # the weights being served (sharded under TP): no other copy is kept
        self.output_processor = OutputProcessor(tokenizer, self.scheduler, eos_token_ids=self.eos_token_ids,
                                                max_model_len=self.max_model_len, seq_ids=itertools.count())
        self._num_steps = 0
        self._inflight: _Launched | None = None  # the launched step not read back yet
        self.prompt_tokens_total = 0

    @property
    def requests(self) -> dict:
        """Unfinished requests by id (the output processor's RequestStates)."""
        return self.output_processor.requests

    @property
    def generation_tokens_total(self) -> int:
        return self.output_processor.generation_tokens

    def _default_num_pages(self, draft_net=None) -> int:
        """Pages the free memory holds; a draft model's pool has as many pages, so it shares the budget."""
        c, page_bytes = self.config, self.kv_spec.bytes_per_page
        if draft_net is not None:
            page_bytes += serving_spec(draft_net, c).bytes_per_page
        device = jax.local_devices()[0]
        stats = device.memory_stats() if device.platform == "gpu" else None
        if stats:
            free = stats["bytes_limit"] - stats["bytes_in_use"]
            budget = int(free * c.kv_cache_memory_fraction)
        else:
            budget = CPU_KV_CACHE_BYTES
        needed = c.max_num_seqs * self.kv_spec.pages_for(self.max_model_len)
        # Every process of a multi-host job takes process 0's figure: the pools must be one shape.
        return int(sharding.broadcast_from_scheduler(np.int32(max(1, min(budget // page_bytes, needed)))))

    # -- requests --------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None, *,
                    priority: int | None = None, arrival_time: float | None = None,
                    lora_request: LoRARequest | None = None) -> None:
        """Queues a request (through the adapter of `lora_request`, registered on first use); ValueError
        (and no state kept) for one that can never run. `priority` defaults to params.priority."""
        params = params or SamplingParams()
        priority = params.priority if priority is None else priority
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        adapter_id = self._adapter_id(lora_request, params)
        prompt_text, prompt_ids = self._tokenize(prompt)
        self._check_constraints(params)
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(prompt_ids)
        if max_tokens < 1:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens, which leaves no room to generate "
                             f"within max_model_len={self.max_model_len}")
        if params.max_tokens is None:
            params = dataclasses.replace(params, max_tokens=max_tokens)
        seq = self.output_processor.add(request_id, prompt_text, prompt_ids, params, priority=priority,
                                        arrival_time=arrival_time, adapter_id=adapter_id)
        if params.prompt_logprobs is not None:  # scored by the prefill steps (prompt_logprobs.py)
            req = self.requests[request_id]
            if len(prompt_ids) < 2:
                req.prompt_logprobs = [None]
            else:
                req.prompt_scores = PromptScores(len(prompt_ids))
                seq.scores_pending = True

    def _adapter_id(self, lora_request: LoRARequest | None, params: SamplingParams) -> int:
        if lora_request is None:
            return 0
        if self.lora is None:
            raise ValueError("lora_request needs an engine with enable_lora=True")
        self.lora.add(lora_request)
        return lora_request.lora_int_id

    def add_lora(self, lora_request: LoRARequest) -> None:
        """Registers an adapter (read from disk now) for requests to name; ValueError when it does not fit."""
        if self.lora is None:
            raise ValueError("add_lora needs an engine with enable_lora=True")
        self.lora.add(lora_request)

    def remove_lora(self, lora_int_id: int) -> None:
        """Forgets an adapter; ValueError while an unfinished request uses it, or for an unknown id."""
        if self.lora is None:
            raise ValueError("remove_lora needs an engine with enable_lora=True")
        if any(seq.adapter_id == lora_int_id for req in self.requests.values() for seq in req.seqs):
            raise ValueError(f"LoRA adapter {lora_int_id} is in use by unfinished requests")
        self.lora.remove(lora_int_id)

    def _check_constraints(self, params: SamplingParams) -> None:
        vocab = self.model.config.vocab_size
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise ValueError(f"logit_bias token ids must be in [0, {vocab}), got {max(params.logit_bias)}")
        if params.structured_outputs is not None:
            if self.speculator is not None:
                raise ValueError("structured_outputs with speculative decoding (speculative_config) is not "
                                 "implemented")
            self.constraints.check(params.structured_outputs)

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            return prompt, self.tokenizer.encode(prompt)
        ids = list(prompt)
        vocab = self.model.config.vocab_size
        if not ids:
            raise ValueError("prompt must not be empty")
        if not all(isinstance(t, (int, np.integer)) and 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        return None, [int(t) for t in ids]

    def abort(self, request_id: str) -> None:
        """Frees every page of the request, whatever state it is in; no more outputs for it."""
        self.output_processor.abort(request_id)
        if self.speculator is not None:
            self.speculator.per_request.pop(request_id, None)

    def warmup(self, variants: str = "all") -> None:
        """Compiles every step shape up front (serving calls it; steady state then never compiles).
        `variants`: "all" the sampler tiers, or "plain" only (jpaged/engine/step_variants.py)."""
        if variants not in step_variants.WARMUP_CHOICES:
            raise ValueError(f"variants must be one of {step_variants.WARMUP_CHOICES}, got {variants!r}")
        self.runner.warmup(step_variants.TIERS if variants == "all" else ("plain",))
        if self.lora is not None:
            self.lora.warmup()

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- the step --------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedules and launches the next step, then reads back the one before it (async scheduling).

        While the device runs step N+1, the host reads step N's tokens and does their bookkeeping
        (stop checks, detokenization, outputs); N+1 takes N's tokens on the device. A step whose
        next step needs its tokens on the host (penalties, n > 1 forks, beam search) is read back
        at once. With `async_scheduling=False` every step is.
        """
        prev, self._inflight = self._inflight, None
        spec = self.speculator
        batch = self.scheduler.schedule(spec.proposals(self.scheduler) if spec else None)
        self.runner.move_pages(batch)
        if spec:
            spec.fill_drafts(batch)
        launched = self._launch(batch, prev) if batch.entries else None
        outputs = self._resolve(prev) if prev is not None else []
        if launched is not None:
            if launched.overlappable:
                self._inflight = launched
            else:
                outputs += self._resolve(launched)
        unique = {}  # one output per request: the latest
        for out in outputs:
            unique.pop(out.request_id, None)
            unique[out.request_id] = out
            if spec:
                out.spec_decode = spec.request_stats(out.request_id, out.finished)
        return list(unique.values())

    def _launch(self, batch: ScheduledBatch, prev: _Launched | None) -> _Launched:
        rows, seqs, positions, offset, forked = [], [], [], 0, False
        for entry in batch.entries:
            offset += entry.num_tokens
            if not entry.num_samples:
                continue
            if entry.num_proposed:  # a verified chunk: one row per position
                for i, view in self.speculator.rows(entry):
                    rows.append(SampleRow(offset - entry.num_tokens + i, view))
                    seqs.append(entry.seq)
                    positions.append(entry.start + 1 + i)
                continue
            if entry.num_samples > 1:
                raise ValueError(f"seq_id {entry.seq.seq_id}: the runner samples one token per sequence a "
                                 f"step, not {entry.num_samples}")
            position = entry.start + entry.num_tokens
            # n > 1: the samples still to fork share the prompt's pages and draw from the same logits
            # (only ever at the prompt's end: the check keeps the decode path to two attribute reads).
            forks = (self.output_processor.fork_samples(entry.seq)
                     if entry.seq.num_prompt_tokens == len(entry.seq.token_ids) else ())
            forked = forked or bool(forks)
            for seq in (entry.seq, *forks):
                rows.append(SampleRow(offset - 1, seq))
                seqs.append(seq)
                positions.append(position)
        overlappable = (self.config.async_scheduling and not forked and self.speculator is None
                        and len(rows) <= self.runner.max_pending_rows
                        and all(_needs_no_history(row.seq.sampling_params) for row in rows))
        lora_slots = None if self.lora is None else self.lora.activate(
            e.seq.adapter_id for e in batch.entries if e.seq.adapter_id)
        scored = plan_scores(batch.entries)
        handle = self.runner.launch(batch.entries, rows, self._num_steps,
                                    pending=prev.pending if prev is not None else None,
                                    prev=prev.handle if prev is not None else None, lora_slots=lora_slots,
                                    scored=scored)
        self._num_steps += 1
        self.scheduler.advance(batch)
        pending = {seq.seq_id: (pos, r) for r, (seq, pos) in enumerate(zip(seqs, positions))}
        return _Launched(batch, seqs, positions, handle, overlappable, pending, scored)

    def _resolve(self, launched: _Launched) -> list[RequestOutput]:
        """Reads a launched step's samples back (waiting for it) and does their bookkeeping."""
        samples = self.runner.fetch(launched.handle)
        if launched.scored is not None:  # before the samples: the first output carries the prompt's scores
            record_step(launched.scored, self.runner.fetch_scores(launched.handle), self.requests,
                        self.tokenizer.decode)
        batch = launched.batch
        self.prompt_tokens_total += sum(max(0, min(e.start + e.num_tokens, e.seq.num_prompt_tokens) - e.start)
                                        for e in batch.entries)
        result = StepResult(batch, launched.seqs, launched.positions, samples)
        if self.speculator is not None:
            result = self.speculator.accept(result)
        return self.output_processor.process(result)

    # -- introspection ---------------------------------------------------------------------------

    def cache_map(self) -> dict:
        """Every KV page's state (device, host, disk) and who holds it, as JSON-able data
        (jpaged/engine/cache_map.py)."""
        from jpaged.engine.cache_map import cache_map
        return cache_map(self.scheduler)

    def stats(self) -> dict:
        s = self.scheduler
        return dict(num_running=s.num_running, num_waiting=s.num_waiting, num_free_pages=s.num_free_pages,
                    num_used_pages=s.num_used_pages, num_total_pages=self.runner.num_pages,
                    prefix_cache_queries=s.prefix_cache_queries, prefix_cache_hits=s.prefix_cache_hits,
                    num_preemptions=s.num_preemptions, prompt_tokens=self.prompt_tokens_total,
                    generation_tokens=self.generation_tokens_total, num_steps=self._num_steps,
                    num_compilations=self.runner.num_compilations, **self.runner.expert_load.stats(),
                    **(self.speculator.stats() if self.speculator else {}),
                    **kv_tiers.tier_stats(self.scheduler.block_manager, self.kv_spec))


@dataclasses.dataclass
class _Launched:
    """A step on the device: what it computes, who it samples for, and where those tokens go."""

    batch: ScheduledBatch
    seqs: list  # per sample row: the Sequence it samples for, or an n > 1 ForkSample
    positions: list[int]  # per row: the position its token takes in its sequence
    handle: InFlight
    overlappable: bool  # the next step may be scheduled before this one is read back
    pending: dict[int, tuple[int, int]]  # seq_id -> (position, row): tokens the next step takes on device
    scored: ScorePlan | None = None  # the prompt positions this step scores


def _lora_manager(config: EngineConfig, model, mesh) -> LoRAManager | None:
    """The adapter slots of an engine with enable_lora (placed on `mesh` as the served weights), with
    `config.lora_modules` registered (ids 1, 2, ...)."""
    if not config.enable_lora:
        return None
    if jax.process_count() > 1:
        raise ValueError("enable_lora across several hosts is not implemented")
    if model.config.is_moe:
        raise ValueError("enable_lora with a mixture-of-experts model is not implemented")
    served = tp_model_config(model.config, config.tensor_parallel_size)
    fused = mesh is None and config.fuse_projections and hasattr(model, "fuse_projections")  # as ModelRunner
    manager = LoRAManager(served, max_loras=config.max_loras, max_lora_rank=config.max_lora_rank,
                          dtype=model.dtype, fused=fused, mesh=mesh)
    for i, module in enumerate(config.lora_modules, start=1):
        name, _, path = module.partition("=")
        manager.add(LoRARequest(name, i, path))
    return manager


def _needs_no_history(params: SamplingParams) -> bool:
    """Sampling that does not read the token history on the host (penalties do, beam search does)."""
    return not (params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0
                or params.use_beam_search)
