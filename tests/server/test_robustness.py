"""Client mistakes answer 4xx in OpenAI's error JSON and the server keeps serving; disconnects abort;
the queue limit answers 429; the API key answers 401; oversized bodies answer 413; SIGTERM shuts down
gracefully."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from jpaged.server import build_app
from tests.server.conftest import HTTP, fake_engine_of, fake_server, metric, wait_until_idle

BAD_REQUESTS = [
    ("/v1/completions", b"{not json", 400, None, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, None, "object"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt", "prompt"),
    ("/v1/completions", {"prompt": "a", "max_tokens": "5"}, 400, "max_tokens", "integer"),
    ("/v1/completions", {"prompt": "a", "max_tokens": -1}, 400, "max_tokens", "max_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 10 ** 9}, 400, "prompt", "maximum context length"),
    ("/v1/completions", {"prompt": "a" * 500, "max_tokens": 1}, 400, "prompt", "maximum context length"),
    ("/v1/completions", {"prompt": "a", "n": 5}, 400, "n", "at most 4"),
    ("/v1/completions", {"prompt": "a", "n": 0}, 400, "n", "n must be"),
    ("/v1/completions", {"prompt": "a", "model": "gpt-9"}, 404, "model", "gpt-9"),
    ("/v1/completions", {"prompt": "a", "temperature": -1}, 400, "temperature", "temperature"),
    ("/v1/completions", {"prompt": "a", "top_p": 0}, 400, "top_p", "top_p"),
    ("/v1/completions", {"prompt": "a", "logprobs": 99}, 400, "logprobs", "logprobs"),
    ("/v1/completions", {"prompt": "a", "stop": 3}, 400, "stop", "stop"),
    ("/v1/completions", {"prompt": [1, "a"]}, 400, "prompt", "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", "empty"),
    ("/v1/completions", {"prompt": [999999]}, 400, "prompt", "token ids"),
    ("/v1/completions", {"prompt": "a", "stream": "yes"}, 400, "stream", "boolean"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages", "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages", "content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "top_logprobs", "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
     400, "top_logprobs", "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -3}, 400,
     "max_tokens", "max_tokens"),
]


@pytest.mark.parametrize("path, body, status, param, words", BAD_REQUESTS)
def test_bad_request_answers_openai_error_and_server_keeps_serving(server, path, body, status, param, words):
    url = server[0]
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = HTTP.post(url + path, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert words.lower() in error["message"].lower()
    ok = HTTP.post(url + "/v1/completions", json={"prompt": "ok", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "ok"
    wait_until_idle(url)


def test_unknown_route_answers_404_in_openai_format(server):
    r = HTTP.get(server[0] + "/v1/engines")
    assert r.status_code == 404 and "error" in r.json()


def test_openai_client_raises_its_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="a")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="fake-model", prompt="a", max_tokens=-5)


def test_api_key_is_required_when_set():
    with fake_server(api_key="sekret") as (url, _):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            r = HTTP.get(url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
        assert good.completions.create(model="fake-model", prompt="ab", max_tokens=2, temperature=0).choices[0].text == "ab"
        assert HTTP.get(url + "/health").status_code == 200  # probes need no key


def _raw_post(url: str, head: bytes, body_start: bytes) -> tuple[int, dict]:
    """Sends a request's head and the start of its body on a raw socket; (status, JSON) of the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(head + b"\r\n\r\n" + body_start)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _content_length(data):
            chunk = s.recv(65536)
            assert chunk, f"connection closed after {data!r}"
            data += chunk
    status_line, rest = data.split(b"\r\n", 1)
    return int(status_line.split()[1]), json.loads(rest.split(b"\r\n\r\n", 1)[1])


def _content_length(response: bytes) -> int:
    head = response.split(b"\r\n\r\n", 1)[0].decode().lower()
    return next(int(line.split(":")[1]) for line in head.split("\r\n") if line.startswith("content-length:"))


