"""Data parallel serving: N engine replicas, each a whole model on its own devices, behind one Engine API.

Where it sits: `make_engine(config)` is how `LLM`, `jpaged serve` and `jpaged generate` build their
engine. With data_parallel_size = 1 that is `Engine` itself; with N > 1 it is a `DataParallelEngine`:
replica r is an `Engine` on devices [r * tp, (r + 1) * tp) (each replica may be tensor parallel), with
its own scheduler, page pool and jitted step. One host loop routes each new request to the least loaded
replica (fewest unfinished requests, then most free pages) and steps every replica that has work in
turn. JAX dispatch is asynchronous, so replica r + 1's step is launched while replica r's still runs.

Why one engine per replica and not one SPMD program over a stacked replica axis (`sharding.over_replicas`,
the research loops' way): replicas then schedule, bucket and preempt independently (a step never waits
for the busiest replica's shape), and the single-replica engine is reused unchanged.
docs/multi_device.md has the measurements.
"""
from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from jpaged import sharding
from jpaged.config import EngineConfig
from jpaged.engine import multihost
from jpaged.engine.llm_engine import Engine
from jpaged.outputs import RequestOutput
from jpaged.sampling_params import SamplingParams


def make_engine(config: EngineConfig, *, model=None, tokenizer=None):
    """The engine for `config`: an `Engine`, or a `DataParallelEngine` when data_parallel_size > 1.

    In a multi-process job every process builds the same engine: process 0's publishes its jitted
    calls (jpaged/engine/multihost.py), the others must then run `multihost.follower_loop(engine)`.
    """
    multihost.check_supported(config)
    if config.data_parallel_size > 1:
        return DataParallelEngine(config, model=model, tokenizer=tokenizer)
    engine = Engine(config, model=model, tokenizer=tokenizer)
    if jax.process_count() > 1 and multihost.is_leader():
        multihost.lead(engine)
    return engine


class DataParallelEngine:
    """`Engine`'s API (add_request, step, abort, has_unfinished, stats, warmup) over N replicas.

    Request ids are unique across replicas; a request lives on one replica from add to finish.
    Every replica gets the page pool of replica 0 (sized from its device's free memory unless
    num_kv_blocks is given), and seed `config.seed * N + r` for requests without their own seed.
    """

    def __init__(self, config: EngineConfig, *, model=None, tokenizer=None):
        dp, tp = config.data_parallel_size, config.tensor_parallel_size
        mesh = sharding.make_mesh(tp, dp)  # ValueError when there are fewer than dp * tp devices
        if model is None:
            from jpaged.loader import load_model
            model, tokenizer = load_model(config.model, dtype=config.dtype)
        self.config = config
        self.replicas: list[Engine] = []
        for r, devices in enumerate(mesh.devices):
            replica_config = dataclasses.replace(config, data_parallel_size=1, seed=config.seed * dp + r)
            if r > 0 and config.num_kv_blocks is None:
                replica_config = dataclasses.replace(replica_config, num_kv_blocks=self.replicas[0].runner.num_pages)
            # Under its first device, the replica's pool and keys are created there; with TP 1 its model is
            # a copy on that device (the runner may rewrite a model in place), with TP > 1 the runner shards it.
            with jax.default_device(devices[0]):
                self.replicas.append(Engine(replica_config, tokenizer=tokenizer,
                                            model=_copy_to(model, devices[0]) if tp == 1 else model,
                                            devices=list(devices) if tp > 1 else None))
        first = self.replicas[0]
        self.model, self.tokenizer = first.model, first.tokenizer
        self.model_name, self.max_model_len = first.model_name, first.max_model_len

    # -- requests --------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None, *,
                    priority: int | None = None, arrival_time: float | None = None) -> None:
        """Queues a request on the least loaded replica; ValueError (and no state kept) as `Engine`'s."""
        if self._replica_of(request_id) is not None:
            raise ValueError(f"request_id {request_id!r} is already in use")
        replica = min(self.replicas, key=lambda e: (len(e.requests), -e.scheduler.num_free_pages))
        replica.add_request(request_id, prompt, params, priority=priority, arrival_time=arrival_time)

    def abort(self, request_id: str) -> None:
        """Frees every page of the request on its replica; no more outputs for it."""
        replica = self._replica_of(request_id)
        if replica is not None:
            replica.abort(request_id)

    def _replica_of(self, request_id: str) -> Engine | None:
        return next((e for e in self.replicas if request_id in e.requests), None)

    def has_unfinished(self) -> bool:
        return any(e.has_unfinished() for e in self.replicas)

    def warmup(self, variants: str = "all") -> None:
        for replica in self.replicas:
            replica.warmup(variants)

    # -- the step --------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One step of every replica that has work, in turn; their outputs together."""
        outputs: list[RequestOutput] = []
        for replica in self.replicas:
            if replica.has_unfinished():
                outputs += replica.step()
        return outputs

    # -- introspection ---------------------------------------------------------------------------

    @property
    def prompt_tokens_total(self) -> int:
        return sum(e.prompt_tokens_total for e in self.replicas)

    @property
    def generation_tokens_total(self) -> int:
        return sum(e.generation_tokens_total for e in self.replicas)

    def stats(self) -> dict:
        """`Engine.stats()` keys, each summed over the replicas (num_steps counts replica steps)."""
        per_replica = [e.stats() for e in self.replicas]
        return {key: sum(s[key] for s in per_replica) for key in per_replica[0]}


def _copy_to(model, device):
    """A new model object with every parameter on `device` (no copy for those already there)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.device_put(state, device))
