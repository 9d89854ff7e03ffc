"""Serving benchmark in the style of `vllm bench serve`: Poisson arrivals at each of several request rates
over one server start, random prompt/output lengths, streamed completions; TTFT, TPOT, ITL and E2E latency
(mean, p50, p99), request/token throughput, and the compilations the server ran during each timed run.
The offline engine on the same lengths runs in the same invocation as the baseline.

It starts `jpaged serve` in a subprocess on 127.0.0.1 (or uses --url, loopback only), runs each rate in
order (a warm-up of --num-warmup requests before every rate but the first, so the first rate measures a
cold server), and writes one JSON (default `bench/results/serving_sweep_<model>_<device>.json`) plus a PNG
of latency against throughput beside it:

    PYTHONPATH=. python bench/serving.py --model llama3-8b --request-rates 1,4,8,16,32,inf
    PYTHONPATH=. python bench/serving.py --fake --request-rates 8,inf --rate-seconds 5 --no-offline
    PYTHONPATH=. python bench/serving.py --plot bench/results/serving_sweep_llama3-8b_nvidia-h100.json

Prompts are random token ids in --token-range (vLLM's "random" dataset), sent as token-id prompts with
`ignore_eos` so every request generates exactly its output length. A finite rate sends
max(--min-prompts, rate x --rate-seconds) requests; rate inf sends --num-prompts at once. The load is
spread over --client-processes processes (each its own event loop and GIL), so that the client is not
the bound; the JSON records their CPU use.
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
import re
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


def arrival_times(n: int, request_rate: float, rng) -> np.ndarray:
    """Seconds after the start at which each request is sent: a Poisson process, or all at 0 for inf."""
    if request_rate == float("inf"):
        return np.zeros(n)
    return np.cumsum(rng.exponential(1.0 / request_rate, size=n)) - 0.0


async def _client(url: str, requests, offsets, start: float, *, model: str | None,
                  max_concurrency: int | None) -> list[RequestResult]:
    gate = asyncio.Semaphore(max_concurrency or len(requests) or 1)
    limits = httpx.Limits(max_connections=(max_concurrency or len(requests)) + 2,
                          max_keepalive_connections=(max_concurrency or len(requests)) + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as http:
        async def send(prompt, out_len, at):
            await asyncio.sleep(max(0.0, start + at - time.time()))
            async with gate:
                return await one_request(http, url, model, prompt, out_len)

        return await asyncio.gather(*(send(p, n, at) for (p, n), at in zip(requests, offsets)))


def _client_process(url, requests, offsets, start, model, max_concurrency, queue) -> None:
    cpu = time.process_time()
    results = asyncio.run(_client(url, requests, offsets, start, model=model, max_concurrency=max_concurrency))
    queue.put((results, time.process_time() - cpu))


def run_workload(url: str, requests: list[tuple[list[int], int]], request_rate: float, *, model: str | None,
                 max_concurrency: int | None, seed: int, processes: int = 1) -> tuple[list[RequestResult], float, float]:
    """Sends `requests` at `request_rate` from `processes` client processes (requests dealt round-robin,
    arrival times drawn once for all). Returns (results, duration in s, client CPU seconds)."""
    import multiprocessing as mp

    offsets = arrival_times(len(requests), request_rate, np.random.default_rng(seed))
    processes = max(1, min(processes, len(requests)))
    per_process = None if max_concurrency is None else max(1, max_concurrency // processes)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    start = time.time() + 0.5 + 0.2 * processes      # every process is up before the first arrival
    procs = [ctx.Process(target=_client_process, daemon=True,
                         args=(url, requests[i::processes], offsets[i::processes], start, model, per_process, queue))
             for i in range(processes)]
    for p in procs:
        p.start()
    results, cpu = [], 0.0
    for _ in procs:
        part, seconds = queue.get()
        results += part
        cpu += seconds
    duration = time.time() - start
    for p in procs:
        p.join()
    return results, duration, cpu


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
    cmd += ["--warmup-variants", args.warmup_variants]
    cmd += ["--stream-interval", str(args.stream_interval)] if args.stream_interval else []
    cmd += ["--num-kv-blocks", str(args.num_kv_blocks)] if args.num_kv_blocks else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        deadline = started + args.startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready after {args.startup_timeout} s")
            time.sleep(0.5)
        server_process.ready_s = time.monotonic() - started
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
    from jpaged import compilations
    from jpaged.config import EngineConfig
    from jpaged.server import serve
    from jpaged.server.settings import ServerSettings
    compilations.install()
    factory = None
    if args.fake:
        from tests.server.fake_engine import FakeEngine

        def factory():
            return FakeEngine(num_pages=1 << 16, max_num_seqs=args.max_num_seqs, max_model_len=4096, step_delay=0.002)
    config = EngineConfig(model=args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                          num_kv_blocks=args.num_kv_blocks)
    settings = ServerSettings(port=args.port, max_pending_requests=100_000, stream_interval=args.stream_interval,
                              warmup=True, warmup_variants=args.warmup_variants)
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


def parse_rates(text: str) -> list[float]:
    rates = [float(x) for x in text.split(",") if x.strip()]
    if not rates or any(not r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"--request-rates takes positive numbers or inf, got {text!r}")
    return rates


def rate_label(rate: float) -> str:
    return "inf" if rate == float("inf") else f"{rate:g}"


def scrape(url: str) -> dict[str, float]:
    """The server's unlabelled Prometheus samples, name -> value."""
    out = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        parts = line.split()
        if len(parts) == 2 and not line.startswith("#") and "{" not in parts[0]:
            with contextlib.suppress(ValueError):
                out[parts[0]] = float(parts[1])
    return out


