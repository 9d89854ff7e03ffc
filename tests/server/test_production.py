"""The server as a production service, over the fake engine: nothing slow on the engine thread, every
bad input a named 4xx, bounded metrics and defaults, a watchdog, and a shutdown that loses nothing
silently."""
from __future__ import annotations

import json
import logging
import socket
import threading
import time

import httpx
import pytest

from jpaged.server import BackgroundServer, build_app
from tests.server.conftest import HTTP, fake_engine_of, fake_server, wait_until_idle
from tests.server.fake_engine import FakeEngine


def _error(r: httpx.Response, status: int, param: str | None, code: str) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"]) == (param, code), error
    return error


# -- every bad input a named 4xx -------------------------------------------------------------------------

@pytest.mark.parametrize("prompt, where", [
    ([97, -1], "prompt[1]"),
    ([2 ** 70], "prompt[0]"),
    ([97, 258], "prompt[1]"),
    ([[97], [98, -(2 ** 65)]], "prompt[1][1]"),
])
def test_token_ids_outside_the_vocabulary_are_a_400_naming_the_index(server, prompt, where):
    url, app = server
    added = fake_engine_of(app).num_added
    error = _error(HTTP.post(url + "/v1/completions", json={"prompt": prompt}), 400, "prompt", "invalid_token_id")
    assert f"'{where}'" in error["message"] and "[0, 258)" in error["message"]
    assert fake_engine_of(app).num_added == added


