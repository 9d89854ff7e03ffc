"""The narrow (persistent, swap-AB) Mosaic GPU decode kernel on the GPU: checked, timed on k SMs, and timed
beside a GEMM on the other SMs (the overlap it exists for).

    PYTHONPATH=. python bench/decode_narrow.py [--out DIR] [--tag _h200_v1] [--only check,decode,overlap]
        [--ctas 16,24,32,66,132] [--shapes 373x640,373x640p64] [--variants 16:5:stream,16:3:full:128]
        [--check-ctas all,16,3] [--overlap-ctas 16,24,32] [--xla-concurrent] [--interpret]

Sections:
- check: `paged_decode_narrow` against the f32 jnp reference on NaN-poisoned pools (bench/decode_mgpu.py's
  cases that the kernel supports), at one CTA per SM and at 16 and 3 CTAs (many items per CTA).
- decode: KV TB/s at B x ctx shapes (the engine's mixed step: 373 x 640) of the narrow kernel at each
  `--ctas` count, beside the Triton decode path and `paged_decode_mgpu` on every SM; chained timer
  (bench/kernels.py) up to 256k tokens, wall clock above.
- overlap: 6 "layers", each a SwiGLU GEMM [1792 x 4096] x [4096 x 28672] (`matmul_mgpu`, the mixed step's
  gate/up) and the decode attention of 373 x 640, the two independent inside a layer and chained across
  layers. Serial: GEMM on every SM, then the Triton decode kernel. Overlapped: GEMM on 132 - k CTAs beside
  the narrow kernel on k. XLA's command-buffer scheduling mode decides whether independent kernels run at
  once: run the section under `--xla-concurrent` (sets
  `--xla_gpu_command_buffer_scheduling_mode=CONCURRENT` before the backend starts) and without it.
Prints as it goes, writes JSON after each row.
"""
from __future__ import annotations

import os
import sys

if "--xla-concurrent" in sys.argv:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_gpu_command_buffer_scheduling_mode=CONCURRENT").strip()
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import functools
import math
import time
import traceback

import jax
import jax.numpy as jnp

from bench import kernels as kernels_bench
from bench.decode_mgpu import CHECKS, TINY_CHECKS
from bench.kernels_mgpu import check_case, compare, open_result, paged_batch
from pallas_kernels import matmul_mgpu
from pallas_kernels.paged_decode_mgpu import choose_config, paged_decode_mgpu
from pallas_kernels.paged_decode_narrow_mgpu import NarrowDecodeConfig, paged_decode_narrow, unsupported_reason
from pallas_kernels.ragged_paged_attention_kernel import ragged_paged_attention_pallas

HQ, HKV, D, PAGE = 32, 8, 128, 16
SHAPES = ((373, 640), (256, 512), (256, 1024), (64, 2048), (16, 8192))
CHAIN_MAX_TOKENS = 256 * 1024
VARIANTS = ()   # --variants: (ctas, stages, probe) ablations of the narrow kernel in the decode section
INTERPRET = False


def run_checks(result, save, ctas_list, pipes: int = 1) -> None:
    result["checks"] = []
    cases = TINY_CHECKS if INTERPRET else CHECKS
    for i, (name, q_lens, kv_lens, kw, _) in enumerate(cases):
        args = paged_batch(100 + i, list(q_lens), list(kv_lens), **kw)
        if (reason := unsupported_reason(args[0], args[1], args[4])) is not None:
            result["checks"].append(dict(case=name, skipped=reason))
            print(f"check {name:42s} skipped: {reason}", flush=True)
            continue
        for ctas in ctas_list:
            config = NarrowDecodeConfig(num_ctas=ctas, num_pipes=pipes, num_stages=5 if pipes == 1 else 2)
            row = dict(case=f"{name} [{ctas or 'all'} ctas]", config=str(config))
            kernel = functools.partial(paged_decode_narrow, config=config, interpret=INTERPRET)
            result["checks"].append(check_case(row, args, kernel, width=50))
            save()
    result["checks_ok"] = all(r.get("ok", True) for r in result["checks"])
    save()