def compilations(metrics: dict[str, float]) -> float | None:
    for name in ("jpaged_compilations_total", "jpaged_num_compilations"):
        if name in metrics:
            return metrics[name]
    return None


def run_offline(args) -> None:
    """The offline engine (`LLM.generate`, same config as the server) on the sweep's requests; JSON to --out."""
    from bench import common
    from jpaged import LLM

    requests = all_requests(args)
    llm = LLM(model=args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs, num_kv_blocks=args.num_kv_blocks)
    llm.engine.warmup()
    warm = requests[:min(len(requests), args.max_num_seqs)]
    common.timed_generate(llm, [p for p, _ in warm], [n for _, n in warm])
    run = common.timed_generate(llm, [p for p, _ in requests], [n for _, n in requests])
    result = {"num_requests": run["num_requests"], "duration_s": run["seconds"],
              "output_throughput": run["output_tokens"] / run["seconds"],
              "total_token_throughput": (run["input_tokens"] + run["output_tokens"]) / run["seconds"],
              "compilations": run["compilations"], "num_preemptions": run["num_preemptions"]}
    with open(args.out, "w") as f:
        json.dump(result, f)


def all_requests(args) -> list[tuple[list[int], int]]:
    """The offline baseline's requests: the same lengths as the rate-inf run (--num-prompts)."""
    return sample_requests(args.num_prompts, args.input_len, args.output_len, args.range_ratio,
                           token_range_of(args), args.seed)


def token_range_of(args) -> tuple[int, int]:
    return tuple(args.token_range or ((97, 123) if args.fake else (1000, 20000)))


