"""Multi-host serving: process 0 schedules, every process runs the same jitted calls.

Where it sits: after `sharding.initialize_distributed`, every process builds the same engine
(`data_parallel.make_engine`: same config and weights, one mesh over the devices of all processes,
e.g. TP 16 over two 8-GPU hosts). On process 0, `lead(engine)` makes the runner publish each of its
device calls (`DEVICE_CALLS`: the step, page copies, swaps) just before making it; every other process runs
`follower_loop(engine)`, which makes the same calls with the same arguments in the same order, so
each collective inside a step meets all processes. Only process 0 schedules, reads tokens back and
talks to clients; `stop_followers(engine)` ends the other processes' loops. `lead_or_follow(engine,
body)` is the whole pattern in one call (`jpaged serve` and `jpaged generate` use it).

A call travels as its name in `DEVICE_CALLS`, whether it ran under the runner's mesh, and its
flattened arguments: host values (the packed step buffers of jpaged/engine/packing.py, the static
layout and flags) as they are; device arrays as names that every process resolves to its own copy
(a runner attribute such as the weights, or an output of a recent call such as the previous step's
sampled tokens or the donated KV cache). The channel is the key-value store of JAX's distributed
runtime (the coordinator `jax.distributed.initialize` started), not a device collective: publishing
never waits for a step still running on the devices, so async scheduling keeps its overlap.
"""
from __future__ import annotations

import collections
import contextlib
import pickle
import signal
import threading
from typing import Callable, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

_PREFIX = "jpaged/multihost/call"
_WINDOW = 1024       # calls kept in the store; a follower is never that far behind (each step waits on all)
_KEEP_CALLS = 16     # recent calls whose outputs later calls may take by name
_POLL_MS = 60_000    # a follower waits this long per try while the leader is idle
_STOP = "stop"
# The wire protocol: the runner's device calls (`ModelRunner.calls`), each a jitted function.
DEVICE_CALLS = ("step", "copy_pages", "read_pages", "write_pages")
T = TypeVar("T")


def is_leader() -> bool:
    return jax.process_index() == 0


def check_supported(config) -> None:
    """ValueError for what a multi-process engine cannot do yet (call on every process)."""
    if jax.process_count() == 1:
        return
    if config.data_parallel_size > 1:
        raise ValueError("data_parallel_size > 1 across processes is not supported; on several hosts give "
                         "tensor_parallel_size = all their devices, or run one server per host")
    if config.preemption_mode == "swap":
        raise ValueError("preemption_mode='swap' is not supported across processes (each process holds only "
                         "its shard of a page); use 'recompute'")
    if config.kv_host_cache_gb > 0:
        raise ValueError("kv_host_cache_gb > 0 (the host tier) is not supported across processes (each process "
                         "holds only its shard of a page); leave it 0")
    if config.tensor_parallel_size != jax.device_count():
        raise ValueError(f"with {jax.process_count()} processes, tensor_parallel_size must be the number of "
                         f"devices of all of them ({jax.device_count()}), got {config.tensor_parallel_size}")


def lead_or_follow(engine, body: Callable[[], T]) -> T | None:
    """Runs `body()` (which drives `engine`) on process 0 and returns its value; meanwhile every other
    process follows the engine's calls, returning None once process 0 is done. One process: body()."""
    if jax.process_count() == 1:
        return body()
    if not is_leader():
        follower_loop(engine)
        return None
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (how job schedulers stop a job, and what uvicorn re-raises after its graceful shutdown)
        # would end the process on the spot; as SystemExit it still releases the followers below.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return body()
    finally:
        stop_followers(engine)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def lead(engine) -> None:
    """Makes `engine`'s runner publish every device call to the other processes (process 0 only)."""
    runner = engine.runner
    calls = _device_calls(runner)
    names, channel = _Names(runner), _Channel()
    runner.calls = {name: _Published(name, fn, runner, names, channel) for name, fn in calls.items()}
    runner.multihost_channel = channel


def stop_followers(engine) -> None:
    """Ends `follower_loop` on every other process (call once, on process 0, when done)."""
    engine.runner.multihost_channel.publish(_STOP)