def _time(fn, args, tokens):
    if INTERPRET:
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        return time.perf_counter() - t, "once"
    if tokens <= CHAIN_MAX_TOKENS:
        return kernels_bench.chain_time(fn, *args), "chain"
    return kernels_bench.timeit(fn, *args), "wall"


def bench_decode(result, save, shapes, ctas_list) -> None:
    result["decode"] = []
    key = jax.random.key(0)
    for batch, ctx, *page in shapes:
        page = page[0] if page else PAGE
        key, sub = jax.random.split(key)
        args = kernels_bench.paged_batch(sub, [1] * batch, [ctx] * batch, num_pages_extra=0, poison=False,
                                         page=page)
        _, _, _, _, table, _, _ = args
        kv_bytes = 2 * batch * ctx * HKV * D * 2
        sm_scale = 1 / math.sqrt(D)
        row = dict(batch=batch, ctx=ctx, page_size=page, kv_bytes=kv_bytes)
        impls = [("triton", functools.partial(ragged_paged_attention_pallas, sm_scale=sm_scale)),
                 ("mosaic", functools.partial(paged_decode_mgpu, sm_scale=sm_scale,
                                              config=choose_config(batch, batch, table.shape[1], HQ, HKV, page)))]
        impls += [(f"narrow{c}", functools.partial(paged_decode_narrow, sm_scale=sm_scale,
                                                   config=NarrowDecodeConfig(num_ctas=c))) for c in ctas_list]
        for c, stages, probe, block_kv, pipes in VARIANTS:
            impls.append((f"narrow{c}_s{stages}_kv{block_kv}_p{pipes}_{probe}", functools.partial(
                paged_decode_narrow, sm_scale=sm_scale, config=NarrowDecodeConfig(
                    num_ctas=c, num_stages=stages, probe=probe, block_kv=block_kv, num_pipes=pipes))))
        ref = None
        for name, fn in impls:
            fn = jax.jit(functools.partial(fn, interpret=INTERPRET))
            try:
                out = jax.block_until_ready(fn(*args))
                if ref is None:
                    ref = out
                elif not name.endswith("_stream"):
                    row[f"{name}_vs_triton_rel_err"] = compare(out, ref, batch)["rel_err"]
                t, timer = _time(fn, args, batch * ctx)
                row.update({f"{name}_us": t * 1e6, f"{name}_tbps": kv_bytes / t / 1e12, "timer": timer})
            except Exception as e:
                traceback.print_exc()
                row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:800]}"
        print(f"decode {batch}x{ctx} page {page} ({row.get('timer')}): " + " ".join(
            f"{k[:-5]}={v:.2f}" for k, v in row.items() if k.endswith("_tbps")), flush=True)
        result["decode"].append(row)
        save()