def offline_baseline(args) -> dict:
    out = os.path.join(os.path.dirname(os.path.abspath(args.out)), f".offline_{os.getpid()}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--role", "offline", "--out", out]
    cmd += [x for k, v in vars(args).items() if k in OFFLINE_FLAGS and v is not None
            for x in ([f"--{k.replace('_', '-')}"] + ([str(v)] if not isinstance(v, list) else [str(i) for i in v]))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(cmd, env=env, check=True)
    with open(out) as f:
        result = json.load(f)
    os.remove(out)
    return result


OFFLINE_FLAGS = ("model", "dtype", "max_num_seqs", "num_kv_blocks", "num_prompts", "input_len", "output_len",
                 "range_ratio", "token_range", "seed")


def plot(report: dict, path: str) -> str | None:
    """Latency against output throughput, one point per rate, the offline throughput as a line."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (run `python bench/serving.py --plot JSON` where it is)")
        return None
    rows = [r for r in report["rates"] if r["results"]["completed"]]
    x = [r["results"]["output_throughput"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, title in ((axes[0], "ttft_ms", "TTFT"), (axes[1], "tpot_ms", "TPOT")):
        for q, style in (("p50", "o-"), ("p99", "s--")):
            ax.plot(x, [r["results"][metric][q] for r in rows], style, label=f"{title} {q}")
        for r, xi in zip(rows, x):
            ax.annotate(f"{r['request_rate']}/s", (xi, r["results"][metric]["p50"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        offline = (report.get("offline") or {}).get("output_throughput")
        if offline:
            ax.axvline(offline, color="grey", linestyle=":", label="offline engine")
        ax.set_xlabel("output throughput (tok/s)")
        ax.set_ylabel(f"{title} (ms)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    env = report["environment"]
    fig.suptitle(f"jpaged serve, {report['workload']['model']} on {env['device']} "
                 f"({report['workload']['input_len']}/{report['workload']['output_len']} tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=["bench", "server", "offline"], default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--url", help="benchmark a server already running on loopback")
    parser.add_argument("--fake", action="store_true", help="serve the fake engine (measures server overhead)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--served-model-name", default=None, help="`model` sent in requests (default: none)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument("--warmup-variants", choices=("all", "plain"), default="plain",
                        help="the server's --warmup-variants: its requests are greedy, so 'plain' (the default "
                        "here) compiles every shape they use; 'all' times the whole warm-up")
    parser.add_argument("--stream-interval", type=float, default=0.0, help="the server's --stream-interval")
    parser.add_argument("--request-rates", type=parse_rates, default=[float("inf")],
                        help="comma-separated requests/s, run in order over one server start (inf: all at once)")
    parser.add_argument("--num-prompts", type=int, default=500, help="requests of the rate-inf run and the offline run")
    parser.add_argument("--rate-seconds", type=float, default=20.0, help="seconds of arrivals at each finite rate")
    parser.add_argument("--min-prompts", type=int, default=20, help="fewest requests at a finite rate")
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--client-processes", type=int, default=4, help="load-generating processes")
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--range-ratio", type=float, default=0.5)
    parser.add_argument("--token-range", type=int, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="prompt token ids are drawn from [LOW, HIGH) (default 1000 20000; fake: 97 123)")
    parser.add_argument("--num-warmup", type=int, default=64, help="warm-up requests before every rate but the first")
    parser.add_argument("--no-offline", action="store_true", help="skip the offline-engine baseline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--startup-timeout", type=float, default=900.0)
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/serving_sweep_<model>_<device>.json)")
    parser.add_argument("--plot", metavar="JSON", help="only draw the PNG of an existing result")
    args = parser.parse_args()
    if args.role == "server":
        run_server(args)
        return
    if args.role == "offline":
        run_offline(args)
        return
    if args.plot:
        with open(args.plot) as f:
            print(plot(json.load(f), os.path.splitext(args.plot)[0] + ".png"))
        return
    if args.num_prompts < 1 or args.client_processes < 1:
        parser.error(f"--num-prompts and --client-processes must be >= 1, got {args.num_prompts}, "
                     f"{args.client_processes}")
    if args.url and urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        parser.error(f"--url must be on loopback, got {args.url}")
    env = environment(args.fake)
    if args.out is None:
        device = "fake" if args.fake else re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
        args.out = os.path.join("bench", "results", f"serving_sweep_{args.model}_{device}.json")
    token_range = token_range_of(args)
    workload = {k: v for k, v in vars(args).items() if k not in ("role", "port", "plot", "request_rates")}
    workload["request_rates"] = [rate_label(r) for r in args.request_rates]   # JSON has no Infinity
    report = {"benchmark": "serving_sweep", "environment": env, "workload": workload,
              "command": " ".join(["python", "bench/serving.py", *sys.argv[1:]]), "rates": [], "offline": None}

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)

    with contextlib.nullcontext((args.url, None)) if args.url else server_process(args) as (url, pid):
        report["server_ready_s"] = getattr(server_process, "ready_s", None)
        for i, rate in enumerate(args.request_rates):
            n = args.num_prompts if rate == float("inf") else max(args.min_prompts, int(rate * args.rate_seconds))
            requests = sample_requests(n, args.input_len, args.output_len, args.range_ratio, token_range,
                                       args.seed + 10 * i)
            if i and args.num_warmup:
                warm = sample_requests(args.num_warmup, args.input_len, args.output_len, args.range_ratio,
                                       token_range, args.seed + 10 * i + 1)
                run_workload(url, warm, float("inf"), model=args.served_model_name,
                             max_concurrency=args.max_concurrency, seed=args.seed, processes=args.client_processes)
            before, cpu_before = scrape(url), process_cpu_seconds(pid)
            results, duration, client_cpu = run_workload(url, requests, rate, model=args.served_model_name,
                                                         max_concurrency=args.max_concurrency, seed=args.seed + i,
                                                         processes=args.client_processes)
            after, cpu_after = scrape(url), process_cpu_seconds(pid)
            summary = summarize(results, duration)
            if pid is not None:  # the server's CPU cost per output token: all threads, and the event loop's
                tokens = max(summary["total_output_tokens"], 1)
                for name, t0, t1 in zip(("server_cpu", "server_event_loop_cpu"), cpu_before, cpu_after):
                    summary[f"{name}_s"] = t1 - t0
                    summary[f"{name}_us_per_output_token"] = 1e6 * (t1 - t0) / tokens
            c0, c1 = compilations(before), compilations(after)
            row = {"request_rate": rate_label(rate), "num_prompts": n,
                   "compilations": None if c0 is None or c1 is None else c1 - c0,
                   "num_preemptions": after.get("jpaged_num_preemptions_total", 0.0)
                                      - before.get("jpaged_num_preemptions_total", 0.0),
                   "client": {"processes": args.client_processes, "cpu_s": client_cpu,
                              "cpu_utilization": client_cpu / (duration * args.client_processes)},
                   "results": summary}
            report["rates"].append(row)
            print(f"\n=== request rate {row['request_rate']} ({n} requests, {row['compilations']} compilations, "
                  f"client CPU {row['client']['cpu_utilization']:.2f} of {args.client_processes} processes)")
            print_table(summary)
            save()
    if not (args.no_offline or args.fake or args.url):
        report["offline"] = offline_baseline(args)
        inf = [r for r in report["rates"] if r["request_rate"] == "inf"]
        if inf:
            report["saturation_vs_offline"] = inf[-1]["results"]["output_throughput"] / report["offline"]["output_throughput"]
        print(f"\noffline engine: {report['offline']['output_throughput']:.1f} output tok/s"
              + (f"; rate inf / offline = {report['saturation_vs_offline']:.3f}" if inf else ""))
    save()
    print(f"wrote {args.out}")
    png = plot(report, os.path.splitext(args.out)[0] + ".png")
    if png:
        print(f"wrote {png}")


if __name__ == "__main__":
    main()
