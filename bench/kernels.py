"""Check jpaged's paged-attention kernels against the reference on the GPU, then time them and the baselines.

    PYTHONPATH=. python bench/kernels.py [--out DIR] [--quick]

Baselines measured in the same run: JAX `pallas.ops.gpu.paged_attention` (best of several block
configs), JAX `decode_attention.gqa` (contiguous KV), PyTorch SDPA on contiguous KV, and for prefill
JAX `attention_mgpu` (fp16, contiguous) and PyTorch SDPA causal. Decode is reported as KV bytes read per
second, prefill as causal FLOP/s. Prints a table; writes JSON (device, versions, shapes, figures, command).
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU in this process

import argparse
import functools
import json
import math
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.kv_write import write_kv_reference
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention_kernel import (TuningConfig, choose_config,
                                                          ragged_paged_attention_pallas)

HQ, HKV, D, PAGE = 32, 8, 128, 16
DTYPE = jnp.bfloat16
COPY_TBPS = 3.0          # measured device copy ceiling (read + write), PERF_NOTES.md section 1
MATMUL_TFLOPS = 616.0    # bf16 matmul through XLA, same source
MAX_DECODE_TOKENS = 2 * 1024 * 1024   # B x ctx that fits three layouts of the pool beside each other


def timeit(fn, *args, reps: int = 20, rounds: int = 7) -> float:
    """Median over `rounds` of the mean time of `reps` back-to-back calls, in seconds."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / reps)
    return statistics.median(times)


def torch_time(fn, reps: int = 20, rounds: int = 7) -> float:
    import torch
    fn(); fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    return statistics.median(times)


def paged_batch(key, q_lens, kv_lens, num_pages_extra=64, dtype=DTYPE, page=PAGE, poison=True):
    """Random ragged batch over a shuffled page pool; pages no sequence uses hold NaN."""
    q_lens, kv_lens = np.asarray(q_lens), np.asarray(kv_lens)
    pages_needed = -(-kv_lens // page)
    pages_per_seq = int(pages_needed.max())
    num_pages = int(pages_needed.sum()) + num_pages_extra
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**30)))
    perm = rng.permutation(num_pages).astype(np.int32)
    table = np.zeros((len(q_lens), pages_per_seq), np.int32)
    offset = 0
    for s, n in enumerate(pages_needed):
        table[s, :n] = perm[offset:offset + n]
        offset += n
    kk, kv, kq = jax.random.split(key, 3)
    shape = (num_pages, page, HKV, D)
    k_pages = jax.random.normal(kk, shape, dtype)
    v_pages = jax.random.normal(kv, shape, dtype)
    if poison:
        unused = jnp.asarray(perm[offset:])
        k_pages = k_pages.at[unused].set(jnp.nan)
        v_pages = v_pages.at[unused].set(jnp.nan)
    q = jax.random.normal(kq, (int(q_lens.sum()), HQ, D), dtype)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    return (q, k_pages, v_pages, jnp.asarray(kv_lens, jnp.int32), jnp.asarray(table), jnp.asarray(cu),
            jnp.asarray(len(q_lens), jnp.int32))


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    if not np.isfinite(out).all():
        return float("nan")
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def check_correctness(key) -> list[dict]:
    """Each kernel path against the jnp reference on the device (bf16, NaN-poisoned pool)."""
    cases = [
        ("mixed prefill+decode", [37, 1, 1, 130, 1], [300, 45, 1000, 130, 17], {}),
        ("decode split-kv", [1] * 6, [5000, 17, 900, 2048, 33, 1], {}),
        ("decode window 256", [1] * 4, [5000, 700, 100, 3000], dict(sliding_window=256)),
        ("prefill window 100 + soft-cap", [200, 64], [700, 64], dict(sliding_window=100, soft_cap=30.0)),
    ]
    results = []
    for name, q_lens, kv_lens, kw in cases:
        key, sub = jax.random.split(key)
        args = paged_batch(sub, q_lens, kv_lens)
        out = ragged_paged_attention_pallas(*args, sm_scale=1 / math.sqrt(D), **kw)
        ref = ragged_paged_attention_reference(*args, sm_scale=1 / math.sqrt(D), **kw)
        err = rel_err(out, ref)
        results.append(dict(case=name, rel_err=err, ok=bool(err < 2e-2)))
        print(f"check {name:32s} rel_err={err:.2e} {'ok' if err < 2e-2 else 'FAIL'}", flush=True)
    return results