def test_request_body_over_the_limit_answers_413_and_server_keeps_serving():
    with fake_server(max_request_bytes=1024) as (url, _):
        # Content-Length says 1 GiB: refused from the head alone, the body never sent.
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1073741824")
        status, body = _raw_post(url, head, b'{"prompt": "')
        assert status == 413 and body["error"]["code"] == "request_too_large"
        assert "1024 bytes" in body["error"]["message"]

        def chunked():  # no Content-Length: counted as it arrives
            yield b'{"prompt": "'
            for _ in range(8):
                yield b"a" * 256
            yield b'", "max_tokens": 1}'

        r = HTTP.post(url + "/v1/completions", content=chunked(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="fake-model", prompt="a" * 2000, max_tokens=1)
        assert e.value.status_code == 413
        ok = client.completions.create(model="fake-model", prompt="a" * 100, max_tokens=2, temperature=0)
        assert ok.choices[0].text == "aa"
        metrics = HTTP.get(url + "/metrics").text
        assert 'jpaged_requests_total{endpoint="completions",status="413"} 3.0' in metrics
        wait_until_idle(url)


def test_max_request_bytes_must_be_positive():
    with pytest.raises(ValueError, match="max_request_bytes"):
        build_app(lambda: None, max_request_bytes=0)


def _open_stream(url: str, max_tokens: int):
    """A streaming request whose first event has arrived; returns (client, response, its line iterator).

    The iterator must stay referenced: httpx closes the response when it is garbage-collected.
    """
    c = httpx.Client(timeout=10)
    body = {"prompt": "abcdef", "max_tokens": max_tokens, "temperature": 0, "stream": True}
    r = c.send(c.build_request("POST", url + "/v1/completions", json=body), stream=True)
    assert r.status_code == 200
    lines = r.iter_lines()
    next(lines)
    return c, r, lines


def test_queue_limit_answers_429_then_recovers():
    with fake_server(max_pending_requests=2, step_delay=0.02) as (url, app):
        held = [_open_stream(url, 60) for _ in range(2)]
        r = HTTP.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        for c, resp, _ in held:
            resp.close()
            c.close()
        wait_until_idle(url)
        assert HTTP.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200


def test_client_disconnect_mid_stream_aborts_and_frees_pages():
    with fake_server(step_delay=0.02) as (url, app):
        c, r, _ = _open_stream(url, 100)
        assert metric(url, "jpaged_kv_pages_used") > 0
        r.close()
        c.close()
        wait_until_idle(url, timeout=5)
        engine = fake_engine_of(app)
        assert engine.num_aborted == 1 and engine.generation_tokens < 100


def test_client_disconnect_while_waiting_for_a_full_response_aborts():
    with fake_server(step_delay=0.02) as (url, app):
        def post():
            with pytest.raises(httpx.ReadTimeout):
                HTTP.post(url + "/v1/completions", json={"prompt": "abc", "max_tokens": 100}, timeout=0.3)

        t = threading.Thread(target=post)
        t.start()
        t.join()
        wait_until_idle(url, timeout=5)
        assert fake_engine_of(app).num_aborted == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("shutdown_timeout, finishes", [(30.0, True), (0.2, False)])
def test_sigterm_finishes_in_flight_stream_or_ends_it_with_an_error_then_exits_0(shutdown_timeout, finishes):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-m", "tests.server.fake_engine", "--port", str(port),
                             "--step-delay", "0.01", "--shutdown-timeout", str(shutdown_timeout)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if HTTP.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None, "server did not start"
                time.sleep(0.1)
        c, r, lines = _open_stream(url, 60)
        proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
        c.close()
        assert rest[-1] == "data: [DONE]"
        last = json.loads(rest[-2].removeprefix("data: "))
        if finishes:
            assert last["choices"][0]["finish_reason"] == "length"
        else:
            assert last["error"]["code"] == "shutting_down"
        assert proc.wait(timeout=20) == 0
        assert b"Traceback" not in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_engine_failure_answers_503_and_health_reports_it():
    with fake_server(fail_on="boom", step_delay=0.01) as (url, _):
        c, _, lines = _open_stream(url, 60)
        r = HTTP.post(url + "/v1/completions", json={"prompt": "boom", "max_tokens": 5})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        rest = [line for line in lines if line]
        c.close()
        assert "engine_dead" in rest[-2] and rest[-1] == "data: [DONE]"
        assert HTTP.get(url + "/health").status_code == 503
        assert HTTP.post(url + "/v1/completions", json={"prompt": "a"}).status_code == 503
