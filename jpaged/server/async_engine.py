"""AsyncEngine: the one thread that owns the (not thread-safe) Engine, and asyncio streams into it.

Handlers on the event loop put commands (add, abort, stop) on a `queue.Queue`; the engine thread
drains it, steps while work exists and blocks on the queue when idle (no polling). Each step's
outputs go back to the loop in one `call_soon_threadsafe`, onto per-request `asyncio.Queue`s that
never fill, so neither side ever waits on the other. Outputs are cumulative (text, token ids), so a
consumer that falls behind only needs the newest one.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
from typing import AsyncIterator, Callable

from jpaged.outputs import RequestOutput
from jpaged.sampling_params import SamplingParams

log = logging.getLogger("jpaged.server")


class QueueFullError(Exception):
    """More requests are in flight than the server accepts."""


class EngineDeadError(Exception):
    """The engine thread failed; no request can complete."""


@dataclasses.dataclass
class PreparedPrompt:
    text: str            # the prompt as text (decoded when it came as token ids)
    token_ids: list[int]


@dataclasses.dataclass
class _Stream:
    queue: asyncio.Queue
    finished: bool = False


_STOP = object()


class AsyncEngine:
    """Runs `engine_factory()` in its own thread; `generate` streams its RequestOutputs.

    Args:
      engine_factory: builds the engine (called on the engine thread, which then owns it).
      max_pending_requests: requests (running + waiting) accepted at once; more get QueueFullError.
    """

    def __init__(self, engine_factory: Callable[[], object], *, max_pending_requests: int = 1024):
        if max_pending_requests < 1:
            raise ValueError(f"max_pending_requests must be >= 1, got {max_pending_requests}")
        self._factory = engine_factory
        self.max_pending_requests = max_pending_requests
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}  # touched only on the event loop
        self._live: set[str] = set()  # requests the engine holds; touched only on the engine thread
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.engine = None
        self.error: BaseException | None = None
        self.stats: dict = {}  # replaced (never mutated) by the engine thread after every change
        self.model_name = ""
        self.max_model_len = 0

    # -- lifecycle (event loop side) ---------------------------------------------------------------

    async def start(self) -> None:
        """Builds the engine on its thread and returns once it is ready (or raises its error)."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="jpaged-engine", daemon=True)
        self._thread.start()
        await self._loop.run_in_executor(None, self._ready.wait)
        if self.error is not None:
            raise self.error

    async def shutdown(self) -> None:
        """Aborts whatever is still in flight and joins the engine thread."""
        if self._thread is None:
            return
        self._commands.put((_STOP,))
        await self._loop.run_in_executor(None, self._thread.join)
        self._thread = None
        self._deliver([(rid, EngineDeadError("the server is shutting down")) for rid in self._streams])

    @property
    def num_pending(self) -> int:
        return len(self._streams)

    @property
    def healthy(self) -> bool:
        return self._ready.is_set() and self.error is None and self._thread is not None

    # -- requests (event loop side) ----------------------------------------------------------------

    async def add(self, request_id: str, prompt: str | list[int], params: SamplingParams, *,
                  add_special_tokens: bool = True) -> PreparedPrompt:
        """Tokenizes and queues a request on the engine thread. ValueError: it can never run."""
        if self.error is not None:
            raise EngineDeadError(f"engine failed: {self.error}")
        if len(self._streams) >= self.max_pending_requests:
            raise QueueFullError(f"the server is at its limit of {self.max_pending_requests} pending requests")
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        stream = self._streams[request_id] = _Stream(asyncio.Queue())
        added = self._loop.create_future()
        self._commands.put(("add", request_id, prompt, params, add_special_tokens, added))
        try:
            return await added
        except BaseException:
            # Rejected, or the caller went away before the engine answered: the abort is a no-op for
            # an id the engine never kept.
            self._streams.pop(request_id, None)
            if not stream.finished:
                self._commands.put(("abort", request_id))
            raise

    async def stream(self, request_id: str) -> AsyncIterator[RequestOutput]:
        """Yields the newest output of an added request until it finishes; aborts it if left early."""
        stream = self._streams.get(request_id)
        if stream is None:  # already released
            return
        try:
            while not stream.finished:
                item = await stream.queue.get()
                while not stream.queue.empty():  # cumulative outputs: only the newest matters
                    item = stream.queue.get_nowait()
                if isinstance(item, BaseException):
                    raise item
                stream.finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not stream.finished:
                self.abort(request_id)

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

    def abort(self, request_id: str) -> None:
        """Stops a request: its stream goes away here and the engine frees its pages."""
        self._streams.pop(request_id, None)
        self._commands.put(("abort", request_id))

    def _deliver(self, items: list[tuple[str, object]]) -> None:
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.queue.put_nowait(item)

    # -- the engine thread -------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.engine = self._factory()
            self.model_name = self.engine.model_name
            self.max_model_len = self.engine.max_model_len
            self.stats = self.engine.stats()
        except BaseException as e:  # reported by start()
            self.error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop_forever()
        except BaseException as e:
            log.exception("engine thread failed")
            self.error = e
            self._fail_all(e)

    def _loop_forever(self) -> None:
        engine = self.engine
        while True:
            block = not engine.has_unfinished()
            commands = [self._commands.get()] if block else []
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
                self._live.difference_update(o.request_id for o in outputs if o.finished)
                if outputs:
                    self._loop.call_soon_threadsafe(self._deliver, [(o.request_id, o) for o in outputs])
            self.stats = engine.stats()

    def _apply(self, command: tuple) -> None:
        if command[0] == "abort":
            self.engine.abort(command[1])
            self._live.discard(command[1])
            return
        _, request_id, prompt, params, add_special_tokens, added = command
        try:
            prepared = self._prepare(prompt, params, add_special_tokens)
            self.engine.add_request(request_id, prepared.token_ids, params)
            self._live.add(request_id)
        except Exception as e:  # ValueError: the request can never run; anything else must not kill the thread
            self._loop.call_soon_threadsafe(_settle, added, None, e)
            return
        self._loop.call_soon_threadsafe(_settle, added, prepared, None)

    def _prepare(self, prompt: str | list[int], params: SamplingParams, add_special_tokens: bool) -> PreparedPrompt:
        tokenizer = self.engine.tokenizer
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
            text = prompt
        else:
            ids = list(prompt)
            text = tokenizer.decode(ids, skip_special_tokens=False)
        limit = self.max_model_len
        if len(ids) >= limit:
            raise ValueError(f"the prompt has {len(ids)} tokens; this model's maximum context length is "
                             f"{limit} tokens, which leaves no room to generate")
        if params.max_tokens is not None and len(ids) + params.max_tokens > limit:
            raise ValueError(f"this model's maximum context length is {limit} tokens, but {len(ids) + params.max_tokens}"
                             f" were requested ({len(ids)} in the prompt, {params.max_tokens} in max_tokens)")
        return PreparedPrompt(text, ids)

    def _abort_all(self) -> None:
        for request_id in self._live:
            self.engine.abort(request_id)
        self._live.clear()
        self.stats = self.engine.stats()

    def _fail_all(self, error: BaseException) -> None:
        dead = EngineDeadError(f"engine failed: {error}")
        self._loop.call_soon_threadsafe(self._deliver, [(rid, dead) for rid in self._live])
        for request_id in self._live:
            try:
                self.engine.abort(request_id)
            except Exception:  # the engine is already broken; the streams still need their error
                pass
        while True:  # adds still queued would otherwise wait forever
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command[0] == "add":
                self._loop.call_soon_threadsafe(_settle, command[-1], None, dead)


def _settle(future: asyncio.Future, result, error) -> None:
    if future.done():  # the handler was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
