"""Decode-step variants side by side in one process: fused vs separate projections, sync vs async
scheduling; for each, the raw jitted step (device time), the time a call takes to return (enqueue:
host time XLA spends launching the step's kernels) and the engine's step. XLA flags (e.g. command
buffers) are per process: run this once per XLA_FLAGS setting and compare.

  PYTHONPATH=. python -m bench.step_variants --model llama3-8b --batches 1,64
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from bench import common, latency


def enqueue_and_latency(runner, call, reps: int = 30) -> dict:
    """ms for the jitted call to return, and ms until its result is ready, one call at a time."""
    import jax

    args, kwargs = call
    inputs = tuple(jax.device_put(args[2:4])) + tuple(args[4:])
    kv_cache = runner.kv_cache
    enqueue, blocking = [], []
    for i in range(reps + 2):
        jax.block_until_ready(kv_cache)
        start = time.perf_counter()
        out, _, kv_cache = runner.calls["step"](runner.weights, kv_cache, *inputs, **kwargs)
        mid = time.perf_counter()
        jax.block_until_ready(out)
        end = time.perf_counter()
        if i >= 2:
            enqueue.append(mid - start)
            blocking.append(end - start)
    runner.kv_cache = kv_cache
    return dict(enqueue_ms=1e3 * statistics.median(enqueue), blocking_ms=1e3 * statistics.median(blocking))


def run_phased(llm, prompts, new_tokens: int):
    """latency.run_batch with the engine step's phases timed as they run (async, nothing blocks
    more than it would): schedule, launch (host packing + enqueue), fetch_wait (waiting on the
    device for the previous step's samples), resolve (all of reading back, bookkeeping included)."""
    from jpaged.sampling_params import SamplingParams

    profiler = latency.StepProfiler(llm.engine, split=False)
    engine, runner = llm.engine, llm.engine.runner
    profiler._patch(runner, "launch", lambda fn: profiler.timed("launch", fn))
    profiler._patch(runner, "fetch", lambda fn: profiler.timed("fetch_wait", fn))
    profiler._patch(engine, "_resolve", lambda fn: profiler.timed("resolve", fn))
    try:
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True), use_tqdm=False)
    finally:
        profiler.close()
    return profiler


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--variants", default="separate,fused,fused_sync")
    p.add_argument("--out")
    args = p.parse_args(argv)
    import jax

    common.prepare_memory(with_torch=False)
    cfg = common.model_config(args.model)
    batches = [int(b) for b in args.batches.split(",")]
    result = dict(benchmark="step_variants", command=common.command_line(argv, "step_variants"),
                  device=common.device_info(), model=args.model, xla_flags=os.environ.get("XLA_FLAGS", ""),
                  copy_bandwidth_bytes_s=common.copy_bandwidth(), variants={})
    print(f"jax {jax.__version__}, XLA_FLAGS={result['xla_flags']!r}, copy {result['copy_bandwidth_bytes_s'] / 1e12:.2f} TB/s",
          flush=True)
    rng = np.random.default_rng(0)
    for variant in args.variants.split(","):
        model = common.random_model(cfg, "bfloat16")
        llm = common.make_llm(model, "bfloat16", max_model_len=args.prompt_len + args.new_tokens + 16,
                              max_num_seqs=max(batches), max_num_batched_tokens=512, enable_prefix_caching=False,
                              fuse_projections=variant != "separate", async_scheduling=variant != "fused_sync")
        figures = {}
        for batch in batches:
            prompts = common.random_prompts(rng, [args.prompt_len] * batch, cfg.vocab_size)
            latency.run_batch(llm, prompts, args.new_tokens)  # compile
            timed = run_phased(llm, prompts, args.new_tokens)
            decodes = timed.decode_steps(batch)
            phases = {name: 1e3 * statistics.median(s.phases.get(name, 0.0) for s in decodes)
                      for name in ("schedule", "launch", "fetch_wait", "resolve")}
            call = latency.decode_call(timed, batch)
            raw = latency.raw_step_seconds(llm.engine.runner, call, 50)
            figures[batch] = dict(engine_step_ms=1e3 * statistics.median(s.seconds for s in decodes),
                                  raw_step_ms=1e3 * raw,
                                  **enqueue_and_latency(llm.engine.runner, call),
                                  **{f"{k}_ms": v for k, v in phases.items()})
            print(variant, batch, {k: round(v, 3) for k, v in figures[batch].items()}, flush=True)
        result["variants"][variant] = figures
        del llm, model
    if args.out:
        common.write_json(result, args.out, "step_variants")
    return result


if __name__ == "__main__":
    main()
