"""Interleaved A/B of per-executable XLA options on one tensor-parallel decode step.

  PYTHONPATH=. python bench/xla_options_ab.py --model llama3-8b --tp 1,2 --tokens 4 \\
      --out bench/results/xla_options_ab.json

Each variant is the same jitted step compiled with `.lower(...).compile(compiler_options=...)` in one
process, and the variants are timed round-robin (7 rounds x 20 steps, median), so a host whose speed
drifts between runs (the TP-2 batch-1 step is bound by the host launch) cannot favour the one timed
first. `--variants` takes a JSON object {name: {xla option: value}}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (KINDS.md)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common, multi_gpu as mg  # noqa: E402
from jpaged import sharding  # noqa: E402

DEFAULT_VARIANTS = {
    "default": {},
    "exclusive": {"xla_gpu_require_exclusive_lock": True},
    "minsize1_exclusive": {"xla_gpu_graph_min_graph_size": 1, "xla_gpu_require_exclusive_lock": True},
    "minsize1": {"xla_gpu_graph_min_graph_size": 1},
}


def compare(model_name: str, tp: int, num_tokens: int, variants: dict, backend: str, context: int,
            rounds: int = 7, steps: int = 20) -> list[dict]:
    cfg = mg.load_config(model_name)
    mesh = sharding.make_mesh(tp)
    model, weights, step_fn = mg.random_decode(cfg, mesh, jnp.bfloat16, backend)
    step_fn = jax.jit(step_fn, donate_argnums=(1,))
    compiled, held = {}, {}
    for name, options in variants.items():
        cache = sharding.new_kv_cache(sharding.kv_cache_spec(model, mesh, mg.PAGE), mesh, -(-context // mg.PAGE))
        step = sharding.replicate(mg.decode_step_input(1, context, num_tokens), mesh)
        with jax.set_mesh(mesh):
            compiled[name] = step_fn.lower(weights, cache, step).compile(compiler_options=options or None)
        held[name] = [step, cache]

    def run(name, n):
        for _ in range(n):
            held[name][0], held[name][1], logits = compiled[name](weights, held[name][1], held[name][0])
        return logits

    for name in compiled:
        jax.block_until_ready(run(name, 5))
    times = {name: [] for name in compiled}
    for _ in range(rounds):
        for name in compiled:
            start = time.perf_counter()
            jax.block_until_ready(run(name, steps))
            times[name].append(1e3 * (time.perf_counter() - start) / steps)
    rows = [dict(model=model_name, tp=tp, batch=1, num_tokens=num_tokens, variant=name, options=variants[name],
                 ms_median=float(np.median(t)), ms_rounds=t) for name, t in times.items()]
    for row in rows:
        print(f"tp {tp} {row['variant']:<20} {row['ms_median']:.3f} ms  {row['options']}", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama3-8b", help="configs/ preset")
    p.add_argument("--tp", default="1,2")
    p.add_argument("--tokens", type=int, default=4, help="tokens (and sequence slots) the batch-1 step is padded to")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--backend", "--attn-impl", dest="backend", default="mosaic")
    p.add_argument("--variants", type=json.loads, default=DEFAULT_VARIANTS)
    p.add_argument("--out", default="bench/results/xla_options_ab.json")
    args = p.parse_args(argv)
    rows = []
    for tp in (int(t) for t in args.tp.split(",")):
        rows += compare(args.model, tp, args.tokens, args.variants, args.backend, args.context)
    result = dict(bench="xla_options_ab", command="python " + " ".join(sys.argv), device=jax.devices()[0].device_kind,
                  num_devices=jax.device_count(), jax=jax.__version__, rows=rows)
    print(f"wrote {common.write_json(result, args.out, 'xla_options_ab')}")


if __name__ == "__main__":
    main()