@pytest.mark.parametrize("raw, param", [
    (b'{"prompt": "a", "temperature": Infinity}', "temperature"),
    (b'{"prompt": "a", "temperature": NaN}', "temperature"),
    (b'{"prompt": "a", "temperature": 1e400}', "temperature"),
    (b'{"prompt": "a", "temperature": 1e308}', "temperature"),
    (b'{"prompt": "a", "top_p": 1.5}', "top_p"),
    (b'{"prompt": "a", "top_p": -Infinity}', "top_p"),
    (b'{"prompt": "a", "min_p": 2}', "min_p"),
    (b'{"prompt": "a", "presence_penalty": 1e300}', "presence_penalty"),
    (b'{"prompt": "a", "seed": 100000000000000000000}', "seed"),
    (b'{"messages": [{"role": "user", "content": "x"}], "frequency_penalty": -Infinity}', "frequency_penalty"),
])
def test_non_finite_or_out_of_range_sampling_values_are_a_400(server, raw, param):
    path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
    r = HTTP.post(server[0] + path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and param in r.json()["error"]["message"]


def test_a_prompt_list_larger_than_the_queue_is_refused_before_any_work(server):
    url, app = server
    added = fake_engine_of(app).num_added
    t0 = time.monotonic()
    error = _error(HTTP.post(url + "/v1/completions", json={"prompt": ["ab"] * 65}), 400, "prompt",
                   "too_many_prompts")
    assert "65 prompts" in error["message"] and time.monotonic() - t0 < 1.0
    assert fake_engine_of(app).num_added == added


def test_a_prompt_list_over_the_free_queue_is_a_429_with_retry_after():
    with fake_server(max_pending_requests=3, step_delay=0.02) as (url, app):
        with httpx.Client(timeout=10) as c, c.stream("POST", url + "/v1/completions",
                                                     json={"prompt": "ab", "max_tokens": 60, "stream": True}) as held:
            lines = held.iter_lines()  # kept: a dropped iterator closes the stream, which aborts the request
            next(lines)
            r = HTTP.post(url + "/v1/completions", json={"prompt": ["ab"] * 3})
            _error(r, 429, None, "rate_limit_exceeded")
            assert r.headers["retry-after"] == "1"
            assert fake_engine_of(app).num_added == 1
        wait_until_idle(url)


def test_an_unknown_model_is_a_404_in_openai_shape_and_models_by_id(server):
    url = server[0]
    for path, body in (("/v1/completions", {"prompt": "a", "model": "gpt-9"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "gpt-9"})):
        error = _error(HTTP.post(url + path, json=body), 404, "model", "model_not_found")
        assert error["type"] == "invalid_request_error" and "gpt-9" in error["message"]
    card = HTTP.get(url + "/v1/models/fake-model")
    assert card.status_code == 200 and card.json()["id"] == "fake-model" and card.json()["object"] == "model"
    _error(HTTP.get(url + "/v1/models/gpt-9"), 404, "model", "model_not_found")


# -- nothing slow on the engine thread ---------------------------------------------------------------------

def test_a_prompt_that_cannot_fit_is_refused_by_its_size_before_tokenization():
    with fake_server(encode_delay=5.0) as (url, app):  # tokenizing it would take 5 s
        t0 = time.monotonic()
        error = _error(HTTP.post(url + "/v1/completions", json={"prompt": "a" * (1 << 20)}), 400, "prompt",
                       "context_length_exceeded")
        assert time.monotonic() - t0 < 2.0 and "1048576 bytes" in error["message"]
        big_chat = {"messages": [{"role": "user", "content": "a" * (1 << 20)}]}
        _error(HTTP.post(url + "/v1/chat/completions", json=big_chat), 400, "messages", "context_length_exceeded")
        assert fake_engine_of(app).num_added == 0


def test_a_slow_tokenization_does_not_stall_other_streams():
    with fake_server(encode_delay=1.5, step_delay=0.01, max_model_len=4096, num_pages=4096) as (url, _):
        body = {"prompt": [97, 98], "max_tokens": 200, "stream": True, "temperature": 0}
        with httpx.Client(timeout=20) as c, c.stream("POST", url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(lines)
            slow = threading.Thread(target=HTTP.post, args=(url + "/v1/completions",),
                                    kwargs={"json": {"prompt": "slow", "max_tokens": 2}})
            slow.start()
            time.sleep(0.1)  # the slow request is now tokenizing
            gaps, last = [], time.monotonic()
            for line in lines:
                if line.startswith("data: {"):
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now
            slow.join()
        assert max(gaps) < 0.5, max(gaps)  # tokens kept flowing while the other prompt took 1.5 s to tokenize
        wait_until_idle(url)


def test_warm_up_keeps_health_at_503_starting_until_done():
    app = build_app(lambda: FakeEngine(warmup_delay=1.0), warmup=True, warmup_variants="plain")
    with BackgroundServer(app) as url:
        r = HTTP.get(url + "/health")
        _error(r, 503, None, "engine_starting")
        assert "retry-after" in r.headers
        _error(HTTP.post(url + "/v1/completions", json={"prompt": "a"}), 503, None, "engine_starting")
        deadline = time.monotonic() + 10
        while HTTP.get(url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert fake_engine_of(app).warmed_up and fake_engine_of(app).warmup_variants == "plain"
        assert HTTP.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 1}).status_code == 200


def test_watchdog_reports_a_stuck_step_in_health_and_logs_the_engine_stack(caplog):
    caplog.set_level(logging.ERROR, logger="jpaged.server")
    with fake_server(stall_on="stuck", stall_seconds=2.0, engine_stall_timeout=0.4) as (url, _):
        assert HTTP.get(url + "/health").status_code == 200
        done = threading.Thread(target=HTTP.post, args=(url + "/v1/completions",),
                                kwargs={"json": {"prompt": "stuck", "max_tokens": 2}})
        done.start()
        time.sleep(1.2)
        r = HTTP.get(url + "/health")
        _error(r, 503, None, "engine_stalled")
        assert "retry-after" in r.headers
        done.join()
        assert HTTP.get(url + "/health").status_code == 200
    stalls = [rec.getMessage() for rec in caplog.records if "engine thread has been in one step" in rec.getMessage()]
    assert len(stalls) == 1 and "fake_engine.py" in stalls[0] and "in step" in stalls[0]


# -- bounded by construction --------------------------------------------------------------------------------

def test_junk_requests_create_no_metric_series():
    with fake_server(api_key="k", max_request_bytes=64) as (url, _):
        before = len(HTTP.get(url + "/metrics").content)
        for i in range(200):
            HTTP.post(f"{url}/junk/{i}", content=b"x" * 100)
            HTTP.post(f"{url}/v1/completions?{i}", content=b"x" * 100)  # no key: 401 before the body is read
            HTTP.get(f"{url}/v1/models/{i}", headers={"Authorization": "Bearer k"})
        text = HTTP.get(url + "/metrics").text
        assert len(text.encode()) - before < 2000
        assert 'jpaged_requests_total{endpoint="unmatched",status="404"} 200.0' in text
        assert 'jpaged_requests_total{endpoint="completions",status="401"} 200.0' in text
        assert 'jpaged_requests_total{endpoint="model",status="404"} 200.0' in text
        assert "413" not in text  # nothing unauthenticated had its body read


def test_chat_max_tokens_defaults_to_the_context_left_capped_by_the_limit():
    with fake_server(max_model_len=64) as (url, _):
        chat = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0}
        r = HTTP.post(url + "/v1/chat/completions", json=chat).json()
        assert r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"] == 64
        assert r["choices"][0]["finish_reason"] == "length"
        done = HTTP.post(url + "/v1/completions", json={"prompt": "hi", "temperature": 0}).json()
        assert done["usage"]["completion_tokens"] == 16  # OpenAI's completions default
    with fake_server(max_model_len=64, max_tokens_limit=20) as (url, _):
        r = HTTP.post(url + "/v1/chat/completions", json=chat).json()
        assert r["usage"]["completion_tokens"] == 20
        error = _error(HTTP.post(url + "/v1/chat/completions", json={**chat, "max_tokens": 21}), 400, "max_tokens",
                       "invalid_value")
        assert "at most 20" in error["message"]


