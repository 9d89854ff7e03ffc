"""A profiler trace of the engine's decode steps (host threads and GPU streams), plus its summary.

  PYTHONPATH=. python -m bench.trace_steps --batch 64 --out-dir /tmp/trace

Runs one warm batch, then traces --traced-tokens decode steps of a second one with
jax.profiler (perfetto JSON). `summarize` (also run here) reports, over the traced window, the GPU's
busy fraction, the idle gaps between kernels longer than --gap-us, and the longest host events, so
that device idle time between steps can be attributed.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib

import numpy as np

from bench import common, latency


def summarize(trace_path: str | pathlib.Path, gap_us: float = 50.0) -> dict:
    with gzip.open(trace_path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name"):
            names[(e["name"], e["pid"], e.get("tid"))] = e["args"]["name"]
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    by_thread = collections.defaultdict(list)
    for e in spans:
        proc = names.get(("process_name", e["pid"], None), str(e["pid"]))
        thread = names.get(("thread_name", e["pid"], e.get("tid")), str(e.get("tid")))
        by_thread[(proc, thread)].append(e)
    threads = {}
    for (proc, thread), evs in by_thread.items():
        evs.sort(key=lambda e: e["ts"])
        busy = _union_length([(e["ts"], e["ts"] + e["dur"]) for e in evs])
        threads[f"{proc} | {thread}"] = dict(events=len(evs), busy_us=busy,
                                            span_us=evs[-1]["ts"] + evs[-1]["dur"] - evs[0]["ts"])
    gpu = [e for (proc, thread), evs in by_thread.items() if "GPU" in proc or "gpu" in proc.lower()
           for e in evs if "Stream" in thread or "stream" in thread.lower()]
    gpu.sort(key=lambda e: e["ts"])
    out = dict(threads=threads)
    if gpu:
        intervals = merge_intervals([(e["ts"], e["ts"] + e["dur"]) for e in gpu])
        start, end = intervals[0][0], intervals[-1][1]
        gaps = [(b[0] - a[1], a[1]) for a, b in zip(intervals, intervals[1:]) if b[0] - a[1] > gap_us]
        busy = sum(b - a for a, b in intervals)
        kernels = collections.Counter()
        for e in gpu:
            kernels[e["name"][:80]] += e["dur"]
        out.update(gpu_window_us=end - start, gpu_busy_us=busy, gpu_busy_fraction=busy / (end - start),
                   gaps_over_threshold=len(gaps), gap_us_total=sum(g for g, _ in gaps),
                   largest_gaps_us=sorted((round(g, 1) for g, _ in gaps), reverse=True)[:30],
                   top_kernels_us=kernels.most_common(25))
        # What the host was doing during the largest gaps.
        host = [e for (proc, thread), evs in by_thread.items() if not ("GPU" in proc or "gpu" in proc.lower())
                for e in evs]
        around = collections.Counter()
        for g, t0 in sorted(gaps, reverse=True)[:20]:
            for e in host:
                if e["ts"] <= t0 + g and e["ts"] + e["dur"] >= t0 and e["dur"] < 20 * g + 1e4:
                    around[e["name"][:80]] += 1
        out["host_events_overlapping_top_gaps"] = around.most_common(40)
    return out


def merge_intervals(intervals):
    """Overlapping [start, end) intervals merged, sorted."""
    intervals = sorted(intervals)
    merged = [list(intervals[0])]
    for a, b in intervals[1:]:
        if a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged


def _union_length(intervals) -> float:
    return sum(b - a for a, b in merge_intervals(intervals)) if intervals else 0.0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_engine_flags(p, max_num_seqs=64, max_num_batched_tokens=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--traced-tokens", type=int, default=12)
    p.add_argument("--gap-us", type=float, default=50.0)
    p.add_argument("--out-dir", default="/tmp/jpaged_trace")
    args = p.parse_args(argv)
    import jax

    cfg = common.model_config(args.model)
    model = common.random_model(cfg, args.dtype)
    llm = common.make_llm(model, args.dtype, **common.engine_kwargs(
        args, args.prompt_len + 64 + 16, enable_prefix_caching=False))
    rng = np.random.default_rng(0)
    prompts = common.random_prompts(rng, [args.prompt_len] * args.batch, cfg.vocab_size)
    latency.run_batch(llm, prompts, 32)  # compile + warm
    prompts = common.random_prompts(rng, [args.prompt_len] * args.batch, cfg.vocab_size)
    with jax.profiler.trace(args.out_dir, create_perfetto_trace=True):
        rec = latency.run_batch(llm, prompts, args.traced_tokens)
    steps = [1e3 * r.seconds for r in rec.decode_steps(args.batch)]
    trace = sorted(pathlib.Path(args.out_dir).rglob("perfetto_trace.json.gz"))[-1]
    summary = dict(decode_step_ms=steps, trace=str(trace), **summarize(trace, args.gap_us))
    print(json.dumps({k: v for k, v in summary.items() if k != "threads"}, indent=1)[:6000])
    return summary


if __name__ == "__main__":
    main()