def follower_loop(engine) -> None:
    """Makes each call process 0's runner publishes, in order, until `stop_followers` (processes > 0)."""
    runner = engine.runner
    names, channel, calls = _Names(runner), _Channel(), _device_calls(runner)
    while (call := channel.receive()) != _STOP:
        name, under_mesh, treedef, described = call
        if name not in calls:
            raise RuntimeError(f"process 0 published the device call {name!r}, not one of {DEVICE_CALLS}")
        args, kwargs = jax.tree.unflatten(treedef, [names.resolve(d) for d in described])
        with runner._mesh_context() if under_mesh else contextlib.nullcontext():
            names.add_outputs(calls[name](*args, **kwargs))


def _device_calls(runner) -> dict[str, Callable]:
    """The runner's device calls, checked against the protocol's list."""
    if tuple(runner.calls) != DEVICE_CALLS:
        raise RuntimeError(f"the runner's device calls {tuple(runner.calls)} are not the protocol's {DEVICE_CALLS}")
    return dict(runner.calls)


class _Published:
    """A device call of the leader's runner whose every call is published before it is made."""

    def __init__(self, name: str, fn: Callable, runner, names: "_Names", channel: "_Channel"):
        self._name, self._fn, self._runner, self._names, self._channel = name, fn, runner, names, channel

    def __call__(self, *args, **kwargs):
        leaves, treedef = jax.tree.flatten((args, kwargs))
        under_mesh = self._runner.mesh is not None and not jax.sharding.get_abstract_mesh().empty
        self._channel.publish((self._name, under_mesh, treedef, [self._names.describe(x) for x in leaves]))
        out = self._fn(*args, **kwargs)
        self._names.add_outputs(out)
        return out

    def __getattr__(self, name):  # _cache_size() and the rest of the jitted function
        return getattr(self._fn, name)


class _Names:
    """The device arrays a call may take, each under a name every process resolves to its own copy:
    ("attr", runner attribute, leaf index) or ("out", call number, leaf index)."""

    def __init__(self, runner):
        self._by_id: dict[int, tuple] = {}      # id(array) -> name; the array is held, so ids are not reused
        self._arrays: dict[tuple, jax.Array] = {}
        self._calls: collections.deque[list[tuple]] = collections.deque()
        self._num_calls = 0
        for attr, value in vars(runner).items():
            for i, leaf in enumerate(jax.tree.leaves(value)):
                if isinstance(leaf, jax.Array):
                    self._add(("attr", attr, i), leaf)

    def _add(self, name: tuple, array: jax.Array) -> None:
        self._by_id[id(array)] = name
        self._arrays[name] = array

    def add_outputs(self, out) -> None:
        names = [("out", self._num_calls, j) for j in range(len(jax.tree.leaves(out)))]
        for name, leaf in zip(names, jax.tree.leaves(out)):
            self._add(name, leaf)
        self._calls.append(names)
        self._num_calls += 1
        if len(self._calls) > _KEEP_CALLS:
            for name in self._calls.popleft():
                self._by_id.pop(id(self._arrays.pop(name)), None)

    def describe(self, leaf) -> tuple:
        if not isinstance(leaf, jax.Array):
            return ("value", leaf)
        name = self._by_id.get(id(leaf))
        if name is not None:
            return ("name", name)
        if not leaf.is_fully_addressable:
            raise RuntimeError(f"a jitted call took a device array ({leaf.shape} {leaf.dtype}) that is neither a "
                               "runner attribute nor a recent output, so other processes cannot find it")
        return ("array", np.asarray(leaf))  # a small host-made array, e.g. page ids to copy

    def resolve(self, described: tuple):
        kind, value = described
        if kind == "name":
            return self._arrays[value]
        return jnp.asarray(value) if kind == "array" else value


class _Channel:
    """Calls in order through the distributed runtime's key-value store: call n under key PREFIX/n."""

    def __init__(self):
        from jax._src import distributed
        self._client = distributed.global_state.client
        if self._client is None:
            raise RuntimeError("multi-host serving needs jax.distributed.initialize first "
                               "(jpaged.sharding.initialize_distributed)")
        self._n = 0

    def publish(self, call) -> None:
        self._client.key_value_set_bytes(f"{_PREFIX}/{self._n}", pickle.dumps(call))
        if self._n >= _WINDOW:
            self._client.key_value_delete(f"{_PREFIX}/{self._n - _WINDOW}")
        self._n += 1

    def receive(self):
        key = f"{_PREFIX}/{self._n}"
        while True:
            try:
                data = self._client.blocking_key_value_get_bytes(key, _POLL_MS)
                break
            except jax.errors.JaxRuntimeError as e:
                if "DEADLINE_EXCEEDED" not in str(e):
                    raise
        self._n += 1
        return pickle.loads(data)