def jax_paged_attention_best(q, k_hm, v_hm, table, lengths):
    """JAX's Triton paged_attention over its head-major layout, best of a few block configs."""
    from jax.experimental.pallas.ops.gpu import paged_attention as jpa
    pages_per_seq = table.shape[1]
    best = None
    for ppcb, splits in ((8, 16), (16, 8), (4, 16), (8, 4), (16, 16)):
        if pages_per_seq % splits or (pages_per_seq // splits) % min(ppcb, pages_per_seq // splits):
            continue
        fn = jax.jit(functools.partial(jpa.paged_attention, pages_per_compute_block=ppcb, k_splits=splits))
        try:
            t = timeit(fn, q, k_hm, v_hm, table, lengths)
        except Exception as e:  # a config the kernel rejects (shared memory, shapes) is skipped
            print(f"  jax paged_attention ppcb={ppcb} k_splits={splits}: {type(e).__name__}", flush=True)
            continue
        if best is None or t < best[0]:
            best = (t, dict(pages_per_compute_block=ppcb, k_splits=splits))
    return best


def bench_decode(key, batch, ctx, window=None) -> dict:
    kv_lens = [ctx] * batch
    args = paged_batch(key, [1] * batch, kv_lens, num_pages_extra=0, poison=False)
    q, k_pages, v_pages, kv_lens_a, table, cu, num_seqs = args
    kv_read = min(ctx, window or ctx)
    kv_bytes = 2 * batch * kv_read * HKV * D * 2
    sm_scale = 1 / math.sqrt(D)
    fn = jax.jit(functools.partial(ragged_paged_attention_pallas, sm_scale=sm_scale, sliding_window=window))
    cfg = choose_config(batch, batch, table.shape[1], HQ, HKV, PAGE)
    row = dict(batch=batch, ctx=ctx, window=window, kv_bytes=kv_bytes, config=str(cfg))
    t = timeit(fn, *args)
    row.update(jpaged_us=t * 1e6, jpaged_tbps=kv_bytes / t / 1e12)
    if window is not None:
        return row
    for label, config in (("pages_per_block=8", dataclasses_replace(cfg, pages_per_block=8)),
                          ("splits_x2", dataclasses_replace(cfg, num_kv_splits=min(
                              2 * cfg.num_kv_splits, max(1, table.shape[1] // cfg.pages_per_block)))),
                          ("num_warps=8", dataclasses_replace(cfg, num_warps=8))):
        try:
            alt = timeit(jax.jit(functools.partial(ragged_paged_attention_pallas, sm_scale=sm_scale,
                                                   config=config)), *args)
            row[f"jpaged_tbps[{label}]"] = kv_bytes / alt / 1e12
        except Exception as e:
            row[f"jpaged_tbps[{label}]"] = f"{type(e).__name__}"
    # Baselines: the same KV in JAX paged_attention's head-major layout, and contiguous.
    k_hm, v_hm = jnp.moveaxis(k_pages, 2, 0), jnp.moveaxis(v_pages, 2, 0)
    best = jax_paged_attention_best(q, k_hm, v_hm, table, kv_lens_a)
    del k_hm, v_hm
    if best is not None:
        row.update(jax_paged_us=best[0] * 1e6, jax_paged_tbps=kv_bytes / best[0] / 1e12,
                   jax_paged_config=best[1])
    try:
        from jax.experimental.pallas.ops.gpu import decode_attention
        k_c = jax.random.normal(key, (batch, ctx, HKV, D), DTYPE)
        fn = jax.jit(functools.partial(decode_attention.gqa, sm_scale=sm_scale))
        t = timeit(fn, q, k_c, k_c)
        row.update(jax_gqa_us=t * 1e6, jax_gqa_tbps=kv_bytes / t / 1e12)
        del k_c
    except Exception as e:
        row["jax_gqa_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    try:
        import torch
        import torch.nn.functional as F
        qt = torch.randn(batch, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
        kt = torch.randn(batch, HKV, ctx, D, device="cuda", dtype=torch.bfloat16)
        vt = torch.randn(batch, HKV, ctx, D, device="cuda", dtype=torch.bfloat16)
        t = torch_time(lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True))
        row.update(torch_sdpa_us=t * 1e6, torch_sdpa_tbps=kv_bytes / t / 1e12)
        del qt, kt, vt
        torch.cuda.empty_cache()
    except Exception as e:
        row["torch_sdpa_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    for base in ("jax_paged", "jax_gqa", "torch_sdpa"):
        if f"{base}_us" in row:
            row[f"speedup_vs_{base}"] = row[f"{base}_us"] / row["jpaged_us"]
    return row


def dataclasses_replace(cfg, **kw):
    import dataclasses
    return dataclasses.replace(cfg, **kw)


def bench_prefill(key, batch=4, seq=4096) -> dict:
    args = paged_batch(key, [seq] * batch, [seq] * batch, num_pages_extra=0, poison=False)
    flops = 4 * batch * seq * seq * HQ * D / 2
    sm_scale = 1 / math.sqrt(D)
    row = dict(batch=batch, seq=seq, causal=True, flops=flops)
    t = timeit(jax.jit(functools.partial(ragged_paged_attention_pallas, sm_scale=sm_scale)), *args, reps=5)
    row.update(jpaged_ms=t * 1e3, jpaged_tflops=flops / t / 1e12)
    for bq, npg, warps, stages in ((32, 4, 8, 3), (32, 8, 8, 3), (16, 8, 4, 3), (16, 4, 4, 3)):
        cfg = TuningConfig(block_q=bq, pages_per_block=npg, num_warps=warps, num_stages=stages)
        try:
            t = timeit(jax.jit(functools.partial(ragged_paged_attention_pallas, sm_scale=sm_scale,
                                                 config=cfg)), *args, reps=5)
            row[f"jpaged_tflops[{bq},{npg},{warps},{stages}]"] = flops / t / 1e12
        except Exception as e:
            row[f"jpaged_tflops[{bq},{npg},{warps},{stages}]"] = type(e).__name__
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu as am
        q = jax.random.normal(key, (batch, seq, HQ, D), jnp.float16)
        k = jax.random.normal(key, (batch, seq, HKV, D), jnp.float16)
        best = None
        for block_kv in (128, 64):
            cfg = am.TuningConfig(block_q=64, block_kv=block_kv, max_concurrent_steps=2, causal=True)
            try:
                t = timeit(jax.jit(functools.partial(am.attention, config=cfg)), q, k, k, reps=5)
                best = t if best is None else min(best, t)
            except Exception as e:
                row[f"jax_attention_mgpu_error[{block_kv}]"] = f"{type(e).__name__}: {str(e)[:200]}"
        if best is not None:
            row.update(jax_attention_mgpu_ms=best * 1e3, jax_attention_mgpu_tflops=flops / best / 1e12)
    except Exception as e:
        row["jax_attention_mgpu_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    try:
        import torch
        import torch.nn.functional as F
        qt = torch.randn(batch, HQ, seq, D, device="cuda", dtype=torch.bfloat16)
        kt = torch.randn(batch, HKV, seq, D, device="cuda", dtype=torch.bfloat16)
        t = torch_time(lambda: F.scaled_dot_product_attention(qt, kt, kt, is_causal=True, enable_gqa=True),
                       reps=5)
        row.update(torch_sdpa_ms=t * 1e3, torch_sdpa_tflops=flops / t / 1e12)
        del qt, kt
    except Exception as e:
        row["torch_sdpa_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return row


def bench_mixed(key) -> dict:
    """64 decodes at ctx 2k + one 512-token prefill chunk (ending at 2k), against each part alone."""
    sm_scale = 1 / math.sqrt(D)
    fn = jax.jit(functools.partial(ragged_paged_attention_pallas, sm_scale=sm_scale))
    mixed = paged_batch(key, [1] * 64 + [512], [2048] * 65, num_pages_extra=0, poison=False)
    decode = paged_batch(key, [1] * 64, [2048] * 64, num_pages_extra=0, poison=False)
    prefill = paged_batch(key, [512], [2048], num_pages_extra=0, poison=False)
    row = {name: timeit(fn, *args) * 1e6 for name, args in
           (("mixed_us", mixed), ("decode_only_us", decode), ("prefill_only_us", prefill))}
    row["mixed_over_sum_of_parts"] = row["mixed_us"] / (row["decode_only_us"] + row["prefill_only_us"])
    return row


def bench_kv_write(key, num_tokens=256) -> list[dict]:
    """Step time of the donated in-place KV write must not grow with the pool."""
    fn = jax.jit(write_kv_reference, donate_argnums=(0, 1))
    rows = []
    for num_pages in (1024, 16384, 65536):
        shape = (num_pages, PAGE, HKV, D)
        k_pages, v_pages = jnp.zeros(shape, DTYPE), jnp.zeros(shape, DTYPE)
        k = jax.random.normal(key, (num_tokens, HKV, D), DTYPE)
        slots = jax.random.permutation(key, num_pages * PAGE)[:num_tokens].astype(jnp.int32)
        k_pages, v_pages = fn(k_pages, v_pages, k, k, slots)
        jax.block_until_ready(k_pages)
        times = []
        for _ in range(7):
            t = time.perf_counter()
            for _ in range(20):
                k_pages, v_pages = fn(k_pages, v_pages, k, k, slots)
            jax.block_until_ready(k_pages)
            times.append((time.perf_counter() - t) / 20)
        rows.append(dict(num_pages=num_pages, pool_bytes=2 * k_pages.size * 2, tokens=num_tokens,
                         us=statistics.median(times) * 1e6))
        print(f"kv_write pages={num_pages:6d} {rows[-1]['us']:.1f} us", flush=True)
        del k_pages, v_pages
    return rows


def decode_shapes(quick: bool):
    batches, ctxs = ((1, 64), (2048, 32768)) if quick else ((1, 16, 64, 256), (512, 2048, 8192, 32768))
    return [(b, c) for b in batches for c in ctxs if b * c <= MAX_DECODE_TOKENS]


def print_table(result: dict) -> None:
    print("\n== decode (KV TB/s; copy ceiling %.1f) ==" % COPY_TBPS)
    print(f"{'B':>4} {'ctx':>6} {'jpaged':>7} {'jaxPA':>7} {'gqa':>7} {'sdpa':>7} {'x jaxPA':>8} {'x sdpa':>7}")
    for r in result["decode"]:
        if "error" in r:
            print(f"{r['batch']:>4} {r['ctx']:>6} error {r['error'][:60]}")
            continue
        f = lambda k: f"{r[k]:7.2f}" if isinstance(r.get(k), float) else f"{'-':>7}"
        print(f"{r['batch']:>4} {r['ctx']:>6} {f('jpaged_tbps')} {f('jax_paged_tbps')} {f('jax_gqa_tbps')} "
              f"{f('torch_sdpa_tbps')} {r.get('speedup_vs_jax_paged', float('nan')):8.2f} "
              f"{r.get('speedup_vs_torch_sdpa', float('nan')):7.2f}")
    for key in ("window", "prefill", "mixed", "kv_write"):
        print(f"\n== {key} ==\n{json.dumps(result.get(key), indent=1, default=str)}")


def run(section: str, fn, *args):
    try:
        return fn(*args)
    except Exception as e:
        traceback.print_exc()
        return dict(error=f"{section}: {type(e).__name__}: {str(e)[:300]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    parser.add_argument("--quick", action="store_true", help="a few decode shapes only")
    parser.add_argument("--skip", default="", help="comma list of sections to skip: "
                        "decode,window,prefill,mixed,kv_write")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    key = jax.random.key(0)
    device = jax.devices()[0]
    result = dict(device=device.device_kind, platform=device.platform, jax=jax.__version__,
                  command=" ".join([sys.executable.rsplit("/", 1)[-1]] + sys.argv),
                  shapes=dict(q_heads=HQ, kv_heads=HKV, head_dim=D, page_size=PAGE, dtype="bfloat16"),
                  ceilings=dict(copy_tbps=COPY_TBPS, matmul_tflops=MATMUL_TFLOPS))
    try:
        import torch
        result["torch"] = torch.__version__
    except ImportError:
        result["torch"] = None
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"kernels_{device.platform}_{time.strftime('%Y%m%d_%H%M%S')}.json")

    def save():  # after every section, so a run cut short still leaves its numbers
        with open(path, "w") as f:
            json.dump(result, f, indent=1, default=str)

    result["checks"] = run("checks", check_correctness, key)
    save()
    if "decode" not in skip:
        result["decode"] = []
        for batch, ctx in decode_shapes(args.quick):
            key, sub = jax.random.split(key)
            row = run("decode", bench_decode, sub, batch, ctx)
            row.setdefault("batch", batch)
            row.setdefault("ctx", ctx)
            print(json.dumps(row, default=str), flush=True)
            result["decode"].append(row)
            save()
    if "window" not in skip:
        result["window"] = dict(windowed_32k=run("window", bench_decode, key, 16, 32768, 4096),
                                unwindowed_4k=run("window", bench_decode, key, 16, 4096))
        w = result["window"]
        if "jpaged_us" in w["windowed_32k"] and "jpaged_us" in w["unwindowed_4k"]:
            w["ratio"] = w["windowed_32k"]["jpaged_us"] / w["unwindowed_4k"]["jpaged_us"]
        save()
    if "prefill" not in skip:
        result["prefill"] = run("prefill", bench_prefill, key)
        save()
    if "mixed" not in skip:
        result["mixed"] = run("mixed", bench_mixed, key)
    if "kv_write" not in skip:
        result["kv_write"] = run("kv_write", bench_kv_write, key)
    save()
    print_table(result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
