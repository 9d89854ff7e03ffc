"""A cap on request bodies: 413 in OpenAI's error format for a body over `max_bytes`.

Pure ASGI middleware, so nothing is buffered on its behalf. A Content-Length over the cap is refused
before any of the body is read; a chunked body (or one longer than its Content-Length claims) is
counted as it arrives and refused once past the cap, so a request never holds more than the cap plus
one chunk of memory. Whatever of the body the client still sends after the 413, uvicorn discards as
it arrives; the connection stays open, so the client reads the 413 rather than a reset.
"""
from __future__ import annotations

import json

from jpaged.server.protocol import ApiError

DEFAULT_MAX_REQUEST_BYTES = 8 << 20


class _TooLarge(Exception):
    pass


def check_limit(max_bytes: int) -> int:
    if not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"max_request_bytes must be a positive integer, got {max_bytes!r}")
    return max_bytes


class BodySizeLimit:
    """`on_refuse(path)` is called for every 413 (the server counts them in its request metrics)."""

    def __init__(self, app, max_bytes: int = DEFAULT_MAX_REQUEST_BYTES, on_refuse=None):
        self.app = app
        self.max_bytes = check_limit(max_bytes)
        self.on_refuse = on_refuse

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, send)
            return
        received = 0
        started = False

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if started:  # a streaming response that read its body late; nothing more can be said
                raise
            await self._refuse(scope, send)

    async def _refuse(self, scope, send) -> None:
        if self.on_refuse is not None:
            self.on_refuse(scope.get("path", ""))
        error = ApiError(413, f"the request body is larger than this server's limit of {self.max_bytes} bytes",
                         code="request_too_large")
        body = json.dumps(error.body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
