"""AsyncEngine: the one thread that owns the (not thread-safe) Engine, and asyncio streams into it.

Handlers on the event loop put commands (add, abort, stop) on a `queue.Queue`; the engine thread
drains it, steps while work exists and blocks on the queue when idle (no polling). Each step's
outputs go back to the loop in one `call_soon_threadsafe`, into one slot per request that holds only
the newest output: outputs are cumulative (text, token ids), so a stream that falls behind sends
everything it gained since its last send at once, and neither side ever waits on the other.

The engine thread does nothing but engine work: prompts arrive as token ids (the server tokenizes
them on its own threads), and a heartbeat after every step lets `stalled_for` tell a stuck step
from an idle engine.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
import time
import traceback
from typing import AsyncIterator, Callable

from jpaged.outputs import RequestOutput
from jpaged.sampling_params import SamplingParams

log = logging.getLogger("jpaged.server")


class QueueFullError(Exception):
    """More requests are in flight than the server accepts."""


class EngineDeadError(Exception):
    """The engine thread failed; no request can complete."""


class ShuttingDownError(EngineDeadError):
    """The server is shutting down; requests it could not finish in time end with this."""


class _Stream:
    """The newest output of one request (or the error that ended it), and the waiter woken by it."""

    __slots__ = ("latest", "error", "waiter", "finished")

    def __init__(self):
        self.latest: RequestOutput | None = None
        self.error: BaseException | None = None
        self.waiter: asyncio.Future | None = None
        self.finished = False

    def put(self, item) -> None:
        if isinstance(item, BaseException):
            self.error = item
        else:
            self.latest = item
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


_STOP = object()


class AsyncEngine:
    """Runs `engine_factory()` in its own thread; `stream_many` streams its RequestOutputs.

    Args:
      engine_factory: builds the engine (called on the engine thread, which then owns it).
      max_pending_requests: requests (running + waiting) accepted at once; more get QueueFullError.
      warmup: call the engine's `warmup(warmup_variants)` (compile every step shape) before serving; the
        state is "starting" until it returns.
      warmup_variants: "all" the sampler tiers or "plain" only (jpaged/engine/step_variants.py).
      stream_interval: seconds a stream waits after yielding before it looks for news, so that one
        write carries every token of that time (0: yield as soon as there is a new output).
    """

    def __init__(self, engine_factory: Callable[[], object], *, max_pending_requests: int = 1024,
                 warmup: bool = False, stream_interval: float = 0.0, warmup_variants: str = "all"):
        if max_pending_requests < 1:
            raise ValueError(f"max_pending_requests must be >= 1, got {max_pending_requests}")
        if not stream_interval >= 0:
            raise ValueError(f"stream_interval must be >= 0 seconds, got {stream_interval}")
        self._factory = engine_factory
        self._warmup = warmup
        self._warmup_variants = warmup_variants
        self._stream_interval = stream_interval
        self.max_pending_requests = max_pending_requests
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}  # touched only on the event loop
        self._live: set[str] = set()  # requests the engine holds; touched only on the engine thread
        self._thread: threading.Thread | None = None
        self._built = threading.Event()
        self._warm = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle = True
        self._heartbeat = time.monotonic()
        self.closed = False  # set by the server when it stops admitting
        self.engine = None
        self.error: BaseException | None = None
        self.stats: dict = {}  # replaced (never mutated) by the engine thread after every change
        self.model_name = ""
        self.max_model_len = 0

    # -- lifecycle (event loop side) ---------------------------------------------------------------

    async def start(self) -> None:
        """Builds the engine on its thread and returns once it is built (or raises its error); a
        warm-up, if asked for, goes on after that on the engine thread."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="jpaged-engine", daemon=True)
        self._thread.start()
        await self._loop.run_in_executor(None, self._built.wait)
        if self.error is not None:
            raise self.error

    async def shutdown(self) -> None:
        """Aborts whatever is still in flight and joins the engine thread."""
        if self._thread is None:
            return
        self._commands.put((_STOP,))
        await self._loop.run_in_executor(None, self._thread.join)
        self._thread = None
        self.fail_pending(ShuttingDownError("the server is shutting down"))

    @property
    def num_pending(self) -> int:
        return len(self._streams)

    @property
    def state(self) -> str:
        """'starting' (building or warming up), 'ready' or 'dead'."""
        if self.error is not None or (self._thread is None and self._built.is_set()):
            return "dead"
        return "ready" if self._warm else "starting"

    def stalled_for(self) -> float:
        """Seconds the engine thread has been busy without finishing a step (0 while idle)."""
        if self._idle or not self._warm:
            return 0.0
        return time.monotonic() - self._heartbeat

    def engine_stack(self) -> str:
        """The engine thread's current Python stack, for the log of a stall."""
        frame = sys._current_frames().get(self._thread.ident) if self._thread is not None else None
        return "".join(traceback.format_stack(frame)) if frame is not None else "(the engine thread is not running)"

    # -- requests (event loop side) ----------------------------------------------------------------

    async def add_many(self, requests: list[tuple]) -> None:
        """Queues requests of token ids, each (request_id, token_ids, params) or (..., lora_request), all
        or none: the capacity check covers them together, and if the engine refuses one (ValueError,
        naming its position) none of them stays."""
        if self.error is not None:
            raise EngineDeadError(f"engine failed: {self.error}")
        if self.closed:
            raise ShuttingDownError("the server is shutting down and accepts no new requests")
        if len(self._streams) + len(requests) > self.max_pending_requests:
            raise QueueFullError(f"the server is at its limit of {self.max_pending_requests} pending requests")
        ids = [request[0] for request in requests]
        if any(request_id in self._streams for request_id in ids):
            raise ValueError("request ids are already in use")
        for request_id in ids:
            self._streams[request_id] = _Stream()
        added = self._loop.create_future()
        self._commands.put(("add", requests, added))
        try:
            await added
        except BaseException:
            # Refused, or the caller went away before the engine answered: aborting an id the engine
            # never kept is a no-op.
            self.release(ids)
            raise

    async def call(self, fn: Callable[[object], object]):
        """fn(engine) on the engine thread, between steps (run-time changes such as loading a LoRA
        adapter); its result, or its exception raised here."""
        if self.error is not None:
            raise EngineDeadError(f"engine failed: {self.error}")
        if self.closed:
            raise ShuttingDownError("the server is shutting down")
        done = self._loop.create_future()
        self._commands.put(("call", fn, done))
        return await done

    async def stream(self, request_id: str) -> AsyncIterator[RequestOutput]:
        """Yields the newest output of an added request until it finishes; aborts it if left early."""
        stream = self._streams.get(request_id)
        if stream is None:  # already released
            return
        try:
            while not stream.finished:
                if stream.error is None and stream.latest is None:
                    stream.waiter = self._loop.create_future()
                    await stream.waiter
                if stream.error is not None:
                    raise stream.error
                item, stream.latest = stream.latest, None
                stream.finished = item.finished
                yield item
                if self._stream_interval and not stream.finished:
                    await asyncio.sleep(self._stream_interval)
        finally:
            self.release([request_id])

    async def stream_many(self, request_ids: list[str]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(position in request_ids, newest output) of several requests, interleaved as they progress.
        Leaving early aborts every request that has not finished."""
        if len(request_ids) == 1:
            async for out in self.stream(request_ids[0]):
                yield 0, out
            return
        merged: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i: int, request_id: str):
            try:
                async for out in self.stream(request_id):
                    merged.put_nowait((i, out))
            except Exception as e:
                merged.put_nowait((i, e))
            merged.put_nowait((i, done))

        tasks = [asyncio.ensure_future(pump(i, rid)) for i, rid in enumerate(request_ids)]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await merged.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield i, item
        finally:
            for task in tasks:
                task.cancel()
            self.release(request_ids)  # a pump cancelled before it started never ran stream()'s cleanup
            await asyncio.gather(*tasks, return_exceptions=True)

    def release(self, request_ids: list[str]) -> None:
        """Forgets the requests; those not finished are aborted. Safe to call more than once."""
        for request_id in request_ids:
            stream = self._streams.pop(request_id, None)
            if stream is not None and not stream.finished:
                self._commands.put(("abort", request_id))

    def fail_pending(self, error: BaseException) -> None:
        """Ends every pending request with `error` (its stream raises it) and aborts it in the engine."""
        for request_id, stream in list(self._streams.items()):
            stream.put(error)
            self._commands.put(("abort", request_id))

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        streams = self._streams
        for out in outputs:
            stream = streams.get(out.request_id)
            if stream is not None:
                stream.put(out)

    def _fail_streams(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.put(error)

    # -- the engine thread -------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.engine = self._factory()
            self.model_name = self.engine.model_name
            self.max_model_len = self.engine.max_model_len
            self.stats = self.engine.stats()
        except BaseException as e:  # reported by start()
            self.error = e
            self._built.set()
            return
        self._built.set()
        try:
            if self._warmup and hasattr(self.engine, "warmup"):
                log.info("warming up the engine (compiling every step shape; --no-warmup skips it)")
                start = time.monotonic()
                self.engine.warmup(self._warmup_variants)
                log.info("warm-up done in %.1f s", time.monotonic() - start)
            self._warm = True
            self._loop_forever()
        except BaseException as e:
            log.exception("engine thread failed")
            self.error = e
            self._fail_all(e)

    def _loop_forever(self) -> None:
        engine = self.engine
        while True:
            commands = []
            if not engine.has_unfinished():
                self._idle = True
                commands.append(self._commands.get())
                self._idle = False
            self._heartbeat = time.monotonic()
            while True:
                try:
                    commands.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            for command in commands:
                if command[0] is _STOP:
                    self._abort_all()
                    return
                self._apply(command)
            if engine.has_unfinished():
                outputs = engine.step()
                self._heartbeat = time.monotonic()
                if outputs:
                    self._live.difference_update(o.request_id for o in outputs if o.finished)
                    self._loop.call_soon_threadsafe(self._deliver, outputs)
            self.stats = engine.stats()

    def _apply(self, command: tuple) -> None:
        if command[0] == "call":
            _, fn, done = command
            try:
                result, error = fn(self.engine), None
            except Exception as e:  # the caller gets it; the engine thread goes on
                result, error = None, e
            self._loop.call_soon_threadsafe(_settle, done, error, result)
            return
        if command[0] == "abort":
            if command[1] in self._live:
                self.engine.abort(command[1])
                self._live.discard(command[1])
            return
        _, requests, added = command
        done: list[str] = []
        try:
            for position, (request_id, token_ids, params, *lora) in enumerate(requests):
                try:
                    self.engine.add_request(request_id, token_ids, params,
                                            **({"lora_request": lora[0]} if lora and lora[0] else {}))
                except ValueError as e:
                    raise ValueError(f"prompt {position}: {e}" if len(requests) > 1 else str(e)) from None
                done.append(request_id)
                self._live.add(request_id)
        except Exception as e:  # ValueError: the request can never run; anything else must not kill the thread
            for request_id in done:
                self.engine.abort(request_id)
                self._live.discard(request_id)
            self._loop.call_soon_threadsafe(_settle, added, e)
            return
        self._loop.call_soon_threadsafe(_settle, added, None)

    def _abort_all(self) -> None:
        for request_id in self._live:
            self.engine.abort(request_id)
        self._live.clear()
        self.stats = self.engine.stats()

    def _fail_all(self, error: BaseException) -> None:
        dead = EngineDeadError(f"engine failed: {error}")
        self._loop.call_soon_threadsafe(self._fail_streams, dead)
        for request_id in self._live:
            try:
                self.engine.abort(request_id)
            except Exception:  # the engine is already broken; the streams still need their error
                log.debug("abort of %s failed on the broken engine", request_id)
        while True:  # adds still queued would otherwise wait forever
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command[0] in ("add", "call"):
                self._loop.call_soon_threadsafe(_settle, command[-1], dead)


def _settle(future: asyncio.Future, error, result=None) -> None:
    if future.done():  # the handler was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