# -- shutdown that loses nothing silently -------------------------------------------------------------------

def test_shutdown_finishes_what_it_can_then_ends_the_rest_with_an_error():
    app = build_app(lambda: FakeEngine(step_delay=0.02), shutdown_timeout=0.6, max_pending_requests=8)
    background = BackgroundServer(app)
    with background as url:
        c = httpx.Client(timeout=20)
        stream = c.send(c.build_request("POST", url + "/v1/completions",
                                        json={"prompt": "abc", "max_tokens": 100, "stream": True}), stream=True)
        lines = stream.iter_lines()
        next(lines)
        short = {}
        waiting = {}
        threads = [threading.Thread(target=lambda: short.update(r=HTTP.post(
                       url + "/v1/completions", json={"prompt": "ab", "max_tokens": 5}))),
                   threading.Thread(target=lambda: waiting.update(r=HTTP.post(
                       url + "/v1/completions", json={"prompt": "ab", "max_tokens": 100})))]
        for t in threads:
            t.start()
        time.sleep(0.1)
        background.shutdown()
        time.sleep(0.1)
        refused = HTTP.post(url + "/v1/completions", json={"prompt": "a"})
        _error(refused, 503, None, "shutting_down")
        assert refused.headers["retry-after"] == "5"
        _error(HTTP.get(url + "/health"), 503, None, "shutting_down")
        rest = [line for line in lines if line]
        for t in threads:
            t.join()
        c.close()
        assert background.join(timeout=10)
    assert short["r"].status_code == 200 and short["r"].json()["choices"][0]["finish_reason"] == "length"
    _error(waiting["r"], 503, None, "shutting_down")
    assert rest[-1] == "data: [DONE]"
    final = json.loads(rest[-2].removeprefix("data: "))
    assert final["error"]["code"] == "shutting_down" and set(final["error"]) == {"message", "type", "param", "code"}


def test_an_unfinished_request_head_over_max_header_bytes_is_a_400():
    with fake_server(max_header_bytes=4096) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"a" * 8192)  # no end of the head yet
            answer = s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 400")
        assert HTTP.get(url + "/health").status_code == 200


def test_stream_interval_sends_several_tokens_per_event_and_loses_none():
    with fake_server(stream_interval=0.25, step_delay=0.01) as (url, _):
        body = {"prompt": "abc", "max_tokens": 30, "temperature": 0, "stream": True}
        with HTTP.stream("POST", url + "/v1/completions", json=body) as r:
            events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
        chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
        assert events[-1] == "[DONE]" and "".join(c["text"] for c in chunks) == "abc" * 10
        assert len(chunks) <= 4 and chunks[-1]["finish_reason"] == "length"  # 30 tokens in 0.3 s, a write per 0.25 s
