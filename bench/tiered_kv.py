"""The host tier of the KV cache: multi-turn TTFT and throughput, prefix fetch vs recompute, decode under fetches.

  PYTHONPATH=. python -m bench.tiered_kv --out bench/results/tiered_kv_h100.json   # Llama-3-8B shape, GPU
  PYTHONPATH=. python -m bench.tiered_kv --tiny --out /tmp/tiered_kv_cpu.json       # tiny model, CPU check

Three measurements, each on a fresh engine (random weights of --model):
1. multi-turn (after an untimed warm-up over other conversations): --conversations conversations x --turns turns; each turn sends the whole history plus
   --user-tokens new tokens and generates --new-tokens (greedy, EOS ignored), all conversations of a
   turn at once. The device pool holds a quarter of the final working set, so histories are evicted
   between turns. Mean TTFT (add -> first token, queueing included) and output tok/s, with the host
   tier (--host-gb) and without it (recompute).
2. fetch vs recompute: a --fetch-tokens prompt is prefilled once (recompute time = its TTFT, the step
   shapes compiled by a warm-up prompt of the same length), evicted by filler prompts, then sent
   again: its pages come back from the host tier (fetch time = that TTFT). Target: ratio <= 0.3.
3. decode under fetches: --decode-seqs sequences decode; mean engine.step() time alone, then that of
   the steps whose schedule starts the host fetch of a --fetch-tokens prefix (admitted every few
   steps; the copy runs while that step's decodes do). Target: within 10 %.
"""
from __future__ import annotations

import argparse
import gc
import time
from typing import Sequence

import numpy as np

from bench import common

NAME = "tiered_kv"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_engine_flags(p, max_num_seqs=64)
    p.add_argument("--tiny", action="store_true", help="tiny-llama preset, float32, small sizes (a CPU check)")
    p.add_argument("--conversations", type=int, default=64)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--user-tokens", type=int, default=192)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--fetch-tokens", type=int, default=8192)
    p.add_argument("--decode-seqs", type=int, default=32)
    p.add_argument("--decode-steps", type=int, default=60)
    p.add_argument("--host-gb", type=float, default=24.0, help="host tier size (GiB); the 8B multi-turn working set is 16")
    args = p.parse_args(argv)
    if args.tiny:
        args.model, args.dtype = "tiny-llama", "float32"
        args.conversations, args.turns, args.user_tokens, args.new_tokens = 4, 3, 48, 8
        args.fetch_tokens, args.decode_seqs, args.decode_steps, args.host_gb = 512, 4, 12, 0.25
        args.max_num_seqs, args.max_num_batched_tokens = 8, 256
    return args


def _engine(model, args, max_model_len: int, num_pages: int, host_gb: float):
    llm = common.make_llm(model, args.dtype, **common.engine_kwargs(
        args, max_model_len, num_kv_blocks=num_pages, kv_host_cache_gb=host_gb))
    return llm


def _run_requests(engine, requests: list[tuple[str, list[int], int]]) -> dict:
    """Adds all requests at once and steps to completion; per-request TTFT and the token counts."""
    from jpaged.sampling_params import SamplingParams

    start = time.perf_counter()
    added = {}
    for rid, prompt, n in requests:
        engine.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
        added[rid] = time.perf_counter()
    first, outputs = {}, {}
    while engine.has_unfinished():
        now_outputs = engine.step()
        now = time.perf_counter()
        for out in now_outputs:
            if out.outputs[0].token_ids and out.request_id not in first:
                first[out.request_id] = now - added[out.request_id]
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
    return dict(seconds=time.perf_counter() - start, ttft_s=[first[rid] for rid, _, _ in requests],
                outputs=[outputs[rid] for rid, _, _ in requests])


