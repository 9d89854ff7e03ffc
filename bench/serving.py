"""Serving benchmark in the style of vLLM's `benchmark_serving`: Poisson arrivals at a request rate,
random prompt/output lengths, streamed completions; TTFT, TPOT, ITL and E2E latency (mean, p50, p99)
and request/token throughput.

It starts `jpaged serve` in a subprocess on 127.0.0.1 (or uses --url, loopback only), warms it up,
runs the workload, and writes JSON to --out:

    PYTHONPATH=. python bench/serving.py --model default --num-prompts 200 --request-rate 8 \
        --out bench/results/serving_smollm2_h100.json
    PYTHONPATH=. python bench/serving.py --fake --num-prompts 50 --out /tmp/serving_fake.json

Prompts are random token ids in --token-range (vLLM's "random" dataset), sent as token-id prompts with
`ignore_eos` so every request generates exactly its output length.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from urllib.parse import urlparse

import httpx
import numpy as np


@dataclasses.dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = dataclasses.field(default_factory=list)
    error: str | None = None


def sample_requests(n: int, input_len: int, output_len: int, range_ratio: float, token_range: tuple[int, int],
                    seed: int) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) pairs with lengths uniform in [len * (1 - r), len * (1 + r)]."""
    rng = np.random.default_rng(seed)

    def lengths(mean):
        return rng.integers(max(1, int(mean * (1 - range_ratio))), int(mean * (1 + range_ratio)) + 1, size=n)

    ins, outs = lengths(input_len), lengths(output_len)
    return [(rng.integers(*token_range, size=int(i)).tolist(), int(o)) for i, o in zip(ins, outs)]


async def one_request(http: httpx.AsyncClient, url: str, model: str | None, prompt: list[int],
                      max_tokens: int) -> RequestResult:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, **({"model": model} if model else {})}
    result, t0 = RequestResult(ok=False), time.perf_counter()
    last = None
    try:
        async with http.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                now = time.perf_counter()
                if event.get("usage"):
                    result.prompt_tokens = event["usage"]["prompt_tokens"]
                    result.output_tokens = event["usage"]["completion_tokens"]
                if not event.get("choices") or not event["choices"][0]["text"]:
                    continue
                if last is None:
                    result.ttft = now - t0
                else:
                    result.itl.append(now - last)
                last = now
        result.e2e = time.perf_counter() - t0
        result.ok = result.output_tokens > 0
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


