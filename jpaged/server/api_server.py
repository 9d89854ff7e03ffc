"""The OpenAI-compatible HTTP API: FastAPI routes over an AsyncEngine, and `serve` to run it.

A route parses and validates its request (`protocol`), adds one engine request per prompt (the server
picks the ids; clients never do), then either streams deltas as server-sent events or waits for the
final outputs. Leaving early, by client disconnect or cancellation, aborts the engine requests so
their pages return to the pool.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from typing import AsyncIterator, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from jpaged.outputs import RequestOutput
from jpaged.server import protocol as p
from jpaged.server.async_engine import AsyncEngine, EngineDeadError, PreparedPrompt, QueueFullError
from jpaged.server.body_limit import DEFAULT_MAX_REQUEST_BYTES, BodySizeLimit, check_limit
from jpaged.server.metrics import CONTENT_TYPE, ServerMetrics

log = logging.getLogger("jpaged.server")


class _SSEResponse(StreamingResponse):
    """Server-sent events; however the response ends (done, client gone, cancelled, never started),
    `on_close` runs, so unfinished requests are aborted at once."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"


class _Server:
    """Per-app state and the route bodies (kept off module globals so tests can run several apps)."""

    def __init__(self, engine: AsyncEngine, *, api_key: str | None, served_model_name: str | None, max_n: int):
        self.engine = engine
        self.api_key = api_key
        self._served_name = served_model_name
        self.max_n = max_n
        self.metrics = ServerMetrics(lambda: engine.stats, lambda: engine.num_pending)

    @property
    def model_name(self) -> str:
        return self._served_name or self.engine.model_name

    # -- checks --------------------------------------------------------------------------------------

    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise p.ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                             code="invalid_api_key")

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise p.ApiError(404, f"the model '{model}' does not exist; this server serves '{self.model_name}'",
                             param="model", code="model_not_found")

    def check_n(self, n: int) -> None:
        if n > self.max_n:
            raise p.ApiError(400, f"'n' must be at most {self.max_n}, got {n}", param="n", code="invalid_value")

    # -- engine requests -----------------------------------------------------------------------------

    async def add_all(self, base_id: str, prompts: list, params, *, add_special_tokens: bool,
                      param: str) -> list[PreparedPrompt]:
        """Adds one engine request per prompt; on any failure none of them stays."""
        prepared: list[PreparedPrompt] = []
        try:
            for i, prompt in enumerate(prompts):
                prepared.append(await self.engine.add(f"{base_id}-{i}", prompt, params,
                                                      add_special_tokens=add_special_tokens))
        except BaseException as e:
            for i in range(len(prepared)):
                self.engine.abort(f"{base_id}-{i}")
            if isinstance(e, ValueError):
                raise p.ApiError(400, str(e), param=param, code="invalid_prompt") from None
            if isinstance(e, QueueFullError):
                raise p.ApiError(429, str(e), type="rate_limit_exceeded", code="rate_limit_exceeded") from None
            if isinstance(e, EngineDeadError):
                raise p.ApiError(503, str(e), type="server_error", code="engine_dead") from None
            raise
        return prepared

    def releaser(self, base_id: str, count: int) -> Callable[[], None]:
        return lambda: self.engine.release([f"{base_id}-{i}" for i in range(count)])

    async def outputs(self, base_id: str, count: int, t0: float) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, newest cumulative output) of `count` requests as they progress, with metrics."""
        last = None
        async for i, out in self.engine.stream_many([f"{base_id}-{i}" for i in range(count)]):
            now = time.monotonic()
            if last is None:
                self.metrics.ttft.observe(now - t0)
            else:
                self.metrics.itl.observe(now - last)
            last = now
            if out.finished:
                self.metrics.e2e.observe(now - t0)
                for c in out.outputs:
                    self.metrics.finished.labels(c.finish_reason or "abort").inc()
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
        watching = asyncio.ensure_future(_wait_for_disconnect(request))
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
            raise p.ApiError(503, str(e), type="server_error", code="engine_dead") from None

    # -- completions ---------------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        t0 = time.monotonic()
        req = _parse(p.CompletionRequest, await request.body())
        self.check_model(req.model)
        params = req.sampling_params()
        self.check_n(params.n)
        prompts = req.prompts()
        base_id = p.new_id("cmpl")
        prepared = await self.add_all(base_id, prompts, params, add_special_tokens=True, param="prompt")
        head = {"id": base_id, "object": "text_completion", "created": int(time.time()), "model": self.model_name}
        if req.stream:
            return _SSEResponse(self.completion_events(req, head, prepared, t0), self.releaser(base_id, len(prompts)))
        finals = await self.final_outputs(request, base_id, len(prompts), t0)
        choices = []
        for i, out in enumerate(finals):
            echo, echo_logprobs = (prepared[i].text, self.prompt_logprobs(req, out)) if req.echo else ("", None)
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids, entries, text = ([], [], "") if req.echo_only else (c.token_ids, c.logprobs or [], c.text)
                logprobs = None
                if req.logprobs is not None:
                    logprobs = p.echoed_logprobs(echo_logprobs, p.completion_logprobs(ids, entries, len(echo)))
                choices.append({"index": i * params.n + c.index, "text": echo + text, "logprobs": logprobs,
                                "finish_reason": "length" if req.echo_only else c.finish_reason})
        return JSONResponse({**head, "choices": choices, "usage": _usage(finals, generated=not req.echo_only)})

    async def completion_events(self, req: p.CompletionRequest, head: dict, prepared: list[PreparedPrompt],
                                t0: float) -> AsyncIterator[str]:
        deltas: dict[tuple[int, int], p.ChoiceDelta] = {}
        offsets: dict[tuple[int, int], int] = {}  # characters sent so far per choice (for text_offset)
        finals: dict[int, RequestOutput] = {}
        usage_field = {"usage": None} if req.include_usage else {}
        async for i, out in self._guarded(self.outputs(head["id"], len(prepared), t0)):
            if isinstance(out, str):
                yield out
                return
            for c in out.outputs:
                key, echo, echo_logprobs = (i, c.index), "", None
                if key not in deltas:  # the first delta of a choice carries the echoed prompt
                    deltas[key] = p.ChoiceDelta()
                    if req.echo:
                        echo, echo_logprobs = prepared[i].text, self.prompt_logprobs(req, out)
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
                yield _sse({**head, "choices": [{"index": i * req.n + c.index, "text": echo + text,
                                                 "logprobs": logprobs, "finish_reason": finish}],
                            **usage_field})
            if out.finished:
                finals[i] = out
        if req.include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(list(finals.values()), generated=not req.echo_only)})
        yield _sse("[DONE]")

    def prompt_logprobs(self, req: p.CompletionRequest, out: RequestOutput) -> dict | None:
        """The echoed prompt's part of a choice's logprobs (None without `logprobs`)."""
        if req.logprobs is None:
            return None
        entries = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
        return p.completion_logprobs(out.prompt_token_ids, entries, 0, self.engine.engine.tokenizer.decode)

    # -- chat ----------------------------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        t0 = time.monotonic()
        req = _parse(p.ChatCompletionRequest, await request.body())
        self.check_model(req.model)
        params = req.sampling_params()
        self.check_n(params.n)
        try:
            prompt = self.engine.engine.tokenizer.apply_chat_template(
                [m.template_dict() for m in req.messages], add_generation_prompt=True)
        except Exception as e:  # no template, or one that rejects the conversation (roles out of order)
            message = str(e) if isinstance(e, ValueError) else f"the chat template rejected 'messages': {e}"
            raise p.ApiError(400, message, param="messages", code="invalid_messages") from None
        base_id = p.new_id("chatcmpl")
        await self.add_all(base_id, [prompt], params, add_special_tokens=False, param="messages")
        head = {"id": base_id, "object": "chat.completion", "created": int(time.time()), "model": self.model_name}
        top = req.top_logprobs or 0
        if req.stream:
            return _SSEResponse(self.chat_events(req, {**head, "object": "chat.completion.chunk"}, top, t0),
                                self.releaser(base_id, 1))
        (out,) = await self.final_outputs(request, base_id, 1, t0)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": p.chat_logprobs(c.token_ids, c.logprobs or [], top) if req.logprobs else None,
                    "finish_reason": c.finish_reason}
                   for c in sorted(out.outputs, key=lambda c: c.index)]
        return JSONResponse({**head, "choices": choices, "usage": _usage([out])})

    async def chat_events(self, req: p.ChatCompletionRequest, head: dict, top: int, t0: float) -> AsyncIterator[str]:
        deltas: dict[int, p.ChoiceDelta] = {}
        final = None
        usage_field = {"usage": None} if req.include_usage else {}
        for index in range(req.n):
            yield _sse({**head, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}], **usage_field})
        async for _, out in self._guarded(self.outputs(head["id"], 1, t0)):
            if isinstance(out, str):
                yield out
                return
            for c in out.outputs:
                delta = deltas.setdefault(c.index, p.ChoiceDelta())
                if delta.finished:
                    continue
                text, ids, entries = delta.advance(c)
                if not text and not ids and not delta.finished:
                    continue
                yield _sse({**head, "choices": [{
                    "index": c.index, "delta": {"content": text} if text or not delta.finished else {},
                    "logprobs": p.chat_logprobs(ids, entries, top) if req.logprobs else None,
                    "finish_reason": c.finish_reason if delta.finished else None}], **usage_field})
            if out.finished:
                final = out
        if req.include_usage:
            yield _sse({**head, "choices": [], "usage": _usage([final] if final else [])})
        yield _sse("[DONE]")

    async def _guarded(self, outputs: AsyncIterator) -> AsyncIterator:
        """Passes outputs through; an engine failure mid-stream becomes one error event and [DONE]."""
        try:
            async for item in outputs:
                yield item
        except EngineDeadError as e:
            error = p.ApiError(503, str(e), type="server_error", code="engine_dead")
            yield 0, _sse(error.body()) + _sse("[DONE]")


def _usage(outputs: list[RequestOutput], generated: bool = True) -> dict:
    """Token counts; `generated=False` for echo-only scoring, whose one computed token is not returned."""
    return p.usage(sum(len(o.prompt_token_ids) for o in outputs),
                   sum(len(c.token_ids) for o in outputs for c in o.outputs) if generated else 0)


def _parse(model, body: bytes):
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise p.validation_error(e) from None


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# -- the app -------------------------------------------------------------------------------------------


def build_app(engine_factory: Callable[[], object], *, api_key: str | None = None,
              served_model_name: str | None = None, max_pending_requests: int = 1024, max_n: int = 16,
              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    """The FastAPI app. The engine is built by `engine_factory()` on the engine thread at startup.

    Args:
      engine_factory: returns an object with the Engine contract (tests pass a fake).
      api_key: when set, every /v1 route needs `Authorization: Bearer <api_key>`.
      served_model_name: the name clients send as `model`; defaults to the engine's model name.
      max_pending_requests: requests accepted at once; beyond it the server answers 429.
      max_n: the largest `n` accepted.
      max_request_bytes: larger request bodies are answered 413 (before they are read, when
        Content-Length says so).
    """
    check_limit(max_request_bytes)  # now, not when the middleware is built at the first request
    engine = AsyncEngine(engine_factory, max_pending_requests=max_pending_requests)
    server = _Server(engine, api_key=api_key, served_model_name=served_model_name, max_n=max_n)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await engine.start()
        log.info("serving %s (max_model_len=%d)", server.model_name, engine.max_model_len)
        try:
            yield
        finally:
            await engine.shutdown()

    app = FastAPI(title="jpaged", lifespan=lifespan)
    endpoints = {"/v1/completions": "completions", "/v1/chat/completions": "chat", "/v1/models": "models"}
    app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes, on_refuse=lambda path: server.metrics.requests.labels(
        endpoints.get(path, path), "413").inc())
    app.state.server = server

    def route(endpoint: str, handler, *, auth: bool = True):
        async def wrapped(request: Request) -> Response:
            try:
                if auth:
                    server.check_auth(request)
                response = await handler(request)
            except p.ApiError as e:
                response = JSONResponse(e.body(), status_code=e.status)
            server.metrics.requests.labels(endpoint, str(response.status_code)).inc()
            return response
        return wrapped

    async def models(request: Request) -> Response:
        return JSONResponse(p.model_list(server.model_name))

    async def health(request: Request) -> Response:
        if not engine.healthy:
            raise p.ApiError(503, f"engine is not running: {engine.error}", type="server_error", code="engine_dead")
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request) -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    app.add_api_route("/v1/models", route("models", models), methods=["GET"])
    app.add_api_route("/v1/completions", route("completions", server.completions), methods=["POST"])
    app.add_api_route("/v1/chat/completions", route("chat", server.chat), methods=["POST"])
    app.add_api_route("/health", route("health", health, auth=False), methods=["GET"])
    app.add_api_route("/metrics", route("metrics", metrics, auth=False), methods=["GET"])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        error = p.ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                           code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(error.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        error = p.ApiError(500, f"internal server error: {type(exc).__name__}: {exc}", type="server_error")
        return JSONResponse(error.body(), status_code=500)

    return app


def engine_config(args_or_config):
    """An EngineConfig from itself or from an argparse namespace holding (some of) its fields."""
    import dataclasses

    from jpaged.config import EngineConfig
    if isinstance(args_or_config, EngineConfig):
        return args_or_config
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    given = {k: v for k, v in vars(args_or_config).items() if k in names and v is not None}
    return EngineConfig(**given)


def serve(args_or_config, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, *,
          served_model_name: str | None = None, max_pending_requests: int = 1024, max_n: int = 16,
          max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, shutdown_timeout: float = 30.0, log_level: str = "info",
          engine_factory: Callable[[], object] | None = None) -> None:
    """Runs the server until SIGINT/SIGTERM; then in-flight requests get `shutdown_timeout` seconds to
    finish before they are aborted.

    Args:
      args_or_config: an EngineConfig, or an argparse namespace with EngineConfig's field names.
      engine_factory: overrides building `make_engine(config)` (tests, benchmarks with a fake engine).
    """
    engine = None
    if engine_factory is None:
        from jpaged.engine.data_parallel import make_engine

        # Built before the port opens, so a bad --model is one error line (ValueError), not a server traceback.
        engine = make_engine(engine_config(args_or_config))

        def engine_factory():
            return engine

    app = build_app(engine_factory, api_key=api_key, served_model_name=served_model_name,
                    max_pending_requests=max_pending_requests, max_n=max_n, max_request_bytes=max_request_bytes)

    def serve_http():
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout)

    if engine is None:
        serve_http()
    else:  # a multi-host run: process 0 serves, the other processes follow its engine's calls
        from jpaged.engine import multihost
        multihost.lead_or_follow(engine, serve_http)


class BackgroundServer:
    """The app served by uvicorn on a thread of this process (tests and benchmarks on loopback).

    `with BackgroundServer(app) as url:` starts it on a free port of `host` and stops it on exit.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, *, shutdown_timeout: float = 5.0):
        import socket
        import threading

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.url = f"http://{host}:{self._sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=shutdown_timeout)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server failed to start (see its log)")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join()
        self._sock.close()