def multi_turn(model, args, host_gb: float) -> dict:
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    final = args.turns * (args.user_tokens + args.new_tokens)
    working_pages = args.conversations * -(-final // args.block_size)
    num_pages = max(working_pages // 4, 2 * -(-final // args.block_size) + args.max_num_seqs)
    llm = _engine(model, args, final + 1, num_pages, host_gb)
    engine = llm.engine

    def conversations(name: str, turns: int):
        histories = [[] for _ in range(args.conversations)]
        ttfts, seconds, generated = [], 0.0, 0
        for turn in range(turns):
            requests = []
            for c, history in enumerate(histories):
                history += rng.integers(3, vocab, args.user_tokens).tolist()
                requests.append((f"{name}{c}t{turn}", list(history), args.new_tokens))
            run = _run_requests(engine, requests)
            for history, out in zip(histories, run["outputs"]):
                history += out
            ttfts += run["ttft_s"]
            seconds += run["seconds"]
            generated += sum(len(o) for o in run["outputs"])
        return ttfts, seconds, generated

    try:
        engine.warmup()
        conversations("warm", min(3, args.turns))  # compiles what the warm-up does not (other histories)
        compiled = engine.runner.num_compilations
        ttfts, seconds, generated = conversations("c", args.turns)
        stats = engine.stats()
    finally:
        llm = engine = None
        gc.collect()
    return dict(host_gb=host_gb, num_kv_pages=num_pages, working_set_pages=working_pages,
                mean_ttft_ms=1e3 * float(np.mean(ttfts)), p90_ttft_ms=1e3 * float(np.percentile(ttfts, 90)),
                output_tok_s=generated / seconds, seconds=seconds, compilations_while_timed=stats["num_compilations"] - compiled,
                **{k: v for k, v in stats.items() if k.startswith("kv_") or k.startswith("prefix_cache")})


def fetch_vs_recompute(model, args) -> dict:
    rng = np.random.default_rng(1)
    vocab, n = model.config.vocab_size, args.fetch_tokens
    pages = -(-n // args.block_size)
    llm = _engine(model, args, n + 2, 2 * pages + args.max_num_seqs, args.host_gb)
    engine = llm.engine
    try:
        warm, target, filler_a, filler_b = (rng.integers(3, vocab, n).tolist() for _ in range(4))
        _run_requests(engine, [("warm", warm, 1)])
        _run_requests(engine, [("warm-again", warm, 1)])  # a device-cache hit: the short-prefill shapes
        recompute = _run_requests(engine, [("target", target, 1)])["ttft_s"][0]
        for i, filler in enumerate((filler_a, filler_b)):
            _run_requests(engine, [(f"filler{i}", filler, 1)])
        _run_requests(engine, [("warm-fetch", warm, 1)])  # compiles the host -> device copies
        before = engine.stats()
        fetch = _run_requests(engine, [("target-again", target, 1)])["ttft_s"][0]
        after = engine.stats()
    finally:
        llm = engine = None
        gc.collect()
    return dict(tokens=n, recompute_ms=1e3 * recompute, fetch_ms=1e3 * fetch, ratio=fetch / recompute,
                fetched_pages=after["kv_pages_fetched"] - before["kv_pages_fetched"],
                fetched_bytes=(after["kv_pages_fetched"] - before["kv_pages_fetched"]) * after["kv_page_bytes"])


def decode_under_fetches(model, args) -> dict:
    from jpaged.sampling_params import SamplingParams

    rng = np.random.default_rng(2)
    vocab, n = model.config.vocab_size, args.fetch_tokens
    pages = -(-n // args.block_size)
    decode_len = 2 * args.decode_steps + 64
    num_fetches = 4
    num_pages = args.decode_seqs * -(-(64 + decode_len) // args.block_size) + 2 * pages + 16
    llm = _engine(model, args, n + decode_len + 2, num_pages, args.host_gb)
    engine = llm.engine
    try:
        engine.warmup()
        prefixes = [rng.integers(3, vocab, n).tolist() for _ in range(num_fetches + 3)]
        for i, p in enumerate(prefixes):  # each computed, then evicted by the next ones: on the host tier
            _run_requests(engine, [(f"pre{i}", p, 1)])
        params = SamplingParams(temperature=0.0, max_tokens=decode_len, ignore_eos=True)
        for i in range(args.decode_seqs):
            engine.add_request(f"d{i}", rng.integers(3, vocab, 64).tolist(), params)
        for _ in range(8):  # prefill, then steady decode
            engine.step()

        def timed_steps(steps: int, fetch_every: int | None, tag: str) -> tuple[list[float], list[float]]:
            """Wall times of engine.step(): those whose schedule started a host fetch (its copy runs
            while that step's decodes do), and the others."""
            during, other, k = [], [], 0
            for s in range(steps):
                if fetch_every and s % fetch_every == 0 and k < num_fetches:
                    engine.add_request(f"{tag}{k}", prefixes[k] + [5], SamplingParams(max_tokens=1, temperature=0.0))
                    k += 1
                fetched = engine.stats()["kv_pages_fetched"]
                t = time.perf_counter()
                engine.step()
                dt = time.perf_counter() - t
                (during if engine.stats()["kv_pages_fetched"] > fetched else other).append(dt)
            return during, other

        _, alone = timed_steps(args.decode_steps // 2, None, "none")
        before = engine.stats()["kv_pages_fetched"]
        during, _ = timed_steps(args.decode_steps // 2, max(1, args.decode_steps // (2 * num_fetches)), "f")
        fetched = engine.stats()["kv_pages_fetched"] - before
    finally:
        llm = engine = None
        gc.collect()
    return dict(decode_seqs=args.decode_seqs, steps_alone=len(alone), steps_with_fetch=len(during),
                mean_step_ms_alone=1e3 * float(np.mean(alone)),
                mean_step_ms_with_fetches=1e3 * float(np.mean(during)) if during else None,
                ratio=float(np.mean(during) / np.mean(alone)) if during else None, fetched_pages=fetched)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = common.model_config(args.model)
    model = common.random_model(cfg, args.dtype)
    with_host = multi_turn(model, args, args.host_gb)
    without = multi_turn(model, args, 0.0)
    result = dict(
        benchmark=NAME, command=common.command_line(argv, NAME), device=common.device_info(), model=args.model,
        model_shape=common.model_shape(cfg, args.dtype),
        workload=dict(conversations=args.conversations, turns=args.turns, user_tokens=args.user_tokens,
                      new_tokens=args.new_tokens, fetch_tokens=args.fetch_tokens, decode_seqs=args.decode_seqs,
                      block_size=args.block_size, max_num_batched_tokens=args.max_num_batched_tokens),
        multi_turn_host_tier=with_host, multi_turn_recompute=without,
        ttft_speedup=without["mean_ttft_ms"] / with_host["mean_ttft_ms"],
        throughput_speedup=with_host["output_tok_s"] / without["output_tok_s"],
        fetch_vs_recompute=fetch_vs_recompute(model, args),
        decode_under_fetches=decode_under_fetches(model, args))
    rows = [("device", result["device"]["device_kind"]),
            ("multi-turn mean TTFT ms, host tier", with_host["mean_ttft_ms"]),
            ("multi-turn mean TTFT ms, recompute", without["mean_ttft_ms"]),
            ("multi-turn output tok/s, host tier", with_host["output_tok_s"]),
            ("multi-turn output tok/s, recompute", without["output_tok_s"]),
            (f"{args.fetch_tokens}-token prefix fetch / recompute", result["fetch_vs_recompute"]["ratio"]),
            ("decode step with fetches / without", result["decode_under_fetches"]["ratio"])]
    common.print_table(f"tiered KV cache, {args.model}", rows)
    print(f"\nwrote {common.write_json(result, args.out, NAME)}")
    return result


if __name__ == "__main__":
    main()
