"""Where an engine run's time goes, printed as it happens: model build, each compile, prefill and decode
steps, at batch 1 and a larger batch. A diagnostic to run first on a new device or model shape.

  PYTHONPATH=. python -m bench.step_timing --model llama3-8b --batch 64
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from bench import common


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed_steps(engine, label: str) -> dict:
    """Steps until done; returns per-step wall times split by compile (a new shape) or not."""
    times, compiles = [], []
    while engine.has_unfinished():
        before = engine.runner.num_compilations
        start = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - start
        if engine.runner.num_compilations != before:
            compiles.append(dt)
            log(f"{label}: step compiled a new shape in {dt:.1f} s")
        else:
            times.append(dt)
    return dict(steps=len(times), median_ms=1e3 * float(np.median(times)) if times else None,
                compile_s=compiles)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    common.add_backend_flag(p)
    p.add_argument("--out")
    args = p.parse_args(argv)
    import jax

    from jpaged.sampling_params import SamplingParams

    log(f"jax {jax.__version__} on {jax.devices()}")
    cfg = common.model_config(args.model)
    start = time.perf_counter()
    model = common.random_model(cfg, "bfloat16")
    jax.block_until_ready(jax.tree.leaves(model))
    log(f"built {args.model} in {time.perf_counter() - start:.1f} s")
    llm = common.make_llm(model, "bfloat16", max_model_len=args.prompt_len + args.new_tokens + 16,
                          max_num_seqs=max(args.batch, 1), max_num_batched_tokens=512,
                          enable_prefix_caching=False, backend=args.backend)
    engine = llm.engine
    log(f"engine: backend {engine.runner.backend.describe()}, {engine.runner.num_pages} pages")
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    result = dict(model=args.model, device=str(jax.devices()[0].device_kind), jax=jax.__version__,
                  backend=engine.runner.backend.describe())
    for batch in (1, args.batch):
        for i in range(batch):
            engine.add_request(f"b{batch}-{i}", rng.integers(0, cfg.vocab_size, args.prompt_len).tolist(), params)
        r = timed_steps(engine, f"batch {batch}")
        r["decode_tok_s"] = batch / (r["median_ms"] / 1e3) if r["median_ms"] else None
        log(f"batch {batch}: median step {r['median_ms']:.2f} ms over {r['steps']} steps, "
            f"{r['decode_tok_s']:.0f} tok/s")
        result[f"batch{batch}"] = r
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
