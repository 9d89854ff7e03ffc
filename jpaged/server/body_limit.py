"""A cap on request bodies: 413 in OpenAI's error format for a body over `max_bytes`.

The route reads its body through `read_body` after authentication, so an unauthenticated client
gets its 401 without the server reading a byte of the body, and nothing wraps the response. A
Content-Length over the cap is refused before any of the body is read; a chunked body (or one
longer than its Content-Length claims) is counted as it arrives and refused once past the cap, so a
request never holds more than the cap plus one chunk of memory. Whatever of the body the client
still sends after the 413, uvicorn discards as it arrives; the connection stays open, so the client
reads the 413 rather than a reset.
"""
from __future__ import annotations

from starlette.requests import Request

from jpaged.server.protocol import ApiError

DEFAULT_MAX_REQUEST_BYTES = 8 << 20


def check_limit(max_bytes: int) -> int:
    if not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"max_request_bytes must be a positive integer, got {max_bytes!r}")
    return max_bytes


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"the request body is larger than this server's limit of {max_bytes} bytes",
                    code="request_too_large")


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request's body, or ApiError 413 as soon as it is known to exceed `max_bytes`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks, received = [], 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)
