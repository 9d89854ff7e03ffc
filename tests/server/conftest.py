"""Servers on loopback around the fake engine, and helpers to read their state."""
from __future__ import annotations

import contextlib
import dataclasses
import time

import httpx
import openai
import pytest

from jpaged.server import BackgroundServer, build_app
from jpaged.server.settings import ServerSettings
from tests.server.fake_engine import FakeEngine

# One client for all tests: building an httpx.Client (its SSL context) costs ~0.15 s on these machines.
HTTP = httpx.Client(timeout=30)


SERVER_FIELDS = {f.name for f in dataclasses.fields(ServerSettings)}


@contextlib.contextmanager
def fake_server(*, max_pending_requests: int = 64, max_n: int = 4, **kw):
    """(url, app) of a server on 127.0.0.1 over a FakeEngine; `kw` are ServerSettings fields and
    FakeEngine arguments."""
    settings = {k: v for k, v in kw.items() if k in SERVER_FIELDS}
    engine_kw = {k: v for k, v in kw.items() if k not in SERVER_FIELDS}
    app = build_app(lambda: FakeEngine(**engine_kw), max_pending_requests=max_pending_requests, max_n=max_n,
                    **settings)
    with BackgroundServer(app) as url:
        yield url, app


def fake_engine_of(app) -> FakeEngine:
    return app.state.server.engine.engine


def metric(url: str, name: str) -> float:
    for line in HTTP.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def wait_until_idle(url: str, timeout: float = 10.0) -> None:
    """Waits until no request is pending and every KV page is free again (asserts it happens)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (metric(url, "jpaged_num_requests_pending") == 0
                and metric(url, "jpaged_kv_pages_free") == metric(url, "jpaged_kv_pages_total")
                and metric(url, "jpaged_num_requests_running") == 0):
            return
        time.sleep(0.02)
    raise AssertionError(f"server not idle after {timeout}s: {HTTP.get(f'{url}/metrics').text}")


@pytest.fixture(scope="module")
def server():
    with fake_server() as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)
