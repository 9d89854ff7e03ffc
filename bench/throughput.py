"""Offline throughput through the engine: output and total tokens/s, beside HF transformers.

  PYTHONPATH=. python -m bench.throughput                          # Llama-3-8B shape, both workloads
  PYTHONPATH=. python -m bench.throughput --model qwen3-0.6b --workloads nano   # issue 5's figure
  PYTHONPATH=. python -m bench.throughput --hf                     # + HF generate at batch 64 and 128

Workloads (random token-id prompts, greedy, EOS ignored, all requests given at once):
  fixed: --num-requests (1000) requests of --input-len (512) tokens, --output-len (256) new tokens each;
  nano:  nano-vllm's bench.py: --nano-num-seqs (256) requests whose input and output lengths are each
         uniform in [--nano-min-len, --nano-max-len] (100..1024), numpy seed 0.
Output tok/s = generated tokens / wall time; total tok/s counts the prompt tokens too. Before each
timed run the engine runs the first --warmup-requests requests of the same length profile with other
tokens, so compilation is outside the timing; `compilations` in the JSON says if any happened inside.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

import numpy as np

from bench import common

NAME = "throughput"
WORKLOADS = ("fixed", "nano")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 512: +2.7 % over 256 on the 8B fixed workload (H100, session 7, bench/README.md).
    common.add_engine_flags(p, max_num_seqs=512)
    p.add_argument("--workloads", default="fixed,nano", help=f"comma-separated subset of {','.join(WORKLOADS)}")
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--nano-num-seqs", type=int, default=256)
    p.add_argument("--nano-min-len", type=int, default=100)
    p.add_argument("--nano-max-len", type=int, default=1024)
    p.add_argument("--warmup-requests", type=int, help="requests in each warm-up run (default --max-num-seqs)")
    p.add_argument("--hf", action="store_true", help="also run HF transformers generate on the fixed workload")
    p.add_argument("--hf-batch-sizes", default="64,128")
    p.add_argument("--hf-modes", default="eager", help="HF modes: eager, static, compile")
    args = p.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    if not args.workloads or any(w not in WORKLOADS for w in args.workloads):
        raise ValueError(f"--workloads must be a comma-separated subset of {','.join(WORKLOADS)}")
    for flag in ("num_requests", "input_len", "output_len", "nano_num_seqs", "nano_min_len"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.nano_max_len < args.nano_min_len:
        raise ValueError(f"--nano-max-len ({args.nano_max_len}) must be >= --nano-min-len ({args.nano_min_len})")
    args.warmup_requests = args.warmup_requests or args.max_num_seqs
    return args


def workload_lengths(name: str, args) -> tuple[list[int], list[int]]:
    """(input lengths, output lengths) of every request of the workload."""
    if name == "fixed":
        return [args.input_len] * args.num_requests, [args.output_len] * args.num_requests
    rng = np.random.default_rng(0)
    lo, hi, n = args.nano_min_len, args.nano_max_len, args.nano_num_seqs
    return rng.integers(lo, hi, n, endpoint=True).tolist(), rng.integers(lo, hi, n, endpoint=True).tolist()


def run_workload(llm, name: str, args, vocab: int) -> dict:
    inputs, outputs = workload_lengths(name, args)
    rng = np.random.default_rng(1)
    warm = min(args.warmup_requests, len(inputs))
    start = time.perf_counter()
    llm.engine.warmup()
    common.timed_generate(llm, common.random_prompts(rng, inputs[:warm], vocab), outputs[:warm])
    print(f"{name}: compiled and warmed up in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    recorder = phase_recorder(llm.engine)
    try:
        run = common.timed_generate(llm, common.random_prompts(rng, inputs, vocab), outputs)
    finally:
        recorder.close()
    print(f"{name}: {len(inputs)} requests in {run['seconds']:.1f} s", file=sys.stderr, flush=True)
    ttft = run.pop("ttft_s")
    run["step_breakdown"] = step_breakdown(recorder.records, llm.engine.runner.token_buckets())
    return dict(
        workload=dict(name=name, num_requests=len(inputs), input_len_mean=float(np.mean(inputs)),
                      output_len_mean=float(np.mean(outputs)), warmup_requests=warm),
        output_tok_s=run["output_tokens"] / run["seconds"],
        total_tok_s=(run["input_tokens"] + run["output_tokens"]) / run["seconds"],
        requests_s=run["num_requests"] / run["seconds"], mean_ttft_s=float(np.mean(ttft)), **run)


def phase_recorder(engine) -> common.StepRecorder:
    """Times each step's host phases as they run (nothing extra blocks): schedule, launch (packing +
    enqueue), fetch_wait (host idle, waiting on the device for the previous step), resolve."""
    recorder = common.StepRecorder(engine)
    recorder._patch(engine.runner, "launch", lambda fn: recorder.timed("launch", fn))
    recorder._patch(engine.runner, "fetch", lambda fn: recorder.timed("fetch_wait", fn))
    recorder._patch(engine, "_resolve", lambda fn: recorder.timed("resolve", fn))
    return recorder


def step_breakdown(records, buckets=None) -> dict:
    """Seconds summed over the timed run's steps, split into pure-decode and mixed (prefill) steps.
    With async scheduling, fetch_wait is the time the host had nothing to do: if it is small, the
    host, not the device, sets the pace. Given the runner's token `buckets`, the decode steps are also
    split by the bucket they were padded to: {bucket: [steps, mean sequences, mean ms]}."""
    out = {}
    for kind, steps in (("decode", [r for r in records if r.is_decode]),
                        ("mixed", [r for r in records if r.num_entries and not r.is_decode])):
        total = sum(r.seconds for r in steps)
        phases = {f"{p}_s": sum(r.phases.get(p, 0.0) for r in steps)
                  for p in ("schedule", "launch", "fetch_wait", "resolve")}
        out[kind] = dict(steps=len(steps), seconds=total, mean_step_ms=1e3 * total / max(1, len(steps)),
                         mean_tokens=float(np.mean([r.num_tokens for r in steps])) if steps else 0.0,
                         mean_seqs=float(np.mean([r.num_entries for r in steps])) if steps else 0.0,
                         host_busy_fraction=1 - phases["fetch_wait_s"] / total if total else 0.0, **phases)
    if buckets:
        by_bucket = {}
        for r in (r for r in records if r.is_decode):
            b = next((b for b in buckets if b >= r.num_tokens), r.num_tokens)
            by_bucket.setdefault(b, []).append(r)
        out["decode"]["by_bucket"] = {
            str(b): [len(rs), float(np.mean([r.num_entries for r in rs])), 1e3 * float(np.mean([r.seconds for r in rs]))]
            for b, rs in sorted(by_bucket.items())}
    return out


def run_hf(cfg, args) -> dict:
    from bench import hf_baseline

    model = hf_baseline.build_model(cfg, args.dtype)
    try:
        return dict(versions=hf_baseline.versions(), fixed=hf_baseline.throughput(
            cfg, batch_sizes=hf_baseline.parse_ints(args.hf_batch_sizes, "--hf-batch-sizes"),
            input_len=args.input_len, output_len=args.output_len,
            modes=hf_baseline.parse_modes(args.hf_modes), model=model))
    finally:
        del model
        hf_baseline.release()


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    common.prepare_memory(with_torch=args.hf)
    cfg = common.model_config(args.model)
    hf = run_hf(cfg, args) if args.hf else None
    start = time.perf_counter()
    model = common.random_model(cfg, args.dtype)
    build_s = time.perf_counter() - start
    max_len = max(max(i + o for i, o in zip(*workload_lengths(w, args))) for w in args.workloads)
    llm = common.make_llm(model, args.dtype, **common.engine_kwargs(args, max_len))
    result = dict(
        benchmark=NAME, command=common.command_line(argv, NAME), device=common.device_info(),
        model=args.model, model_shape=common.model_shape(cfg, args.dtype), model_build_s=build_s,
        engine=dict(backend=llm.engine.runner.backend.describe(), block_size=args.block_size,
                    max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                    max_num_prefill_seqs=args.max_num_prefill_seqs or None, mixed_split=not args.no_mixed_split,
                    fused_swiglu=not args.no_fused_swiglu,
                    max_model_len=max_len,
                    num_kv_pages=llm.engine.runner.num_pages, prefix_caching=True),
        results={w: run_workload(llm, w, args, cfg.vocab_size) for w in args.workloads},
        baselines=dict(hf_transformers=hf) if hf else {})
    if hf and "fixed" in result["results"]:
        best = max((r["output_tok_s"] for r in hf["fixed"].values() if "output_tok_s" in r), default=None)
        if best:
            result["results"]["fixed"]["speedup_vs_best_hf"] = result["results"]["fixed"]["output_tok_s"] / best
    print_results(result)
    print(f"\nwrote {common.write_json(result, args.out, NAME)}")
    return result


def print_results(r: dict) -> None:
    rows = [("device", r["device"]["device_kind"]), ("backend", r["engine"]["backend"])]
    for name, w in r["results"].items():
        label = f"{name} ({w['workload']['num_requests']} req)"
        rows += [(f"{label} output tok/s", w["output_tok_s"]), (f"{label} total tok/s", w["total_tok_s"]),
                 (f"{label} seconds", w["seconds"]), (f"{label} preemptions", w["num_preemptions"]),
                 (f"{label} compilations while timed", w["compilations"])]
        for kind, b in w.get("step_breakdown", {}).items():
            rows.append((f"{label} {kind} steps: n, mean ms, host busy", 
                         f"{b['steps']}, {b['mean_step_ms']:.2f}, {b['host_busy_fraction']:.2f}"))
        if "speedup_vs_best_hf" in w:
            rows.append((f"{label} x best HF", w["speedup_vs_best_hf"]))
    for key, h in (r["baselines"].get("hf_transformers") or {}).get("fixed", {}).items():
        rows.append((f"HF {key} output tok/s", h.get("output_tok_s", h.get("error"))))
    common.print_table(f"offline throughput, {r['model']}", rows)


if __name__ == "__main__":
    main()