def bench_overlap(result, save, ctas_list, layers: int = 6, m: int = 1792, batch: int = 373, ctx: int = 640):
    key = jax.random.key(1)
    hidden, inter = (256, 512) if INTERPRET else (4096, 28672)
    if INTERPRET:
        m, batch, ctx = 128, 3, 40
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (m, hidden), jnp.bfloat16)
    w = (jax.random.normal(kw, (hidden, inter), jnp.bfloat16) * 0.02).astype(jnp.bfloat16)
    args = kernels_bench.paged_batch(key, [1] * batch, [ctx] * batch, num_pages_extra=0, poison=False)
    q, rest = args[0], args[1:]
    sm_scale = 1 / math.sqrt(D)

    def chain(gemm, attn):
        def f(x, q, *rest):
            for _ in range(layers):
                y = gemm(x)
                a = attn(q, *rest)
                x = x + y[:, :hidden] * 1e-3
                q = (q + a * 1e-3).astype(q.dtype)
            return x, q
        return jax.jit(f)

    gemm_flops = 2 * m * hidden * inter
    kv_bytes = 2 * batch * ctx * HKV * D * 2
    rows = result.setdefault("overlap", [])
    mode = "CONCURRENT" if "--xla-concurrent" in sys.argv else "default (LHS)"
    triton = functools.partial(ragged_paged_attention_pallas, sm_scale=sm_scale)
    variants = [("serial: gemm 132 + triton", None, triton), ("gemm alone, 132", None, None)]
    for c in ctas_list:
        narrow = functools.partial(paged_decode_narrow, sm_scale=sm_scale, config=NarrowDecodeConfig(num_ctas=c))
        variants += [(f"gemm {132 - c} || narrow {c}", 132 - c, narrow), (f"narrow {c} alone", -1, narrow),
                     (f"gemm {132 - c} alone", 132 - c, None)]
    for name, gemm_ctas, attn in variants:
        if gemm_ctas == -1:       # attention alone: a no-op in the GEMM's place
            gemm = lambda x: x
        else:
            gemm = functools.partial(matmul_mgpu.matmul_mgpu, w=w, epilogue="swiglu", interpret=INTERPRET,
                                     config=matmul_mgpu.MatmulConfig(max_ctas=gemm_ctas))
        att = (lambda q, *r: jnp.zeros_like(q)) if attn is None else functools.partial(attn, interpret=INTERPRET)
        fn = chain(gemm, att)
        row = dict(mode=mode, variant=name, layers=layers, m=m, batch=batch, ctx=ctx)
        try:
            t = kernels_bench.timeit(fn, x, q, *rest, reps=5, rounds=7) if not INTERPRET else 0.0
            t = max(t, 1e-12)
            row.update(us_per_layer=t / layers * 1e6, gemm_tflops_if_alone=gemm_flops * layers / t / 1e12,
                       kv_tbps_if_alone=kv_bytes * layers / t / 1e12)
        except Exception as e:
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {str(e)[:800]}"
        print(f"overlap [{mode}] {name:30s} " + (f"{row['us_per_layer']:.1f} us/layer" if "us_per_layer" in row
                                                 else row.get("error", "")[:300]), flush=True)
        rows.append(row)
        save()


def main() -> int:
    global INTERPRET
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    parser.add_argument("--only", default="check,decode,overlap")
    parser.add_argument("--tag", default="")
    parser.add_argument("--ctas", default="16,24,32,66,132")
    parser.add_argument("--overlap-ctas", default="16,24,32")
    parser.add_argument("--variants", default="",
                        help="decode: ablations ctas:stages:probe[:block_kv[:pipes]], e.g. 16:5:stream,16:3:full:128")
    parser.add_argument("--check-pipes", type=int, default=1,
                        help="num_pipes of the checks (2, with 2 stages each, is refused off the interpreter for now)")
    parser.add_argument("--check-ctas", default="all,16,3", help="CTA counts of the checks (all = one per SM)")
    parser.add_argument("--shapes", default="")
    parser.add_argument("--xla-concurrent", action="store_true", help="(read before jax starts; see above)")
    parser.add_argument("--interpret", action="store_true", help="a CPU dry run on tiny shapes")
    a = parser.parse_args()
    INTERPRET = a.interpret
    global VARIANTS
    VARIANTS = tuple((int(c), int(st), pr, int(rest[0]) if rest else 64, int(rest[1]) if len(rest) > 1 else 1)
                     for c, st, pr, *rest in (v.split(":") for v in a.variants.split(",") if v))
    ctas = [int(c) for c in a.ctas.split(",")]
    # B x ctx, optionally "pPAGE": 373x640p64
    shapes = ([tuple(int(v) for v in s.replace("p", "x").split("x")) for s in a.shapes.split(",")]
              if a.shapes else SHAPES)
    if INTERPRET:
        ctas, shapes = [2], [(3, 70), (2, 70, 32)]
    device = jax.devices()[0]
    os.makedirs(a.out, exist_ok=True)
    result, save = open_result(os.path.join(a.out, f"decode_narrow{a.tag}.json"), device)
    only = a.only.split(",")
    if "check" in only:
        run_checks(result, save, [None if c == "all" else int(c) for c in a.check_ctas.split(",")]
                   if not INTERPRET else [2], pipes=a.check_pipes)
    if "decode" in only:
        bench_decode(result, save, shapes, ctas)
    if "overlap" in only:
        bench_overlap(result, save, [int(c) for c in a.overlap_ctas.split(",")] if not INTERPRET else [2])
    return 0 if result.get("checks_ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
