"""The OpenAI-compatible HTTP API: FastAPI routes over an AsyncEngine, and `serve` to run it.

A route authenticates, reads its body under the size cap, parses and validates the request
(`protocol`), checks and tokenizes its prompts off the engine thread (`prompts`), adds one engine
request per prompt (the server picks the ids; clients never do), then either streams deltas as
server-sent events or waits for the final outputs. A stream sends, in one write, everything its
requests gained since its last write. Leaving early, by client disconnect or cancellation, aborts
the engine requests so their pages return to the pool.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import os
import time
from typing import AsyncIterator, Awaitable, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from jpaged.outputs import RequestOutput
from jpaged.server import protocol as p
from jpaged.server.async_engine import AsyncEngine, EngineDeadError, QueueFullError, ShuttingDownError
from jpaged.server.body_limit import check_limit, read_body
from jpaged.server.lora_routes import LoRAAdapters, add_routes as add_lora_routes
from jpaged.server.metrics import CONTENT_TYPE, ServerMetrics
from jpaged.server.prompts import PromptPreparer, longest_token_bytes, vocab_size_of
from jpaged.server.settings import ServerSettings
from jpaged.server import tools as tool_calling

try:
    import orjson

    def _dumps(obj) -> bytes:
        return orjson.dumps(obj)
except ImportError:  # orjson is optional; the standard library encodes the same JSON, slower
    import json

    def _dumps(obj) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

log = logging.getLogger("jpaged.server")

RETRY_AFTER_BUSY_S = 1       # 429: the queue is full; a request may fit a moment later
RETRY_AFTER_UNAVAILABLE_S = 5  # 503: starting, stalled, shutting down or failed
_DONE = b"data: [DONE]\n\n"


def _sse(obj: dict) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


def _json(obj, status: int = 200, headers: dict | None = None) -> Response:
    return Response(_dumps(obj), status_code=status, headers=headers, media_type="application/json")


def _error_response(e: p.ApiError) -> Response:
    return _json(e.body(), e.status, e.headers)


def _unavailable(message: str, code: str) -> p.ApiError:
    return p.ApiError(503, message, type="server_error", code=code, retry_after=RETRY_AFTER_UNAVAILABLE_S)


class _SSEResponse(Response):
    """Server-sent events written straight to the ASGI `send`, one write per chunk of `events`.

    However the response ends (done, client gone, cancelled, never started), `on_close` runs, so
    unfinished requests are aborted at once; a client that goes away is noticed while the stream
    waits for the engine, not only at its next write."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]):
        # Not Response.__init__: it would render an empty body and send Content-Length: 0.
        self.status_code, self.background = 200, None
        self.init_headers({"Cache-Control": "no-cache"})
        self._events, self._on_close = events, on_close

    async def __call__(self, scope, receive, send) -> None:
        streaming = asyncio.ensure_future(self._stream(send))
        watching = asyncio.ensure_future(_wait_for_disconnect(receive))
        try:
            await asyncio.wait([streaming, watching], return_when=asyncio.FIRST_COMPLETED)
        finally:
            watching.cancel()
            streaming.cancel()
            await asyncio.gather(streaming, watching, return_exceptions=True)
            self._on_close()

    async def _stream(self, send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self._events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away mid-write
            return
        finally:
            await self._events.aclose()


async def _wait_for_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _Server:
    """Per-app state and the route bodies (kept off module globals so tests can run several apps)."""

    def __init__(self, engine: AsyncEngine, settings: ServerSettings):
        self.engine = engine
        self.settings = settings
        self.prompts: PromptPreparer | None = None  # built once the engine (and its tokenizer) exists
        self.draining = False
        self.metrics = ServerMetrics(lambda: engine.stats, lambda: engine.num_pending)
        self.adapters = LoRAAdapters(engine)

    @property
    def model_name(self) -> str:
        return self.settings.served_model_name or self.engine.model_name

    async def start(self) -> None:
        await self.engine.start()
        engine = self.engine.engine
        vocab_size = vocab_size_of(engine)
        tokenizer_vocab = getattr(engine.tokenizer, "vocab_size", vocab_size)
        longest = await asyncio.get_running_loop().run_in_executor(
            None, longest_token_bytes, engine.tokenizer, min(vocab_size, tokenizer_vocab))
        self.prompts = PromptPreparer(engine.tokenizer, vocab_size=vocab_size, max_model_len=self.engine.max_model_len,
                                      max_token_bytes=longest)
        self.adapters.start()

    # -- checks --------------------------------------------------------------------------------------

    def check_auth(self, request: Request) -> None:
        api_key = self.settings.api_key
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise p.ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                             code="invalid_api_key")

    def check_admitting(self) -> None:
        """503 (with Retry-After) while the server cannot take new work."""
        if self.draining:
            raise _unavailable("the server is shutting down and accepts no new requests", "shutting_down")
        state = self.engine.state
        if state == "dead":
            raise _unavailable(f"engine is not running: {self.engine.error}", "engine_dead")
        if state == "starting":
            raise _unavailable("the engine is starting (warming up); retry shortly", "engine_starting")

    def check_model(self, model: str | None):
        """The LoRA adapter `model` names (jpaged/server/lora_routes.py), None for the base model; 404 else."""
        return self.adapters.resolve(model, self.model_name)

    def check_priority(self, params) -> None:
        policy = getattr(getattr(self.engine.engine, "config", None), "scheduling_policy", "priority")
        if params.priority and policy != "priority":
            raise p.ApiError(400, "'priority' needs the server to run with --scheduling-policy priority",
                             param="priority", code="invalid_value")

    def check_n(self, n: int) -> None:
        if n > self.settings.max_n:
            raise p.ApiError(400, f"'n' must be at most {self.settings.max_n}, got {n}", param="n",
                             code="invalid_value")

    def check_prompt_count(self, count: int) -> None:
        """A list of prompts larger than the whole queue can never run: 400, before any work."""
        if count > self.engine.max_pending_requests:
            raise p.ApiError(400, f"'prompt' holds {count} prompts; this server accepts at most "
                             f"{self.engine.max_pending_requests} requests at once", param="prompt",
                             code="too_many_prompts")
        if self.engine.num_pending + count > self.engine.max_pending_requests:
            raise p.ApiError(429, f"the server is at its limit of {self.engine.max_pending_requests} pending "
                             f"requests", type="rate_limit_exceeded", code="rate_limit_exceeded",
                             retry_after=RETRY_AFTER_BUSY_S)

    def resolve_max_tokens(self, params, token_ids: list[list[int]], param: str):
        """params with max_tokens set: an explicit value is checked against --max-tokens-limit; none
        (chat) means the context left after the longest prompt, capped by the limit."""
        limit = self.settings.max_tokens_limit
        if params.max_tokens is not None and limit is not None and params.max_tokens > limit:
            raise p.ApiError(400, f"max_tokens must be at most {limit} on this server, got {params.max_tokens}",
                             param="max_tokens", code="invalid_value")
        self.prompts.check_lengths(token_ids, params.max_tokens, param)
        if params.max_tokens is not None:
            return params
        left = self.engine.max_model_len - max(len(ids) for ids in token_ids)
        try:
            return dataclasses.replace(params, max_tokens=min(left, limit) if limit is not None else left)
        except ValueError as e:  # min_tokens beyond what the context leaves
            raise p.ApiError(400, str(e), param=str(e).split(" ", 1)[0], code="invalid_value") from None

    # -- engine requests -----------------------------------------------------------------------------

    async def add_all(self, base_id: str, token_ids: list[list[int]], params, *, param: str, lora=None,
                      constraint_param: str | None = None) -> None:
        """Adds one engine request per prompt (through the LoRA adapter `lora`, if any), all or none. A
        constraint the engine cannot compile is a 400 naming `constraint_param`, the field it came from."""
        try:
            await self.engine.add_many([(f"{base_id}-{i}", ids, params, lora) for i, ids in enumerate(token_ids)])
        except ValueError as e:
            if "structured_outputs" in str(e) and constraint_param is not None:
                raise p.ApiError(400, f"'{constraint_param}': {e}", param=constraint_param,
                                 code="invalid_value") from None
            if str(e).startswith("logit_bias"):
                raise p.ApiError(400, str(e), param="logit_bias", code="invalid_value") from None
            raise p.ApiError(400, str(e), param=param, code="invalid_prompt") from None
        except QueueFullError as e:
            raise p.ApiError(429, str(e), type="rate_limit_exceeded", code="rate_limit_exceeded",
                             retry_after=RETRY_AFTER_BUSY_S) from None
        except EngineDeadError as e:
            raise _engine_error(e) from None

    def releaser(self, base_id: str, count: int) -> Callable[[], None]:
        return lambda: self.engine.release([f"{base_id}-{i}" for i in range(count)])

    async def outputs(self, base_id: str, count: int, t0: float) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, newest cumulative output) of `count` requests as they progress, with metrics."""
        last = None
        metrics = self.metrics
        async for i, out in self.engine.stream_many([f"{base_id}-{i}" for i in range(count)]):
            now = time.monotonic()
            if last is None:
                metrics.ttft.observe(now - t0)
            else:
                metrics.itl.observe(now - last)
            last = now
            if out.finished:
                metrics.e2e.observe(now - t0)
                for c in out.outputs:
                    metrics.finished.labels(c.finish_reason or "abort").inc()
            yield i, out

    async def final_outputs(self, request: Request, base_id: str, count: int, t0: float) -> list[RequestOutput]:
        """Waits for every request to finish; a client disconnect cancels the wait (and so aborts)."""
        async def collect():
            final: dict[int, RequestOutput] = {}
            async for i, out in self.outputs(base_id, count, t0):
                if out.finished:
                    final[i] = out
            return [final[i] for i in range(count)]

        collecting = asyncio.ensure_future(collect())
        watching = asyncio.ensure_future(_wait_for_disconnect(request.receive))
        try:
            await asyncio.wait([collecting, watching], return_when=asyncio.FIRST_COMPLETED)
        finally:
            watching.cancel()
            self.releaser(base_id, count)()
            if not collecting.done():
                collecting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await collecting
        if collecting.cancelled():
            raise p.ApiError(499, "client closed the request", code="client_closed_request")
        try:
            return collecting.result()
        except EngineDeadError as e:
            raise _engine_error(e) from None

    # -- completions ---------------------------------------------------------------------------------

    async def completions(self, request: Request, body: bytes) -> Response:
        t0 = time.monotonic()
        req = _parse(p.CompletionRequest, body)
        lora = self.check_model(req.model)
        params = req.sampling_params()
        self.check_priority(params)
        self.check_n(params.n)
        prompts = req.prompts()
        self.check_prompt_count(len(prompts))
        token_ids = await self.prompts.token_ids(prompts, add_special_tokens=True, param="prompt")
        params = self.resolve_max_tokens(params, token_ids, "prompt")
        echo_texts = []
        if req.echo:
            echo_texts = [prompt if isinstance(prompt, str) else await self.prompts.decode(prompt)
                          for prompt in prompts]
        base_id = p.new_id("cmpl")
        await self.add_all(base_id, token_ids, params, param="prompt", lora=lora,
                           constraint_param=_constraint_field(req))
        head = {"id": base_id, "object": "text_completion", "created": int(time.time()),
                "model": lora.lora_name if lora else self.model_name}
        if req.stream:
            return _SSEResponse(self.completion_events(req, head, echo_texts, len(prompts), t0),
                                self.releaser(base_id, len(prompts)))
        finals = await self.final_outputs(request, base_id, len(prompts), t0)
        choices = []
        for i, out in enumerate(finals):
            echo, echo_logprobs = (echo_texts[i], self.prompt_logprobs(req, out)) if req.echo else ("", None)
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids, entries, text = ([], [], "") if req.echo_only else (c.token_ids, c.logprobs or [], c.text)
                logprobs = None
                if req.logprobs is not None:
                    logprobs = p.echoed_logprobs(echo_logprobs, p.completion_logprobs(ids, entries, len(echo)))
                choices.append({"index": i * params.n + c.index, "text": echo + text, "logprobs": logprobs,
                                "finish_reason": "length" if req.echo_only else c.finish_reason})
        return _json({**head, "choices": choices, "usage": _usage(finals, generated=not req.echo_only)})

    async def completion_events(self, req: p.CompletionRequest, head: dict, echo_texts: list[str], count: int,
                                t0: float) -> AsyncIterator[bytes]:
        deltas: dict[tuple[int, int], p.ChoiceDelta] = {}
        offsets: dict[tuple[int, int], int] = {}  # characters sent so far per choice (for text_offset)
        finals: dict[int, RequestOutput] = {}
        usage_field = {"usage": None} if req.include_usage else {}
        async for i, out in self._guarded(self.outputs(head["id"], count, t0)):
            if isinstance(out, bytes):
                yield out
                return
            events = []
            for c in out.outputs:
                key, echo, echo_logprobs = (i, c.index), "", None
                if key not in deltas:  # the first delta of a choice carries the echoed prompt
                    deltas[key] = p.ChoiceDelta()
                    if req.echo:
                        echo, echo_logprobs = echo_texts[i], self.prompt_logprobs(req, out)
                    offsets[key] = len(echo)
                delta = deltas[key]
                if delta.finished:
                    continue
                text, ids, entries = delta.advance(c)
                if req.echo_only:
                    text, ids, entries = "", [], []
                if not (echo or text or ids or delta.finished):
                    continue
                logprobs = (p.echoed_logprobs(echo_logprobs, p.completion_logprobs(ids, entries, offsets[key]))
                            if req.logprobs is not None else None)
                offsets[key] += len(text)
                finish = ("length" if req.echo_only else c.finish_reason) if delta.finished else None
                events.append(_sse({**head, "choices": [{"index": i * req.n + c.index, "text": echo + text,
                                                         "logprobs": logprobs, "finish_reason": finish}],
                                    **usage_field}))
            if out.finished:
                finals[i] = out
            if events:
                yield b"".join(events)
        tail = _sse({**head, "choices": [], "usage": _usage(list(finals.values()), generated=not req.echo_only)}) \
            if req.include_usage else b""
        yield tail + _DONE

    def prompt_logprobs(self, req: p.CompletionRequest, out: RequestOutput) -> dict | None:
        """The echoed prompt's part of a choice's logprobs (None without `logprobs`)."""
        if req.logprobs is None:
            return None
        entries = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
        return p.completion_logprobs(out.prompt_token_ids, entries, 0, self.engine.engine.tokenizer.decode)

    # -- chat ----------------------------------------------------------------------------------------

    async def chat(self, request: Request, body: bytes) -> Response:
        t0 = time.monotonic()
        req = _parse(p.ChatCompletionRequest, body)
        lora = self.check_model(req.model)
        plan = tool_calling.plan_for(req, self.settings.tool_call_parser, self.settings.enable_auto_tool_choice)
        params = req.sampling_params(forced=plan.forced, skip_special_tokens=plan.skip_special_tokens)
        self.check_priority(params)
        self.check_n(params.n)
        self.check_prompt_count(1)
        prompt = await self.prompts.chat_prompt([m.template_dict() for m in req.messages], plan.tools)
        token_ids = await self.prompts.token_ids([prompt], add_special_tokens=False, param="messages")
        params = self.resolve_max_tokens(params, token_ids, "messages")
        base_id = p.new_id("chatcmpl")
        await self.add_all(base_id, token_ids, params, param="messages", lora=lora,
                           constraint_param=_constraint_field(req, plan))
        head = {"id": base_id, "object": "chat.completion", "created": int(time.time()),
                "model": lora.lora_name if lora else self.model_name}
        top = req.top_logprobs or 0
        if req.stream:
            return _SSEResponse(self.chat_events(req, {**head, "object": "chat.completion.chunk"}, top, t0, plan),
                                self.releaser(base_id, 1))
        (out,) = await self.final_outputs(request, base_id, 1, t0)
        choices = [{"index": c.index, "message": _assistant_message(plan, c.text),
                    "logprobs": p.chat_logprobs(c.token_ids, c.logprobs or [], top) if req.logprobs else None,
                    "finish_reason": _finish_reason(plan, c)}
                   for c in sorted(out.outputs, key=lambda c: c.index)]
        return _json({**head, "choices": choices, "usage": _usage([out])})

    async def chat_events(self, req: p.ChatCompletionRequest, head: dict, top: int, t0: float,
                          plan: tool_calling.ToolPlan) -> AsyncIterator[bytes]:
        deltas: dict[int, p.ChoiceDelta] = {}
        tool_streams = {} if plan.parses else None  # choice index -> ToolCallStream
        final = None
        usage_field = {"usage": None} if req.include_usage else {}
        yield b"".join(_sse({**head, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}], **usage_field})
                       for index in range(req.n))
        async for _, out in self._guarded(self.outputs(head["id"], 1, t0)):
            if isinstance(out, bytes):
                yield out
                return
            events = []
            for c in out.outputs:
                delta = deltas.setdefault(c.index, p.ChoiceDelta())
                if delta.finished:
                    continue
                text, ids, entries = delta.advance(c)
                if not text and not ids and not delta.finished:
                    continue
                if tool_streams is not None:
                    stream = tool_streams.setdefault(c.index, plan.stream())
                    events += [_sse({**head, "choices": [choice], **usage_field})
                               for choice in _tool_choices(plan, stream, c, delta.finished)]
                    continue
                events.append(_sse({**head, "choices": [{
                    "index": c.index, "delta": {"content": text} if text or not delta.finished else {},
                    "logprobs": p.chat_logprobs(ids, entries, top) if req.logprobs else None,
                    "finish_reason": c.finish_reason if delta.finished else None}], **usage_field}))
            if out.finished:
                final = out
            if events:
                yield b"".join(events)
        tail = _sse({**head, "choices": [], "usage": _usage([final] if final else [])}) if req.include_usage else b""
        yield tail + _DONE

    async def _guarded(self, outputs: AsyncIterator) -> AsyncIterator:
        """Passes outputs through; an engine failure or the end of a shutdown's grace period becomes one
        OpenAI-shaped error event and [DONE]."""
        try:
            async for item in outputs:
                yield item
        except EngineDeadError as e:
            yield 0, _sse(_engine_error(e).body()) + _DONE

    # -- shutdown ------------------------------------------------------------------------------------

    async def drain(self, timeout: float) -> None:
        """Stops admitting, lets pending requests finish for `timeout` seconds, then ends the rest:
        each open stream with an error event and [DONE], each waiting request with a 503."""
        self.draining = True
        self.engine.closed = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self.engine.num_pending:
            log.info("shutting down: waiting up to %g s for %d requests", timeout, self.engine.num_pending)
        while self.engine.num_pending and loop.time() < deadline:
            await asyncio.sleep(0.02)
        if self.engine.num_pending:
            log.warning("shutting down: ending %d requests unfinished after %g s", self.engine.num_pending, timeout)
            self.engine.fail_pending(ShuttingDownError(
                f"the server is shutting down and could not finish this request within {timeout:g} s"))
            settle = loop.time() + 5.0
            while self.engine.num_pending and loop.time() < settle:  # their handlers write the final answers
                await asyncio.sleep(0.01)


def _engine_error(e: EngineDeadError) -> p.ApiError:
    return _unavailable(str(e), "shutting_down" if isinstance(e, ShuttingDownError) else "engine_dead")


def _constraint_field(req, plan: tool_calling.ToolPlan | None = None) -> str | None:
    """The request field its output constraint came from (for a 400 about it)."""
    sources = p._constraint_sources(req)
    if sources:
        return sources[0][0]
    return "tool_choice" if plan is not None and plan.forced is not None else None


def _assistant_message(plan: tool_calling.ToolPlan, text: str) -> dict:
    content, calls = plan.split(text)
    message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [call.wire() for call in calls]
    return message


def _finish_reason(plan: tool_calling.ToolPlan, c) -> str | None:
    if c.finish_reason == "stop" and plan.parses and plan.split(c.text)[1]:
        return "tool_calls"
    return c.finish_reason


def _tool_choices(plan: tool_calling.ToolPlan, stream: tool_calling.ToolCallStream, c, finished: bool) -> list[dict]:
    """Streamed choice deltas of a chat with tools: content while it is plain text, then each tool call
    (its id and name, then its arguments), then the finish reason."""
    index = c.index
    if not finished:
        text = stream.content_delta(c.text)
        return [{"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}] if text else []
    rest, calls = stream.finish(c.text)
    if not plan.parallel:
        calls = calls[:1]
    out = []
    if rest:
        out.append({"index": index, "delta": {"content": rest}, "logprobs": None, "finish_reason": None})
    for i, call in enumerate(calls):
        head = {"index": i, "id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": ""}}
        out.append({"index": index, "delta": {"tool_calls": [head]}, "logprobs": None, "finish_reason": None})
        out.append({"index": index, "delta": {"tool_calls": [{"index": i, "function": {"arguments": call.arguments}}]},
                    "logprobs": None, "finish_reason": None})
    reason = "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason
    out.append({"index": index, "delta": {}, "logprobs": None, "finish_reason": reason})
    return out


def _usage(outputs: list[RequestOutput], generated: bool = True) -> dict:
    """Token counts; `generated=False` for echo-only scoring, whose one computed token is not returned."""
    return p.usage(sum(len(o.prompt_token_ids) for o in outputs),
                   sum(len(c.token_ids) for o in outputs for c in o.outputs) if generated else 0)


def _parse(model, body: bytes):
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise p.validation_error(e) from None


# -- the app -------------------------------------------------------------------------------------------


async def kv_cache_page(engine: AsyncEngine, request: Request) -> Response:
    """GET /debug/kv-cache[?format=png|json|html]: the cache map (jpaged/engine/cache_map.py)."""
    from jpaged.engine.cache_map import render_html, render_png

    fmt = request.query_params.get("format", "png")
    if fmt not in ("png", "json", "html"):
        raise p.ApiError(400, f"format must be png, json or html, got {fmt!r}", param="format")
    if fmt == "html":
        return Response(render_html(), media_type="text/html")
    if not hasattr(engine.engine, "cache_map"):
        raise p.ApiError(501, "this engine has no cache map")
    data = await engine.call(lambda e: e.cache_map())
    if fmt == "json":
        return _json(data)
    png = await asyncio.get_running_loop().run_in_executor(None, render_png, data)
    return Response(png, media_type="image/png")


def build_app(engine_factory: Callable[[], object], settings: ServerSettings | None = None, **overrides) -> FastAPI:
    """The FastAPI app. The engine is built by `engine_factory()` on the engine thread at startup.

    Args:
      engine_factory: returns an object with the Engine contract (tests pass a fake).
      settings: the server's limits and timeouts (`ServerSettings`); `overrides` replace its fields
        (`build_app(factory, api_key="k")`).
    """
    settings = dataclasses.replace(settings or ServerSettings(), **overrides)
    check_limit(settings.max_request_bytes)
    engine = AsyncEngine(engine_factory, max_pending_requests=settings.max_pending_requests, warmup=settings.warmup,
                         stream_interval=settings.stream_interval, warmup_variants=settings.warmup_variants)
    server = _Server(engine, settings)

    async def watch_engine():
        """Logs, once per stall, what the engine thread is doing when a step takes too long."""
        timeout = settings.engine_stall_timeout
        stalled = False
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            busy = engine.stalled_for()
            if busy > timeout and not stalled:
                log.error("the engine thread has been in one step for %.1f s (--engine-stall-timeout %g); /health "
                          "answers 503 until it finishes. Its stack:\n%s", busy, timeout, engine.engine_stack())
            elif busy <= timeout and stalled:
                log.warning("the engine thread finished its step; serving again")
            stalled = busy > timeout

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await server.start()
        watchdog = asyncio.ensure_future(watch_engine())
        log.info("serving %s (max_model_len=%d)", server.model_name, engine.max_model_len)
        try:
            yield
        finally:
            watchdog.cancel()
            await engine.shutdown()
            server.prompts.close()

    app = FastAPI(title="jpaged", lifespan=lifespan)
    app.state.server = server
    requests_metric = server.metrics.requests

    def route(endpoint: str, handler: Callable[..., Awaitable[Response]], *, auth: bool = True,
              body: bool = False, admit: bool = False):
        """The handler, behind auth, the body cap and admission; one request count per answer, labelled
        by this route's name (never by what the client sent)."""
        async def wrapped(request: Request) -> Response:
            try:
                if auth:
                    server.check_auth(request)
                if admit:
                    server.check_admitting()
                if body:
                    response = await handler(request, await read_body(request, settings.max_request_bytes))
                else:
                    response = await handler(request)
            except p.ApiError as e:
                response = _error_response(e)
            requests_metric.labels(endpoint, str(response.status_code)).inc()
            return response
        return wrapped

    async def models(request: Request) -> Response:
        listing = p.model_list(server.model_name, engine.max_model_len)
        listing["data"] += server.adapters.cards(server.model_name)
        return _json(listing)

    async def model(request: Request) -> Response:
        lora = server.check_model(request.path_params["model_id"])
        if lora is None:
            return _json(p.model_card(server.model_name, engine.max_model_len))
        return _json(next(c for c in server.adapters.cards(server.model_name) if c["id"] == lora.lora_name))

    async def tokenize(request: Request, body: bytes) -> Response:
        req = _parse(p.TokenizeRequest, body)
        server.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise p.ApiError(400, "give exactly one of 'prompt' and 'messages'", param="prompt", code="invalid_value")
        if req.messages is not None:
            text = await server.prompts.chat_prompt([m.template_dict() for m in req.messages],
                                                    add_generation_prompt=req.add_generation_prompt)
            add_special = False
        else:
            text, add_special = req.prompt, req.add_special_tokens
        (ids,) = await server.prompts.token_ids([text], add_special_tokens=add_special, param="prompt")
        return _json({"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids})

    async def detokenize(request: Request, body: bytes) -> Response:
        req = _parse(p.DetokenizeRequest, body)
        server.check_model(req.model)
        server.prompts.check_token_ids([req.tokens], "tokens")
        return _json({"prompt": await server.prompts.decode(req.tokens)})

    async def health(request: Request) -> Response:
        if server.draining:
            raise _unavailable("the server is shutting down", "shutting_down")
        state = engine.state
        if state == "dead":
            raise _unavailable(f"engine is not running: {engine.error}", "engine_dead")
        if state == "starting":
            raise _unavailable("the engine is starting (warming up)", "engine_starting")
        busy = engine.stalled_for()
        if busy > settings.engine_stall_timeout:
            raise _unavailable(f"the engine has been in one step for {busy:.0f} s (stall timeout "
                               f"{settings.engine_stall_timeout:g} s)", "engine_stalled")
        return _json({"status": "ok"})

    async def metrics(request: Request) -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    app.add_api_route("/v1/models", route("models", models), methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", route("model", model), methods=["GET"])
    app.add_api_route("/v1/completions", route("completions", server.completions, body=True, admit=True),
                      methods=["POST"])
    app.add_api_route("/v1/chat/completions", route("chat", server.chat, body=True, admit=True), methods=["POST"])
    add_lora_routes(app, server.adapters, route, _parse)
    app.add_api_route("/tokenize", route("tokenize", tokenize, body=True, admit=True), methods=["POST"])
    app.add_api_route("/detokenize", route("detokenize", detokenize, body=True, admit=True), methods=["POST"])
    app.add_api_route("/health", route("health", health, auth=False), methods=["GET"])
    app.add_api_route("/metrics", route("metrics", metrics, auth=False), methods=["GET"])
    app.add_api_route("/debug/kv-cache", route("kv_cache", lambda request: kv_cache_page(engine, request)),
                      methods=["GET"])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        error = p.ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                           code="not_found" if exc.status_code == 404 else None)
        requests_metric.labels("unmatched", str(exc.status_code)).inc()  # one series for every unknown route
        return _error_response(error)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _error_response(p.ApiError(500, f"internal server error: {type(exc).__name__}: {exc}",
                                          type="server_error"))

    return app


def engine_config(args_or_config):
    """An EngineConfig from itself or from an argparse namespace holding (some of) its fields."""
    from jpaged.config import EngineConfig
    if isinstance(args_or_config, EngineConfig):
        return args_or_config
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    given = {k: v for k, v in vars(args_or_config).items() if k in names and v is not None}
    return EngineConfig(**given)


class _DrainingServer(uvicorn.Server):
    """uvicorn with jpaged's shutdown: the first SIGTERM/SIGINT drains (`_Server.drain`) while the port
    stays open to answer 503, then exits with status 0; a second one exits at once."""

    def __init__(self, config: uvicorn.Config, app_server: _Server, shutdown_timeout: float):
        super().__init__(config)
        self._app_server, self._shutdown_timeout = app_server, shutdown_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._drain_task: asyncio.Task | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig, frame) -> None:
        # Not recorded in _captured_signals: uvicorn would re-raise it at exit, ending the process by signal.
        self.begin_shutdown()

    def begin_shutdown(self) -> None:
        """Starts the drain (thread-safe); called again, exits without waiting."""
        if self._loop is None or self._draining:
            self.should_exit = True
            self.force_exit = self._draining
            return
        self._draining = True
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())  # held: the loop keeps only a weak reference

    async def _drain(self) -> None:
        try:
            await self._app_server.drain(self._shutdown_timeout)
        finally:
            self.should_exit = True


