"""bf16 GEMM time at the Llama-3-8B decode step's shapes (M rows x the layer's four weights), to compare XLA
GEMM settings (XLA_FLAGS from the environment) and machines.

    PYTHONPATH=. python bench/gemm_rates.py OUT.json
    XLA_FLAGS=--xla_gpu_enable_triton_gemm=false PYTHONPATH=. python bench/gemm_rates.py OUT.json

Each GEMM runs 20 times in one jitted fori_loop (device time per call, but each iteration also runs two
small elementwise kernels: the figures are upper bounds, ~10-15 us above the GEMM alone; the profiler
trace of the engine's step is the reference for the GEMMs themselves, bench/README.md).
fused: the input comes from an elementwise op XLA may fuse into the GEMM (as RMSNorm -> q/k/v does);
barrier: an optimization_barrier keeps them apart."""
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

WEIGHTS = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
res = {}
for m in (64, 256, 512):
    for mode in ("fused", "barrier"):
        total = 0.0
        for name, (k, n) in WEIGHTS.items():
            a = jnp.ones((m, k), jnp.bfloat16); b = jnp.ones((k, n), jnp.bfloat16) * 0.01
            def run(a, b, mode=mode):
                def body(i, acc):
                    x = a * (1 + i).astype(a.dtype)
                    if mode == "barrier":
                        x = jax.lax.optimization_barrier(x)
                    return acc + x @ b
                return jax.lax.fori_loop(0, 20, body, jnp.zeros((m, n), jnp.bfloat16))
            run = jax.jit(run)
            jax.block_until_ready(run(a, b))
            ts = []
            for _ in range(5):
                t = time.perf_counter(); jax.block_until_ready(run(a, b)); ts.append((time.perf_counter() - t) / 20)
            us = statistics.median(ts) * 1e6
            total += us
            res[f"{mode}_M{m}_{name}"] = dict(us=us, tflops=2 * m * n * k / us / 1e6, weight_tbps=k * n * 2 / us / 1e6)
        res[f"{mode}_M{m}_layer_us"] = total
        print(f"{os.environ.get('XLA_FLAGS', 'default')} {mode} M={m}: layer {total:.1f} us "
              + " ".join(f"{n}={res[f'{mode}_M{m}_{n}']['us']:.1f}" for n in WEIGHTS), flush=True)
json.dump(dict(command="python bench/gemm_rates.py " + sys.argv[1], xla_flags=os.environ.get("XLA_FLAGS", ""), jax=jax.__version__, device=str(jax.devices()[0]), res=res),
          open(sys.argv[1], "w"), indent=1)
