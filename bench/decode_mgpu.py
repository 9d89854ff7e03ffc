"""Check jpaged's Mosaic GPU paged decode kernel against the reference on the GPU, then time it beside our
Triton v4 decode path and PyTorch SDPA on contiguous KV.

    PYTHONPATH=. python bench/decode_mgpu.py [--out DIR] [--tag _h100_v1] [--only check,decode,sweep]
                                             [--shapes 16x512,256x1024] [--chain] [--interpret]

Sections (default: check,decode):
- check: the kernel (`paged_decode_mgpu`) against the f32 jnp reference on NaN-poisoned pools
  (unused pages and stale slots past each kv_len hold NaN, shuffled page tables with garbage entries
  past each sequence's pages, NaN padding tokens): q_len 0/1 mixes, a short chunk beside decodes,
  padding tokens with num_seqs < S, kv_lens off the page grid, GQA 1/2/3/4/8 and MQA, pages 8-64,
  head_dim 64, block_kv 128, 3-4 stages, forced splits (empty splits included), 1 x 32k (choose_config: 32 splits since session 4, 64 before).
  Passes when finite, padding rows exactly 0 and the relative Frobenius error < 2e-2.
- decode: B x ctx in {1,16,64,256} x {512,2k,8k,32k} with B * ctx <= 2M tokens (32 q / 8 kv heads,
  D 128, page 16, bf16): KV TB/s (2 * B * ctx * Hkv * D * 2 bytes / time, median over rounds) of
  the Mosaic kernel (choose_config), the Triton v4 path (`ragged_paged_attention_pallas`, its
  choose_config) and PyTorch SDPA on contiguous KV; the two kernels' outputs are compared at every shape.
  --chain adds the chained (device-time) timer of bench/kernels.py for B * ctx <= 128k.
- sweep: the Mosaic kernel's block_kv {64,128} x stages {2,3,4} x splits {choose/2, choose, 2*choose}
  at a few shapes (chained timer where B * ctx <= 128k, wall clock above).
--interpret: a CPU dry run of the whole script on tiny shapes (the kernels in their interpreters, no
torch), so that the script is known to run before device time is spent on it.
Prints as it goes; writes JSON after every check / row, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU in this process

import argparse
import dataclasses
import functools
import math
import sys
import time
import traceback

import jax
import numpy as np

from bench import kernels as kernels_bench
from bench.kernels_mgpu import check_case, compare, open_result, paged_batch
from pallas_kernels.paged_decode_mgpu import DecodeConfig, choose_config, paged_decode_mgpu
from pallas_kernels.ragged_paged_attention_kernel import ragged_paged_attention_pallas

HQ, HKV, D, PAGE = 32, 8, 128, 16
BATCHES, CONTEXTS = (1, 16, 64, 256), (512, 2048, 8192, 32768)
MAX_TOKENS = 2 * 1024 * 1024      # B x ctx: paged pool + torch's contiguous copy (~17 GB) fit beside each other
CHAIN_MAX_TOKENS = 128 * 1024
SWEEP_SHAPES = ((16, 512), (16, 8192), (64, 2048), (256, 512), (256, 2048), (1, 32768))
INTERPRET = False


def R(n, lo, hi, seed):
    return np.random.default_rng(seed).integers(lo, hi, n).tolist()


# name, q_lens, kv_lens, paged_batch kwargs, DecodeConfig overrides (None = choose_config)
CHECKS = [
    ("64 decodes, ctx 1..3000, p16 GQA 4", [1] * 64, R(64, 1, 3000, 0), {}, None),
    ("same, forced 4 splits", [1] * 64, R(64, 1, 3000, 0), {}, dict(num_kv_splits=4)),
    ("q_len 0/1 mix", [1, 0, 1, 1, 0, 1, 0, 0, 1, 1], R(10, 1, 900, 1), {}, None),
    ("chunk of 3 beside decodes (T <= S)", [3, 1, 1, 0, 1, 0, 0], [700, 1, 64, 5, 333, 0, 0], {}, None),
    ("padding tokens + num_seqs < S", [1] * 20, R(20, 1, 2000, 2), dict(pad_tokens=12, extra_slots=12), None),
    ("MHA 8/8, page 32", [1] * 9, R(9, 1, 1500, 3), dict(hq=8, page=32), None),
    ("GQA 2 (16/8), page 8", [1] * 9, R(9, 1, 700, 4), dict(hq=16, page=8), None),
    ("GQA 3 (24/8, rows off the 8-row grid)", [1] * 9, R(9, 1, 1500, 5), dict(hq=24), dict(num_kv_splits=2)),
    ("GQA 8 (64/8), page 64", [1] * 9, R(9, 1, 3000, 6), dict(hq=64, page=64), None),
    ("MQA (32/1)", [1] * 9, R(9, 1, 3000, 7), dict(hkv=1), None),
    ("head_dim 64", [1] * 9, R(9, 1, 3000, 8), dict(d=64), None),
    ("block_kv 128, 2 stages", [1] * 9, R(9, 1, 3000, 9), {}, dict(block_kv=128)),
    ("block_kv 64, 4 stages, 3 splits", [1] * 9, R(9, 1, 3000, 10), {}, dict(num_stages=4, num_kv_splits=3)),
    ("kv on the page grid (64, 1024)", [1] * 4, [64, 1024, 16, 2048], {}, None),
    ("1 x 32k (choose_config)", [1], [32768], {}, None),
]
TINY_CHECKS = [  # --interpret: a few CTAs each (the interpreter costs ~2.5 s per CTA)
    ("tiny: q_len 0/1 + padding, GQA 4, 1 kv head", [1, 0, 1], [40, 9, 70], dict(hq=4, hkv=1, d=64, pad_tokens=1), None),
    ("tiny: 2 splits, GQA 8, 1 kv head", [1, 1], [61, 130], dict(hq=8, hkv=1, d=64), dict(num_kv_splits=2)),
]


def run_checks(result: dict, save) -> None:
    result["checks"] = []
    for i, (name, q_lens, kv_lens, kw, overrides) in enumerate(TINY_CHECKS if INTERPRET else CHECKS):
        row = dict(case=name, q_lens=q_lens[:8], kv_lens=kv_lens[:8], **kw)
        try:
            args = paged_batch(100 + i, list(q_lens), list(kv_lens), **kw)
        except Exception as e:
            traceback.print_exc()
            result["checks"].append(dict(row, ok=False, error=f"{type(e).__name__}: {str(e)[:1500]}"))
            continue
        q, k, _, _, table, _, _ = args
        config = choose_config(q.shape[0], table.shape[0], table.shape[1], q.shape[1], k.shape[2], k.shape[1])
        if overrides:
            config = dataclasses.replace(config, **overrides)
        row["config"] = str(config)
        kernel = functools.partial(paged_decode_mgpu, config=config, interpret=INTERPRET)
        result["checks"].append(check_case(row, args, kernel, width=42))
        save()
    result["checks_ok"] = all(r.get("ok") for r in result["checks"])
    save()


def _timers(chain: bool):
    if INTERPRET:  # one call: the interpreter's time means nothing, the run only proves the script works
        def once(fn, *args, **_):
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            return time.perf_counter() - t
        return once, once
    return kernels_bench.timeit, kernels_bench.chain_time


def decode_row(key, batch, ctx, *, chain: bool) -> dict:
    timeit, chain_time = _timers(chain)
    args = kernels_bench.paged_batch(key, [1] * batch, [ctx] * batch, num_pages_extra=0, poison=False)
    q, k_pages, v_pages, kv_lens, table, cu, num_seqs = args
    kv_bytes = 2 * batch * ctx * HKV * D * 2
    sm_scale = 1 / math.sqrt(D)
    config = choose_config(batch, batch, table.shape[1], HQ, HKV, PAGE)
    row = dict(batch=batch, ctx=ctx, kv_bytes=kv_bytes, mosaic_config=str(config))
    impls = (("mosaic", jax.jit(functools.partial(paged_decode_mgpu, sm_scale=sm_scale, config=config,
                                                  interpret=INTERPRET))),
             ("triton", jax.jit(functools.partial(ragged_paged_attention_pallas, sm_scale=sm_scale,
                                                  interpret=INTERPRET))))
    outs = {}
    for name, fn in impls:
        try:
            t = time.perf_counter()
            outs[name] = jax.block_until_ready(fn(*args))
            t = time.perf_counter() - t           # --interpret: one call, compile included
            if not INTERPRET:
                t = timeit(fn, *args)
            row.update({f"{name}_us": t * 1e6, f"{name}_tbps": kv_bytes / t / 1e12})
            if chain and batch * ctx <= CHAIN_MAX_TOKENS and not INTERPRET:
                t = chain_time(fn, *args)
                row.update({f"{name}_chain_us": t * 1e6, f"{name}_chain_tbps": kv_bytes / t / 1e12})
        except Exception as e:
            traceback.print_exc()
            row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:600]}"
    if len(outs) == 2:
        row["mosaic_vs_triton"] = compare(outs["mosaic"], outs["triton"], batch)
        row["mosaic_out_norm"] = float(np.linalg.norm(np.asarray(outs["mosaic"], np.float32)))  # not all zeros
    del outs
    if not INTERPRET:
        try:
            import torch
            import torch.nn.functional as F
            qt = torch.randn(batch, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
            kt = torch.randn(batch, HKV, ctx, D, device="cuda", dtype=torch.bfloat16)
            vt = torch.randn(batch, HKV, ctx, D, device="cuda", dtype=torch.bfloat16)
            t = kernels_bench.torch_time(lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True))
            row.update(torch_sdpa_us=t * 1e6, torch_sdpa_tbps=kv_bytes / t / 1e12, torch=torch.__version__)
            del qt, kt, vt
            torch.cuda.empty_cache()
        except Exception as e:
            row["torch_sdpa_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    for base in ("triton", "torch_sdpa"):
        if f"{base}_us" in row and "mosaic_us" in row:
            row[f"mosaic_speedup_vs_{base}"] = row[f"{base}_us"] / row["mosaic_us"]
    return row


def bench_decode(result: dict, save, shapes, chain: bool) -> None:
    result["decode"] = []
    key = jax.random.key(0)
    for batch, ctx in shapes:
        key, sub = jax.random.split(key)
        try:
            row = decode_row(sub, batch, ctx, chain=chain)
        except Exception as e:
            traceback.print_exc()
            row = dict(batch=batch, ctx=ctx, error=f"{type(e).__name__}: {str(e)[:600]}")
        print(f"decode {batch}x{ctx}: " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                   for k, v in row.items() if k.endswith(("_tbps", "_us", "error"))),
              flush=True)
        result["decode"].append(row)
        save()


def bench_sweep(result: dict, save, shapes) -> None:
    result["sweep"] = []
    timeit, chain_time = _timers(True)
    key = jax.random.key(1)
    sm_scale = 1 / math.sqrt(D)
    for batch, ctx in shapes:
        key, sub = jax.random.split(key)
        args = kernels_bench.paged_batch(sub, [1] * batch, [ctx] * batch, num_pages_extra=0, poison=False)
        kv_bytes = 2 * batch * ctx * HKV * D * 2
        base = choose_config(batch, batch, args[4].shape[1], HQ, HKV, PAGE)
        use_chain = batch * ctx <= CHAIN_MAX_TOKENS and not INTERPRET
        row = dict(batch=batch, ctx=ctx, choose_config=str(base), timer="chain" if use_chain else "wall", tbps={})
        grid = [(block_kv, stages, splits) for block_kv in (64, 128) for stages in (2, 3, 4)
                for splits in sorted({max(1, base.num_kv_splits // 2), base.num_kv_splits, 2 * base.num_kv_splits})]
        if INTERPRET:   # the dry run proves the loop, not the numbers
            grid = grid[:1]
        for block_kv, stages, splits in grid:
            cfg = DecodeConfig(block_kv=block_kv, num_stages=stages, num_kv_splits=splits)
            label = f"kv{block_kv}_st{stages}_sp{splits}"
            try:
                fn = jax.jit(functools.partial(paged_decode_mgpu, sm_scale=sm_scale, config=cfg,
                                               interpret=INTERPRET))
                t = chain_time(fn, *args) if use_chain else timeit(fn, *args)
                row["tbps"][label] = kv_bytes / t / 1e12
            except NotImplementedError as e:   # SMEM limit
                row["tbps"][label] = f"unsupported: {e}"
            except Exception as e:
                row["tbps"][label] = f"{type(e).__name__}: {str(e)[:200]}"
        numbers = {k: v for k, v in row["tbps"].items() if isinstance(v, float)}
        if numbers:
            row["best"] = max(numbers, key=numbers.get)
        print(f"sweep {batch}x{ctx}: best {row.get('best')} "
              f"{numbers.get(row.get('best'), float('nan')):.3f} TB/s; {row['tbps']}", flush=True)
        result["sweep"].append(row)
        save()


def main() -> int:
    global INTERPRET
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    parser.add_argument("--only", default="check,decode", help="comma list: check,decode,sweep")
    parser.add_argument("--tag", default="", help="suffix of the JSON file name")
    parser.add_argument("--shapes", default=None, help="decode shapes, e.g. 16x512,256x1024")
    parser.add_argument("--sweep-shapes", default=None, help="sweep shapes (default: SWEEP_SHAPES)")
    parser.add_argument("--chain", action="store_true", help="also the chained (device-time) timer")
    parser.add_argument("--interpret", action="store_true", help="CPU dry run on tiny shapes")
    args = parser.parse_args()
    INTERPRET = args.interpret
    sections = set(args.only.split(","))
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    elif INTERPRET:
        shapes = [(1, 64), (2, 40)]
    else:
        shapes = [(b, c) for b in BATCHES for c in CONTEXTS if b * c <= MAX_TOKENS]
    sweep_shapes = [(1, 40)] if INTERPRET else SWEEP_SHAPES
    if args.sweep_shapes:
        sweep_shapes = [tuple(int(x) for x in s.split("x")) for s in args.sweep_shapes.split(",")]
    device = jax.devices()[0]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"decode_mgpu{args.tag}{'_interpret' if INTERPRET else ''}.json")
    result, save = open_result(path, device, interpret=INTERPRET, default_config=str(DecodeConfig()))
    if "check" in sections:
        run_checks(result, save)
    if "decode" in sections:
        bench_decode(result, save, shapes, args.chain)
    if "sweep" in sections:
        bench_sweep(result, save, sweep_shapes)
    save()
    print(f"wrote {path}")
    return 0 if result.get("checks_ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
