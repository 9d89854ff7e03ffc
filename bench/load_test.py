"""Bounded load test of `jpaged serve` on loopback: concurrent streaming clients, a share of which
disconnect at random points, plus a stream of bad requests. Afterwards every KV page must be back in
the pool, no request lost or answered twice, and the server must still answer.

    PYTHONPATH=. python bench/load_test.py --fake                      # the fake engine, in-process
    PYTHONPATH=. python bench/load_test.py --model default --num-kv-blocks 512
    PYTHONPATH=. python bench/load_test.py --url http://127.0.0.1:8000 # a server already running

Prints a table and writes JSON to --out.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import platform
import random
import sys
import time
from urllib.parse import urlparse

import httpx

BAD_BODIES = [
    b"{not json",
    json.dumps({"prompt": "x", "max_tokens": -1}).encode(),
    json.dumps({"prompt": "x", "max_tokens": 10 ** 9}).encode(),
    json.dumps({"prompt": "x", "n": 10 ** 6}).encode(),
    json.dumps({"prompt": "x", "model": "no-such-model"}).encode(),
    json.dumps({"prompt": 5}).encode(),
    json.dumps({"prompt": "x", "temperature": "hot"}).encode(),
    json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(),
]
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


@dataclasses.dataclass
class ClientResult:
    ok: bool
    disconnected: bool
    response_id: str | None = None
    events: int = 0
    finishes: int = 0
    dones: int = 0
    error: str | None = None


def _metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def _streaming_client(http: httpx.AsyncClient, url: str, rng: random.Random, disconnect_after: int | None,
                            headers: dict) -> ClientResult:
    chat = rng.random() < 0.5
    text = " ".join(rng.choices(WORDS, k=rng.randint(3, 20)))
    common = {"max_tokens": rng.randint(4, 48), "temperature": rng.choice([0.0, 0.8]), "stream": True,
              "n": rng.choice([1, 1, 1, 2])}
    path, body = (("/v1/chat/completions", {"messages": [{"role": "user", "content": text}], **common}) if chat
                  else ("/v1/completions", {"prompt": text, **common}))
    result = ClientResult(ok=False, disconnected=disconnect_after is not None)
    async with http.stream("POST", url + path, json=body, headers=headers) as r:
        if r.status_code != 200:
            result.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            return result
        async for line in r.aiter_lines():
            if not line:
                continue
            if result.dones:
                result.error = "data after [DONE]"
                return result
            if line == "data: [DONE]":
                result.dones += 1
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                result.error = event["error"]["message"]
                return result
            result.events += 1
            if result.response_id not in (None, event["id"]):
                result.error = "two response ids in one stream"
                return result
            result.response_id = event["id"]
            result.finishes += sum(c.get("finish_reason") is not None for c in event["choices"])
            if disconnect_after is not None and result.events >= disconnect_after:
                return result  # leaving the `async with` closes the connection mid-stream
        result.ok = result.dones == 1 and result.finishes == common["n"]
        if not result.ok:
            result.error = f"{result.dones} [DONE] and {result.finishes} finish reasons for n={common['n']}"
    return result


async def _bad_client(http: httpx.AsyncClient, url: str, body: bytes, headers: dict) -> str | None:
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    r = await http.post(url + path, content=body, headers={**headers, "content-type": "application/json"})
    if not 400 <= r.status_code < 500:
        return f"bad request answered {r.status_code}"
    error = r.json().get("error", {})
    if set(error) != {"message", "type", "param", "code"}:
        return f"not OpenAI's error format: {r.text[:200]}"
    return None


async def _wait_idle(http: httpx.AsyncClient, url: str, timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = _metrics((await http.get(url + "/metrics")).text)
        idle = (m["jpaged_num_requests_pending"] == 0 and m["jpaged_num_requests_running"] == 0
                and m["jpaged_kv_pages_free"] == m["jpaged_kv_pages_total"])
        if idle or time.monotonic() > deadline:
            return m
        await asyncio.sleep(0.05)


async def run_load(url: str, *, num_clients: int = 64, disconnect_fraction: float = 0.25, num_bad: int = 32,
                   seed: int = 0, timeout: float = 300.0, api_key: str | None = None) -> dict:
    """Runs the load against `url` (loopback only) and returns a report; `report["passed"]` is the verdict."""
    host = urlparse(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"url must be on loopback, got {url!r}")
    if num_clients < 1 or not 0 <= disconnect_fraction <= 1 or num_bad < 0:
        raise ValueError(f"need num_clients >= 1, disconnect_fraction in [0, 1], num_bad >= 0; got "
                         f"{num_clients}, {disconnect_fraction}, {num_bad}")
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=num_clients + num_bad + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        before = _metrics((await http.get(url + "/metrics")).text)
        leavers = set(rng.sample(range(num_clients), round(num_clients * disconnect_fraction)))
        t0 = time.monotonic()
        tasks = [_streaming_client(http, url, random.Random(rng.random()), rng.randint(1, 6) if i in leavers else None,
                                   headers) for i in range(num_clients)]
        tasks += [_bad_client(http, url, BAD_BODIES[i % len(BAD_BODIES)], headers) for i in range(num_bad)]
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout)
        elapsed = time.monotonic() - t0
        after = await _wait_idle(http, url, timeout=min(timeout, 30.0))
        still = await http.post(url + "/v1/completions", json={"prompt": "still there?", "max_tokens": 2},
                                headers=headers)
    return _report(results[:num_clients], results[num_clients:], before, after, still.status_code, elapsed)


def _report(clients: list[ClientResult], bad: list[str | None], before, after, still_status: int, elapsed) -> dict:
    stayers = [c for c in clients if not c.disconnected]
    ids = [c.response_id for c in clients if c.response_id]
    served = after.get('jpaged_requests_total{endpoint="completions",status="200"}', 0) + after.get(
        'jpaged_requests_total{endpoint="chat",status="200"}', 0) - before.get(
        'jpaged_requests_total{endpoint="completions",status="200"}', 0) - before.get(
        'jpaged_requests_total{endpoint="chat",status="200"}', 0)
    checks = {
        "every staying client got all its choices and exactly one [DONE]": all(c.ok for c in stayers),
        "no client saw an error": not [c for c in clients if c.error],
        "every response id is unique": len(ids) == len(set(ids)),
        "every bad request got a 4xx in OpenAI's error format": not [b for b in bad if b],
        "the server counted each good request once": served == len(clients),
        "every KV page is back in the pool": after["jpaged_kv_pages_free"] == after["jpaged_kv_pages_total"],
        "no request is pending": after["jpaged_num_requests_pending"] == 0,
        "the server still answers": still_status == 200,
    }
    return {"passed": all(checks.values()), "checks": checks, "elapsed_s": elapsed,
            "clients": len(clients), "disconnected": len(clients) - len(stayers), "bad_requests": len(bad),
            "errors": sorted({c.error for c in clients if c.error} | {b for b in bad if b})[:10],
            "kv_pages_total": after["jpaged_kv_pages_total"], "kv_pages_free": after["jpaged_kv_pages_free"]}


@contextlib.contextmanager
def _server(args):
    if args.url:
        yield args.url
        return
    from jpaged.server import BackgroundServer, build_app
    if args.fake:
        from tests.server.fake_engine import FakeEngine

        def factory():
            return FakeEngine(num_pages=1024, max_num_seqs=16, max_model_len=256)
    else:
        from jpaged.config import EngineConfig
        from jpaged.engine.llm_engine import Engine
        config = EngineConfig(model=args.model, dtype=args.dtype, num_kv_blocks=args.num_kv_blocks)

        def factory():
            return Engine(config)
    with BackgroundServer(build_app(factory, api_key=args.api_key, max_pending_requests=args.clients * 2)) as url:
        yield url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running server on loopback")
    where.add_argument("--fake", action="store_true", help="serve the deterministic fake engine in-process")
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--disconnect-fraction", type=float, default=0.25)
    parser.add_argument("--bad", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--out", default="bench/results/load_test.json")
    args = parser.parse_args()
    with _server(args) as url:
        report = asyncio.run(run_load(url, num_clients=args.clients, disconnect_fraction=args.disconnect_fraction,
                                      num_bad=args.bad, seed=args.seed, timeout=args.timeout, api_key=args.api_key))
    for check, ok in report["checks"].items():
        print(f"{'PASS' if ok else 'FAIL'}  {check}")
    print(f"{report['clients']} clients ({report['disconnected']} disconnected), {report['bad_requests']} bad "
          f"requests in {report['elapsed_s']:.2f} s; pages free {report['kv_pages_free']:.0f}/"
          f"{report['kv_pages_total']:.0f}")
    report["workload"] = {k: v for k, v in vars(args).items() if k != "api_key"}
    report["python"] = platform.python_version()
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
