"""The server front end's throughput: N concurrent streamed completions from a client that does almost
no work (raw sockets, no JSON parsing but the last event's usage), so the server is what limits it.

    PYTHONPATH=. python bench/sse_flood.py --fake --streams 500 --max-tokens 128

Prints and writes (--out) output tokens/s, SSE events and writes per token, and the server's CPU per
output token (all threads, and its event loop alone). With --fake the engine is the fake one of
tests/server/fake_engine.py, so the numbers are the front end's alone.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import types

from bench.serving import process_cpu_seconds, server_process


async def one_stream(host: str, port: int, body: bytes) -> tuple[int, int, int]:
    """(output tokens, SSE events, socket reads) of one streamed completion."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    data, reads = bytearray(), 0
    while True:
        chunk = await reader.read(1 << 16)
        if not chunk:
            break
        reads += 1
        data += chunk
    writer.close()
    text = bytes(data)
    if not text.startswith(b"HTTP/1.1 200") or b"data: [DONE]" not in text:
        raise RuntimeError(f"bad answer: {text[:300]!r}")
    usage_event = text.rsplit(b"data: [DONE]", 1)[0].rsplit(b"data: ", 1)[1]
    usage = json.loads(usage_event[:usage_event.index(b"}}") + 2])["usage"]
    return usage["completion_tokens"], text.count(b"data: ") - 2, reads


async def flood(url: str, streams: int, max_tokens: int, prompt_len: int) -> dict:
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": [97 + i % 26 for i in range(prompt_len)], "max_tokens": max_tokens,
                       "temperature": 0, "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    t0 = time.perf_counter()
    results = await asyncio.gather(*[one_stream(host, int(port), body) for _ in range(streams)])
    duration = time.perf_counter() - t0
    tokens = sum(r[0] for r in results)
    return {"duration_s": duration, "output_tokens": tokens, "output_throughput": tokens / duration,
            "events_per_token": sum(r[1] for r in results) / tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fake", action="store_true", help="serve the fake engine (the front end alone)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--stream-interval", type=float, default=0.0, help="the server's --stream-interval")
    parser.add_argument("--repeats", type=int, default=3, help="runs after one warm-up run; the best is reported")
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    server_args = types.SimpleNamespace(model=args.model, dtype=args.dtype, max_num_seqs=max(args.streams, 1),
                                        fake=args.fake, num_kv_blocks=None, startup_timeout=args.startup_timeout,
                                        stream_interval=args.stream_interval)
    runs = []
    with server_process(server_args) as (url, pid):
        asyncio.run(flood(url, min(args.streams, 32), 8, args.prompt_len))  # warm-up
        for _ in range(args.repeats):
            before = process_cpu_seconds(pid)
            run = asyncio.run(flood(url, args.streams, args.max_tokens, args.prompt_len))
            cpu, loop_cpu = (a - b for a, b in zip(process_cpu_seconds(pid), before))
            run["server_cpu_us_per_output_token"] = 1e6 * cpu / run["output_tokens"]
            run["server_event_loop_cpu_us_per_output_token"] = 1e6 * loop_cpu / run["output_tokens"]
            runs.append(run)
            print(f"{run['output_throughput']:8.0f} tok/s  {run['events_per_token']:.2f} events/token  server CPU "
                  f"{run['server_cpu_us_per_output_token']:.1f} us/token (event loop "
                  f"{run['server_event_loop_cpu_us_per_output_token']:.1f})", flush=True)
    best = max(runs, key=lambda r: r["output_throughput"])
    report = {"benchmark": "sse_flood", "workload": vars(args), "best": best, "runs": runs}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
