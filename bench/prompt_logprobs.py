"""Prompt logprobs in the scheduled prefill: what scoring a long prompt costs, and how long it stalls others.

  PYTHONPATH=. python -m bench.prompt_logprobs --out bench/results/prompt_logprobs_h100.json   # Llama-3-8B shape
  PYTHONPATH=. python -m bench.prompt_logprobs --tiny --out /tmp/prompt_logprobs_tiny.json     # CPU check

While --streams (32) requests decode, one --prompt-len (3000) token prompt is added with max_tokens 1,
plain or with prompt_logprobs 5 (the same random length, fresh tokens each time, so nothing comes from
the prefix cache). Per variant, median of --reps (3): `prefill_s`, the time from adding the prompt to
its finished output, and `stall_s`, the longest engine step meanwhile (how long the decoding streams
wait between two tokens). The issue's targets: both ratios (scored / plain) <= 1.5. The engine first
compiles the "plain" and "score" step tiers (jpaged/engine/step_variants.py); `compilations` counts
any compilation inside the timed parts.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Sequence

import numpy as np

from bench import common

NAME = "prompt_logprobs"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_engine_flags(p, max_num_seqs=64)
    p.add_argument("--tiny", action="store_true", help="CPU check: tiny-llama, float32, short prompts")
    p.add_argument("--prompt-len", type=int, default=3000)
    p.add_argument("--streams", type=int, default=32, help="requests decoding meanwhile")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    if args.tiny:
        args.model, args.dtype, args.prompt_len, args.streams, args.reps = "tiny-llama", "float32", 200, 4, 2
        args.max_num_batched_tokens = 128
    return args


def timed_prompt(engine, prompt: list[int], params) -> dict:
    """Adds `prompt` and steps until it finishes; the decoding streams keep running meanwhile."""
    from jpaged import compilations

    before = compilations.count()
    start = time.perf_counter()
    engine.add_request("probe", prompt, params)
    longest, last = 0.0, start
    while True:
        outs = engine.step()
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
        if any(o.request_id == "probe" and o.finished for o in outs):
            break
    return dict(prefill_s=now - start, stall_s=longest, compilations=compilations.count() - before)


def main(argv: Sequence[str] | None = None) -> dict:
    from jpaged import compilations
    from jpaged.sampling_params import SamplingParams

    args = parse_args(argv)
    cfg = common.model_config(args.model)
    model = common.random_model(cfg, args.dtype)
    decode_len = 100_000  # the streams outlive the measurement; they are aborted at the end
    max_model_len = max(args.prompt_len + 8, 256)
    llm = common.make_llm(model, args.dtype, **common.engine_kwargs(args, max_model_len))
    engine = llm.engine
    compilations.install()
    start = time.perf_counter()
    engine.runner.warmup(("plain", "score"))  # the two tiers the timed steps run
    warmup_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    vocab = cfg.vocab_size
    for i in range(args.streams):
        engine.add_request(f"stream{i}", common.random_prompts(rng, [16], vocab)[0],
                           SamplingParams(temperature=0.0, ignore_eos=True,
                                          max_tokens=min(decode_len, max_model_len - 16)))
    for _ in range(4):
        engine.step()
    variants = {"plain": SamplingParams(temperature=0.0, max_tokens=1),
                "scored": SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=5)}
    runs = {name: [] for name in variants}
    for _ in range(args.reps):
        for name, params in variants.items():
            prompt = common.random_prompts(rng, [args.prompt_len], vocab)[0]
            runs[name].append(timed_prompt(engine, prompt, params))
    for i in range(args.streams):
        engine.abort(f"stream{i}")
    summary = {name: dict(prefill_s=statistics.median(r["prefill_s"] for r in rs),
                          stall_s=statistics.median(r["stall_s"] for r in rs),
                          compilations=sum(r["compilations"] for r in rs), runs=rs)
               for name, rs in runs.items()}
    result = dict(
        benchmark=NAME, command=common.command_line(argv, NAME), device=common.device_info(),
        model=args.model, model_shape=common.model_shape(cfg, args.dtype), warmup_s=warmup_s,
        engine=dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                    max_scored_prompt_tokens=engine.config.max_scored_prompt_tokens,
                    backend=common.backend_override(args)),
        workload=dict(prompt_len=args.prompt_len, streams=args.streams, reps=args.reps, prompt_logprobs=5),
        **summary,
        prefill_ratio=summary["scored"]["prefill_s"] / summary["plain"]["prefill_s"],
        stall_ratio=summary["scored"]["stall_s"] / summary["plain"]["stall_s"])
    common.print_table(f"prompt logprobs of a {args.prompt_len}-token prompt beside {args.streams} streams", [
        ("device", result["device"]["device_kind"]),
        ("plain prefill s", summary["plain"]["prefill_s"]), ("scored prefill s", summary["scored"]["prefill_s"]),
        ("prefill ratio (target <= 1.5)", result["prefill_ratio"]),
        ("plain longest step s", summary["plain"]["stall_s"]), ("scored longest step s", summary["scored"]["stall_s"]),
        ("stall ratio (target <= 1.5)", result["stall_ratio"]),
        ("compilations while timed", summary["plain"]["compilations"] + summary["scored"]["compilations"])])
    print(f"\nwrote {common.write_json(result, args.out, NAME)}")
    return result


if __name__ == "__main__":
    main()
