"""The Mosaic GPU GEMM (pallas_kernels/matmul_mgpu.py) on the device: checked against its jnp reference,
then timed at the Llama-3-8B MLP and attention projections beside XLA, JAX's own Hopper Mosaic matmul
(`jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu`, best of a few configs) and torch.matmul.

    PYTHONPATH=. python bench/matmul_mgpu.py [--rows 256,512,1024,2048] [--out bench/results/X.json]

"swiglu" rows time the whole of h = silu(gate) * up: the fused kernel against XLA's GEMM into [M, 2F]
plus its SwiGLU fusion (what the model ran before), and against torch's matmul + silu * up.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU in this process

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench import common  # noqa: E402
from bench.kernels import timeit, torch_time  # noqa: E402
from pallas_kernels import matmul_mgpu as mm  # noqa: E402

HIDDEN, FFN, Q_COLS, KV_COLS = 4096, 14336, 4096, 1024
# name: (K, N, epilogue)
SHAPES = {
    "gate_up+swiglu": (HIDDEN, 2 * FFN, "swiglu"),
    "qkv": (HIDDEN, Q_COLS + 2 * KV_COLS, "none"),
    "o": (Q_COLS, HIDDEN, "none"),
    "down": (FFN, HIDDEN, "none"),
}


def xla_fn(epilogue):
    if epilogue == "swiglu":
        return jax.jit(lambda x, w: mm.swiglu(*mm.split_gate_up(x @ w)))
    return jax.jit(lambda x, w: x @ w)


def jax_hopper_best(x, w):
    """(seconds, config name) of JAX's Hopper matmul, best of its configs that compile; None if none do."""
    try:
        from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm
    except ImportError:
        return None
    d = hm.MatmulDimension
    best = None
    # The two best of a 32-config sweep at M = 2,048, N = 28,672 (session 7).
    for tile_n, wg_dim, minor, width, cluster in ((128, d.N, d.M, 8, d.M), (128, d.M, d.M, 8, None)):
        cfg = hm.TuningConfig(tile_m=128, tile_n=tile_n, tile_k=64, max_concurrent_steps=4, epi_tile_n=64,
                              epi_tile_m=64, grid_minor_dim=minor, grid_tile_width=width, wg_dimension=wg_dim,
                              cluster_dimension=cluster)
        try:
            fn = jax.jit(functools.partial(hm.matmul, c=None, config=cfg))
            t = timeit(fn, x, w, reps=10, rounds=5)
        except Exception:  # noqa: BLE001 - configs that do not fit these shapes
            continue
        if best is None or t < best[0]:
            best = (t, f"wg{wg_dim}_minor{minor}_w{width}_cl{cluster}")
    return best


def torch_baseline(m, k, n, epilogue):
    import torch
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(k, n, device="cuda", dtype=torch.bfloat16) * 0.02
    if epilogue == "swiglu":
        def fn():
            y = x @ w
            return torch.nn.functional.silu(y[:, : n // 2]) * y[:, n // 2:]
    else:
        def fn():
            return x @ w
    return torch_time(fn)


def check(rows) -> list[dict]:
    out = []
    key = jax.random.key(0)
    for m in rows:
        for name, (k, n, epilogue) in SHAPES.items():
            kx, kw = jax.random.split(jax.random.fold_in(key, m * 7 + len(name)))
            x = jax.random.normal(kx, (m, k), jnp.bfloat16)
            w = (jax.random.normal(kw, (k, n), jnp.float32) * k ** -0.5).astype(jnp.bfloat16)
            got = mm.matmul_mgpu(x, w, epilogue=epilogue).astype(jnp.float32)
            ref = mm.matmul_reference(x, w, epilogue=epilogue).astype(jnp.float32)
            err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
            row = dict(m=m, shape=name, rel_err=err, ok=err < 1e-2 and bool(jnp.isfinite(got).all()))
            print(f"check M={m:5d} {name:15s} rel err {err:.2e} {'ok' if row['ok'] else 'FAIL'}", flush=True)
            out.append(row)
    return out


VARIANTS = {
    "persistent": mm.MatmulConfig(),                         # one CTA per SM, as many stages as fit
    "persistent_s3": mm.MatmulConfig(num_stages=3),
    "one_tile_per_cta": mm.MatmulConfig(max_ctas=1 << 30),   # session 7's first version
}


def bench(rows, variants, with_torch: bool, with_jax_hopper: bool) -> list[dict]:
    out = []
    for m in rows:
        for name, (k, n, epilogue) in SHAPES.items():
            x = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)
            w = jax.random.normal(jax.random.key(2), (k, n), jnp.bfloat16) * 0.02
            flop = 2 * m * k * n
            row = dict(m=m, shape=name, k=k, n=n, epilogue=epilogue, gflop=flop / 1e9)
            row["xla_us"] = timeit(xla_fn(epilogue), x, w) * 1e6
            for variant in variants:
                fn = jax.jit(functools.partial(mm.matmul_mgpu, epilogue=epilogue, config=VARIANTS[variant]))
                row[f"mosaic_{variant}_us"] = timeit(fn, x, w) * 1e6
            row["mosaic_us"] = row[f"mosaic_{variants[0]}_us"]
            row["mosaic_variant"] = variants[0]
            if with_jax_hopper and m >= 1024:  # its GEMM alone (no SwiGLU)
                hop = jax_hopper_best(x, w)
                if hop:
                    row["jax_hopper_us"], row["jax_hopper_config"] = hop[0] * 1e6, hop[1]
            if with_torch:
                row["torch_us"] = torch_baseline(m, k, n, epilogue) * 1e6
            for key in [k_ for k_ in row if k_.endswith("_us")]:
                row[key.replace("_us", "_tflops")] = flop / row[key] / 1e6
            row["mosaic_vs_xla"] = row["xla_us"] / row["mosaic_us"]
            print(f"M={m:5d} {name:15s} xla {row['xla_us']:8.1f} us  mosaic {row['mosaic_us']:8.1f} us "
                  f"({row['mosaic_tflops']:.0f} TFLOP/s, x{row['mosaic_vs_xla']:.2f}) "
                  + " ".join(f"{v} {row[f'mosaic_{v}_us']:.1f}" for v in variants[1:])
                  + (f"  jax hopper {row['jax_hopper_us']:.1f}" if "jax_hopper_us" in row else "")
                  + (f"  torch {row['torch_us']:.1f}" if "torch_us" in row else ""), flush=True)
            out.append(row)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="256,512,1024,2048", help="M values (multiples of 256)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"kernel configs to time, the first one reported as 'mosaic': {','.join(VARIANTS)}")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--no-jax-hopper", action="store_true")
    p.add_argument("--out")
    args = p.parse_args(argv)
    rows = [int(r) for r in args.rows.split(",")]
    result = dict(bench="matmul_mgpu", command=common.command_line(argv, "bench/matmul_mgpu.py"),
                  device=common.device_info())
    result["checks"] = check(rows)
    variants = args.variants.split(",")
    if not variants or any(v not in VARIANTS for v in variants):
        raise ValueError(f"--variants must be a comma-separated subset of {','.join(VARIANTS)}")
    result["variants"] = {v: str(VARIANTS[v]) for v in variants}
    result["rows"] = bench(rows, variants, not args.no_torch, not args.no_jax_hopper)
    common.write_json(result, args.out, "matmul_mgpu")
    return 0 if all(c["ok"] for c in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
