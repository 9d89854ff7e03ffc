"""Prefix caching: time to first token and total time on a shared-prefix workload, caching on and off.

  PYTHONPATH=. python -m bench.prefix                     # Llama-3-8B shape
  PYTHONPATH=. python -m bench.prefix --num-requests 50   # a shorter run

--num-requests (200) requests, all given at once, each a shared --prefix-len (2000) token system
prefix followed by its own --question-len (100) random tokens, --new-tokens (64) generated (greedy,
EOS ignored). TTFT of a request = its first token's time - the time it was added (queueing included,
as an offline batch sees it). One engine with prefix caching on, then a fresh one with it off; each
first runs --warmup-requests (default all) requests over another prefix, so the timed run's step
shapes are already compiled; `compilations` in the JSON says if any happened inside the timing.
"""
from __future__ import annotations

import argparse
import gc
import time
from typing import Sequence

import numpy as np

from bench import common

NAME = "prefix"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_engine_flags(p, max_num_seqs=256)
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--prefix-len", type=int, default=2000)
    p.add_argument("--question-len", type=int, default=100)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--warmup-requests", type=int,
                   help="requests of the warm-up run over another prefix (default --num-requests: the same shapes)")
    args = p.parse_args(argv)
    args.warmup_requests = args.warmup_requests or args.num_requests
    for flag in ("num_requests", "prefix_len", "question_len", "new_tokens", "warmup_requests"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    return args


def shared_prefix_prompts(rng, args, vocab: int, num_requests: int) -> list[list[int]]:
    prefix = common.random_prompts(rng, [args.prefix_len], vocab)[0]
    return [prefix + q for q in common.random_prompts(rng, [args.question_len] * num_requests, vocab)]


def run_engine(model, args, caching: bool) -> dict:
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    llm = common.make_llm(model, args.dtype, **common.engine_kwargs(
        args, args.prefix_len + args.question_len + args.new_tokens, enable_prefix_caching=caching))
    try:
        warm = shared_prefix_prompts(rng, args, vocab, args.warmup_requests)
        common.timed_generate(llm, warm, [args.new_tokens] * len(warm))
        prompts = shared_prefix_prompts(rng, args, vocab, args.num_requests)
        run = common.timed_generate(llm, prompts, [args.new_tokens] * len(prompts))
        num_pages = llm.engine.runner.num_pages
    finally:
        del llm
        gc.collect()  # the next engine needs this one's page pool
    ttft = np.asarray(run.pop("ttft_s"))
    return dict(prefix_caching=caching, num_kv_pages=num_pages, mean_ttft_ms=1e3 * float(ttft.mean()),
                p50_ttft_ms=1e3 * float(np.percentile(ttft, 50)), p90_ttft_ms=1e3 * float(np.percentile(ttft, 90)),
                output_tok_s=run["output_tokens"] / run["seconds"], **run)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = common.model_config(args.model)
    start = time.perf_counter()
    model = common.random_model(cfg, args.dtype)
    build_s = time.perf_counter() - start
    on = run_engine(model, args, caching=True)
    off = run_engine(model, args, caching=False)
    result = dict(
        benchmark=NAME, command=common.command_line(argv, NAME), device=common.device_info(),
        model=args.model, model_shape=common.model_shape(cfg, args.dtype), model_build_s=build_s,
        engine=dict(block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                    max_num_batched_tokens=args.max_num_batched_tokens, backend=common.backend_override(args)),
        workload=dict(num_requests=args.num_requests, prefix_len=args.prefix_len, question_len=args.question_len,
                      new_tokens=args.new_tokens, warmup_requests=args.warmup_requests,
                      prompts="one random shared prefix + random distinct questions"),
        caching_on=on, caching_off=off,
        ttft_speedup=off["mean_ttft_ms"] / on["mean_ttft_ms"], total_time_speedup=off["seconds"] / on["seconds"])
    print_results(result)
    print(f"\nwrote {common.write_json(result, args.out, NAME)}")
    return result


def print_results(r: dict) -> None:
    rows = [("device", r["device"]["device_kind"])]
    for label, run in (("caching on", r["caching_on"]), ("caching off", r["caching_off"])):
        rows += [(f"{label} mean TTFT ms", run["mean_ttft_ms"]), (f"{label} total s", run["seconds"]),
                 (f"{label} prefix-cache hit tokens", run["prefix_cache_hits"]),
                 (f"{label} compilations while timed", run["compilations"])]
    rows += [("mean TTFT speedup", r["ttft_speedup"]), ("total time speedup", r["total_time_speedup"])]
    common.print_table(f"shared-prefix workload, {r['model']}", rows)


if __name__ == "__main__":
    main()