async def run_workload(url: str, requests: list[tuple[list[int], int]], request_rate: float, *, model: str | None,
                       max_concurrency: int | None, seed: int) -> tuple[list[RequestResult], float]:
    rng = np.random.default_rng(seed)
    gate = asyncio.Semaphore(max_concurrency or len(requests))
    limits = httpx.Limits(max_connections=(max_concurrency or len(requests)) + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as http:
        async def limited(prompt, out_len):
            async with gate:
                return await one_request(http, url, model, prompt, out_len)

        tasks, t0 = [], time.perf_counter()
        for prompt, out_len in requests:
            tasks.append(asyncio.create_task(limited(prompt, out_len)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.exponential(1.0 / request_rate))  # Poisson process
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - t0


def summarize(results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.ok]

    def stats(values, scale=1000.0):
        v = np.asarray(values, dtype=np.float64) * scale
        if not len(v):
            return {"mean": None, "p50": None, "p99": None}
        return {"mean": float(v.mean()), "p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99))}

    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    return {"completed": len(ok), "failed": len(results) - len(ok),
            "errors": sorted({r.error for r in results if r.error})[:5], "duration_s": duration,
            "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
            "total_token_throughput": (in_tokens + out_tokens) / duration,
            "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
            "ttft_ms": stats([r.ttft for r in ok]), "tpot_ms": stats(tpot),
            "itl_ms": stats([x for r in ok for x in r.itl]), "e2e_ms": stats([r.e2e for r in ok])}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(args):
    """(url, pid) of `jpaged serve` on a free loopback port in a subprocess (its own GIL); SIGTERM on exit."""
    port = _free_port()
    cmd = [sys.executable, os.path.abspath(__file__), "--role", "server", "--port", str(port),
           "--model", args.model, "--dtype", args.dtype, "--max-num-seqs", str(args.max_num_seqs)]
    cmd += ["--fake"] if args.fake else []
    cmd += ["--stream-interval", str(args.stream_interval)] if args.stream_interval else []
    cmd += ["--num-kv-blocks", str(args.num_kv_blocks)] if args.num_kv_blocks else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + args.startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready after {args.startup_timeout} s")
            time.sleep(0.5)
        yield url, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def process_cpu_seconds(pid: int | None) -> tuple[float, float]:
    """User + system CPU seconds so far of a process and of its main thread (the server's event loop);
    Linux /proc, zeros elsewhere or without a pid."""
    def read(path):
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    if pid is None or not os.path.exists(f"/proc/{pid}/stat"):
        return 0.0, 0.0
    return read(f"/proc/{pid}/stat"), read(f"/proc/{pid}/task/{pid}/stat")


def run_server(args) -> None:
    from jpaged.config import EngineConfig
    from jpaged.server import serve
    from jpaged.server.settings import ServerSettings
    factory = None
    if args.fake:
        from tests.server.fake_engine import FakeEngine

        def factory():
            return FakeEngine(num_pages=1 << 16, max_num_seqs=args.max_num_seqs, max_model_len=4096, step_delay=0.002)
    config = EngineConfig(model=args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                          num_kv_blocks=args.num_kv_blocks)
    settings = ServerSettings(port=args.port, max_pending_requests=100_000, stream_interval=args.stream_interval)
    serve(config, settings, log_level="warning",
          engine_factory=factory)


def environment(fake: bool) -> dict:
    def version(pkg):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(pkg)

    device = "fake engine (no model)" if fake else platform.processor() or platform.machine()
    if not fake and shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True)
        device = query.stdout.strip().splitlines()[0] if query.returncode == 0 and query.stdout.strip() else device
    return {"device": device, "python": platform.python_version(),
            **{pkg: version(pkg) for pkg in ("jax", "jaxlib", "flax", "fastapi", "uvicorn", "httpx")}}


def print_table(summary: dict) -> None:
    print(f"{'completed / failed':<28}{summary['completed']} / {summary['failed']}")
    print(f"{'duration (s)':<28}{summary['duration_s']:.2f}")
    print(f"{'request throughput (req/s)':<28}{summary['request_throughput']:.2f}")
    print(f"{'output throughput (tok/s)':<28}{summary['output_throughput']:.1f}")
    print(f"{'total throughput (tok/s)':<28}{summary['total_token_throughput']:.1f}")
    print(f"{'metric (ms)':<28}{'mean':>10}{'p50':>10}{'p99':>10}")
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        s = summary[name]
        cells = "".join(f"{s[k]:>10.2f}" if s[k] is not None else f"{'-':>10}" for k in ("mean", "p50", "p99"))
        print(f"{name[:-3].upper():<28}{cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=["bench", "server"], default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--url", help="benchmark a server already running on loopback")
    parser.add_argument("--fake", action="store_true", help="serve the fake engine (measures server overhead)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--served-model-name", default=None, help="`model` sent in requests (default: none)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument("--stream-interval", type=float, default=0.0, help="the server's --stream-interval")
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (inf: all at once)")
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--range-ratio", type=float, default=0.5)
    parser.add_argument("--token-range", type=int, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="prompt token ids are drawn from [LOW, HIGH) (default 1000 20000; fake: 97 123)")
    parser.add_argument("--num-warmup", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--out", default="bench/results/serving.json")
    args = parser.parse_args()
    if args.role == "server":
        run_server(args)
        return
    if args.num_prompts < 1 or args.request_rate <= 0:
        parser.error(f"--num-prompts must be >= 1 and --request-rate > 0, got {args.num_prompts}, {args.request_rate}")
    if args.url and urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        parser.error(f"--url must be on loopback, got {args.url}")
    token_range = tuple(args.token_range or ((97, 123) if args.fake else (1000, 20000)))
    requests = sample_requests(args.num_prompts, args.input_len, args.output_len, args.range_ratio, token_range,
                               args.seed)
    warmup = sample_requests(args.num_warmup, args.input_len, args.output_len, args.range_ratio, token_range,
                             args.seed + 1)
    with contextlib.nullcontext((args.url, None)) if args.url else server_process(args) as (url, pid):
        if warmup:
            asyncio.run(run_workload(url, warmup, float("inf"), model=args.served_model_name,
                                     max_concurrency=args.max_concurrency, seed=args.seed))
        cpu_before = process_cpu_seconds(pid)
        results, duration = asyncio.run(run_workload(url, requests, args.request_rate, model=args.served_model_name,
                                                     max_concurrency=args.max_concurrency, seed=args.seed))
        server_cpu = ([after - before for after, before in zip(process_cpu_seconds(pid), cpu_before)]
                      if pid is not None else None)
        server_metrics = httpx.get(url + "/metrics").text
    summary = summarize(results, duration)
    if server_cpu is not None:  # the server's CPU cost of the run per output token: all threads, the event loop
        tokens = max(summary["total_output_tokens"], 1)
        for name, seconds in zip(("server_cpu", "server_event_loop_cpu"), server_cpu):
            summary[f"{name}_s"] = seconds
            summary[f"{name}_us_per_output_token"] = 1e6 * seconds / tokens
            print(f"{name.replace('_', ' ') + ' (s)':<28}{seconds:.2f} ({1e6 * seconds / tokens:.1f} us/token)")
    print_table(summary)
    preemptions = [line.split()[-1] for line in server_metrics.splitlines()
                   if line.startswith("jpaged_num_preemptions_total ")]
    workload = {k: v for k, v in vars(args).items() if k not in ("role", "port")}
    workload["request_rate"] = str(args.request_rate)  # JSON has no Infinity
    report = {"benchmark": "serving", "environment": environment(args.fake), "workload": workload,
              "results": summary, "server": {"num_preemptions": float(preemptions[0]) if preemptions else None}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