def _uvicorn_server(app: FastAPI, settings: ServerSettings, **config) -> _DrainingServer:
    config = uvicorn.Config(app, timeout_keep_alive=settings.keep_alive_timeout,
                            h11_max_incomplete_event_size=settings.max_header_bytes,
                            timeout_graceful_shutdown=5, **config)
    return _DrainingServer(config, app.state.server, settings.shutdown_timeout)


def serve(args_or_config, settings: ServerSettings | None = None, *, log_level: str = "info",
          engine_factory: Callable[[], object] | None = None) -> None:
    """Runs the server until SIGINT/SIGTERM, then drains: see `_Server.drain` and docs/server.md.

    Args:
      args_or_config: an EngineConfig, or an argparse namespace with EngineConfig's field names.
      settings: host, port, limits and timeouts (default `ServerSettings()`).
      engine_factory: overrides building `make_engine(config)` (tests, benchmarks with a fake engine).
    """
    settings = settings or ServerSettings()
    engine = None
    if engine_factory is None:
        from jpaged.engine.data_parallel import make_engine

        if settings.compilation_cache:
            enable_compilation_cache()

        # Built before the port opens, so a bad --model is one error line (ValueError), not a server traceback.
        engine = make_engine(engine_config(args_or_config))

        def engine_factory():
            return engine

    app = build_app(engine_factory, settings)

    def serve_http():
        _uvicorn_server(app, settings, host=settings.host, port=settings.port, log_level=log_level).run()

    if engine is None:
        serve_http()
    else:  # a multi-host run: process 0 serves, the other processes follow its engine's calls
        from jpaged.engine import multihost
        multihost.lead_or_follow(engine, serve_http)


def enable_compilation_cache() -> str:
    """Turns on JAX's persistent compilation cache in `$JAX_COMPILATION_CACHE_DIR`, by default
    `$JPAGED_CACHE/xla`; returns the directory."""
    import jax

    from jpaged.loader.default_model import cache_dir

    path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(cache_dir() / "xla")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


class BackgroundServer:
    """The app served by uvicorn on a thread of this process (tests and benchmarks on loopback).

    `with BackgroundServer(app) as url:` starts it on a free port of `host` and stops it on exit;
    `shutdown()` runs the drain a SIGTERM would.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import socket
        import threading

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.url = f"http://{host}:{self._sock.getsockname()[1]}"
        self.server = _uvicorn_server(app, app.state.server.settings, log_level="warning")
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server failed to start (see its log)")
            time.sleep(0.01)
        return self.url

    def shutdown(self) -> None:
        self.server.begin_shutdown()

    def join(self, timeout: float | None = None) -> bool:
        """Waits for the server to exit; True if it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join()
        self._sock.close()
