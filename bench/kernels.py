"""Check jpaged's paged-attention kernels against the reference on the GPU, then time them and the baselines.

    PYTHONPATH=. python bench/kernels.py [--out DIR] [--quick] [--only SECTIONS] [--skip SECTIONS]
                                         [--shapes 16x512,256x1024] [--chain] [--variants] [--gqa]

Sections (default: all but sweep): checks, decode, window, sweep, prefill, mixed,
kv_write. Baselines measured in the same run: JAX `pallas.ops.gpu.paged_attention` (best of several
block configs), PyTorch SDPA on contiguous KV (optional: JAX `decode_attention.gqa`, contiguous), and
for prefill JAX `attention_mgpu` (fp16, contiguous) and PyTorch SDPA causal. Decode is reported as KV bytes read per second, prefill as causal FLOP/s.

Two timers: `timeit` (wall clock over back-to-back jitted calls, as in v1-v3: includes the per-call
dispatch, which bounds small shapes) and, with --chain (always in sweep), `chain_time`: 16 calls
chained in one jitted fori_loop (each output is the next q), the way a model step calls attention once
per layer; it approximates the device time per call (work that depends only on the batch metadata is
loop-invariant, so XLA can hoist it, as it CSEs it across layers). Prints a table; writes JSON after every section.
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU in this process

import argparse
import dataclasses
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
from jax import lax

from pallas_kernels.kv_write import write_kv_pallas, write_kv_reference
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention_kernel import (TuningConfig, choose_config,
                                                          ragged_paged_attention_pallas)

HQ, HKV, D, PAGE = 32, 8, 128, 16
DTYPE = jnp.bfloat16
COPY_TBPS = 3.0          # an H100's copy ceiling (read + write), docs/performance.md "Copy and GEMM ceilings"; main() re-measures it
MATMUL_TFLOPS = 616.0    # bf16 matmul through XLA on the H100, same source (not re-measured)
MAX_DECODE_TOKENS = 2 * 1024 * 1024   # B x ctx that fits three layouts of the pool beside each other
CHAIN_LEN = 16
INTERPRET = False                     # --interpret: a CPU dry run of the script
CHAIN_MAX_TOKENS = 128 * 1024         # --chain times shapes up to this B x ctx (larger ones are device-bound)
SWEEP_SHAPES = ((16, 512), (16, 8192), (64, 512), (64, 2048), (128, 1024), (256, 512), (256, 1024),
                (256, 2048))
# JAX paged_attention (pages_per_compute_block, k_splits) candidates: the configs that won some shape in
# the v1-v3 runs ((16, 8) and (4, 16) never did); --all-jax-configs adds those two back.
JAX_PA_CONFIGS = ((8, 4), (8, 16), (16, 16))


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


def chain_time(fn, q, *rest, n: int = CHAIN_LEN, reps: int = 3, rounds: int = 5) -> float:
    """Device time per call: `n` calls in one jitted fori_loop, each output fed back as the next q.

    The trip count is static, so XLA runs the loop without a host round trip per iteration."""
    many = jax.jit(lambda q, *rest: lax.fori_loop(0, n, lambda i, x: fn(x, *rest).astype(x.dtype), q))
    return timeit(many, q, *rest, reps=reps, rounds=rounds) / n


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


def paged_batch(key, q_lens, kv_lens, num_pages_extra=64, dtype=DTYPE, page=PAGE, poison=True,
                pad_tokens=0, extra_slots=0, garbage_table=False):
    """Random ragged batch over a shuffled page pool; pages no sequence uses hold NaN.

    `pad_tokens` NaN rows follow the real tokens, `extra_slots` empty slots follow the real sequences
    (num_seqs stays the real count), and `garbage_table` fills entries past each sequence's pages with
    junk (some out of the pool) that a kernel must never dereference."""
    q_lens, kv_lens = np.asarray(q_lens), np.asarray(kv_lens)
    pages_needed = -(-kv_lens // page)
    pages_per_seq = int(pages_needed.max())
    num_pages = int(pages_needed.sum()) + num_pages_extra
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**30)))
    perm = rng.permutation(num_pages).astype(np.int32)
    num_slots = len(q_lens) + extra_slots
    if garbage_table:
        table = rng.integers(-3, 10**6, (num_slots, pages_per_seq)).astype(np.int32)
    else:
        table = np.zeros((num_slots, pages_per_seq), np.int32)
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
        for s, n in enumerate(kv_lens):  # stale slots past kv_len in the last page
            last, tail = divmod(int(n), page)
            if tail:
                k_pages = k_pages.at[table[s, last], tail:].set(jnp.nan)
                v_pages = v_pages.at[table[s, last], tail:].set(jnp.nan)
    num_real = int(q_lens.sum())
    q = jax.random.normal(kq, (num_real + pad_tokens, HQ, D), dtype)
    if pad_tokens:
        q = q.at[num_real:].set(jnp.nan)
    cu = np.concatenate([[0], np.cumsum(q_lens), [num_real] * extra_slots]).astype(np.int32)
    lens = np.concatenate([kv_lens, [0] * extra_slots]).astype(np.int32)
    return (q, k_pages, v_pages, jnp.asarray(lens), jnp.asarray(table), jnp.asarray(cu),
            jnp.asarray(len(q_lens), jnp.int32))


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    if not np.isfinite(out).all():
        return float("nan")
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def check_correctness(key) -> list[dict]:
    """Each kernel path against the jnp reference on the device (bf16, NaN-poisoned pool)."""
    rng = np.random.default_rng(7)
    engine_kv = rng.integers(1, 2000, 240).tolist()
    mix_q = [1, 0, 3, 1, 0, 1, 1, 2, 0, 1]
    mix_kv = [700, 0, 40, 1, 0, 333, 64, 1500, 0, 17]
    decode = lambda **kw: TuningConfig(block_q=1, **kw)
    cases = [  # name, q_lens, kv_lens, batch options, kernel kwargs
        ("mixed prefill+decode", [37, 1, 1, 130, 1], [300, 45, 1000, 130, 17], {}, {}),
        ("decode split-kv", [1] * 6, [5000, 17, 900, 2048, 33, 1], {}, {}),
        ("decode window 256", [1] * 4, [5000, 700, 100, 3000], {}, dict(sliding_window=256)),
        ("prefill window 100 + soft-cap", [200, 64], [700, 64], {}, dict(sliding_window=100, soft_cap=30.0)),
        ("engine decode 240 of 256 slots, 16 pad tokens", [1] * 240, engine_kv,
         dict(pad_tokens=16, extra_slots=16, garbage_table=True), {}),
        ("decode q_len 0/1/2/3 mix, T <= S, 3 pad tokens", mix_q, mix_kv,
         dict(pad_tokens=3, extra_slots=4, garbage_table=True), {}),
        ("decode split 3 (padded to 4) window 300 soft-cap", [1] * 5, [4000, 250, 1, 999, 2100],
         dict(garbage_table=True), dict(sliding_window=300, soft_cap=20.0,
                                        config=decode(pages_per_block=4, num_kv_splits=3))),
        ("decode page 64, 2 pages (128 tokens)/block, 2 splits", [1] * 7, [3000, 64, 65, 1, 700, 128, 2500],
         dict(page=64, garbage_table=True), dict(config=decode(pages_per_block=2, num_kv_splits=2))),
    ]
    results = []
    for name, q_lens, kv_lens, batch_kw, kw in cases:
        key, sub = jax.random.split(key)
        args = paged_batch(sub, q_lens, kv_lens, **batch_kw)
        q, k, v, lens, table, cu, ns = args
        out = ragged_paged_attention_pallas(*args, sm_scale=1 / math.sqrt(D), **kw)
        kw.pop("config", None)
        safe = jnp.clip(table, 0, k.shape[0] - 1)  # the reference gathers every entry
        ref = jax.jit(functools.partial(ragged_paged_attention_reference, sm_scale=1 / math.sqrt(D), **kw))(
            jnp.nan_to_num(q), k, v, lens, safe, cu, ns)
        real = int(sum(q_lens))
        err = rel_err(out[:real], ref[:real])
        pad_zero = bool((np.asarray(out[real:], np.float32) == 0).all())
        ok = bool(err < 2e-2 and pad_zero)
        results.append(dict(case=name, rel_err=err, padding_rows_zero=pad_zero, ok=ok))
        print(f"check {name:50s} rel_err={err:.2e} pad0={pad_zero} {'ok' if ok else 'FAIL'}", flush=True)
    return results


def jax_paged_attention_best(q, k_hm, v_hm, table, lengths, chain=False):
    """JAX's Triton paged_attention over its head-major layout, best of a few block configs."""
    from jax.experimental.pallas.ops.gpu import paged_attention as jpa
    pages_per_seq = table.shape[1]
    best = None
    for ppcb, splits in JAX_PA_CONFIGS:
        if pages_per_seq % splits or (pages_per_seq // splits) % min(ppcb, pages_per_seq // splits):
            continue
        fn = jax.jit(functools.partial(jpa.paged_attention, pages_per_compute_block=ppcb, k_splits=splits))
        try:
            t = timeit(fn, q, k_hm, v_hm, table, lengths)
        except Exception as e:  # a config the kernel rejects (shared memory, shapes) is skipped
            print(f"  jax paged_attention ppcb={ppcb} k_splits={splits}: {type(e).__name__}", flush=True)
            continue
        if best is None or t < best[0]:
            best = (t, dict(pages_per_compute_block=ppcb, k_splits=splits), fn)
    if best is None:
        return None
    t, cfg, fn = best
    return t, cfg, (chain_time(fn, q, k_hm, v_hm, table, lengths) if chain else None)


def bench_decode(key, batch, ctx, window=None, chain=False, variants=False, gqa=False, config=None) -> dict:
    kv_lens = [ctx] * batch
    args = paged_batch(key, [1] * batch, kv_lens, num_pages_extra=0, poison=False)
    q, k_pages, v_pages, kv_lens_a, table, cu, num_seqs = args
    kv_read = min(ctx, window or ctx)
    kv_bytes = 2 * batch * kv_read * HKV * D * 2
    sm_scale = 1 / math.sqrt(D)
    default = choose_config(batch, batch, table.shape[1], HQ, HKV, PAGE)
    cfg = config or default
    row = dict(batch=batch, ctx=ctx, window=window, kv_bytes=kv_bytes, config=str(cfg),
               choose_config=str(default))
    fn = jax.jit(functools.partial(ragged_paged_attention_pallas, sm_scale=sm_scale, sliding_window=window,
                                   config=cfg))
    t = timeit(fn, *args)
    row.update(jpaged_us=t * 1e6, jpaged_tbps=kv_bytes / t / 1e12)
    if chain:
        t = chain_time(fn, *args)
        row.update(jpaged_chain_us=t * 1e6, jpaged_chain_tbps=kv_bytes / t / 1e12)
    if window is not None:
        return row
    if variants:
        for label, config in (("pages_per_block=8", dataclasses.replace(cfg, pages_per_block=8)),
                              ("num_stages=3", dataclasses.replace(cfg, num_stages=3)),
                              ("num_warps=8", dataclasses.replace(cfg, num_warps=8))):
            try:
                alt = timeit(jax.jit(functools.partial(ragged_paged_attention_pallas, sm_scale=sm_scale,
                                                       config=config)), *args)
                row[f"jpaged_tbps[{label}]"] = kv_bytes / alt / 1e12
            except Exception as e:
                row[f"jpaged_tbps[{label}]"] = f"{type(e).__name__}"
    # Baselines: the same KV in JAX paged_attention's head-major layout, and contiguous.
    k_hm, v_hm = jnp.moveaxis(k_pages, 2, 0), jnp.moveaxis(v_pages, 2, 0)
    best = jax_paged_attention_best(q, k_hm, v_hm, table, kv_lens_a, chain=chain)
    del k_hm, v_hm
    if best is not None:
        row.update(jax_paged_us=best[0] * 1e6, jax_paged_tbps=kv_bytes / best[0] / 1e12,
                   jax_paged_config=best[1])
        if best[2] is not None:
            row.update(jax_paged_chain_us=best[2] * 1e6, jax_paged_chain_tbps=kv_bytes / best[2] / 1e12)
    if gqa:
        try:
            from jax.experimental.pallas.ops.gpu import decode_attention
            k_c = jax.random.normal(key, (batch, ctx, HKV, D), DTYPE)
            t = timeit(jax.jit(functools.partial(decode_attention.gqa, sm_scale=sm_scale)), q, k_c, k_c)
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
    if "jax_paged_chain_us" in row:
        row["chain_speedup_vs_jax_paged"] = row["jax_paged_chain_us"] / row["jpaged_chain_us"]
    return row


def _pow2_up_to(limit: int):
    x = 1
    while x <= limit:
        yield x
        x *= 2


def bench_sweep(key, shapes=SWEEP_SHAPES, rows=None, on_row=lambda: None) -> list[dict]:
    """Decode launch configs by chained device time: split counts at 4 pages (64 tokens) per block first
    (1, and powers of two while tokens x kv heads x splits <= 2048), then 8 pages per block and 3
    pipeline stages at the best split count. Appends each shape's row to `rows` as it finishes."""
    sm_scale = 1 / math.sqrt(D)
    rows = [] if rows is None else rows
    for batch, ctx in shapes:
        key, sub = jax.random.split(key)
        args = paged_batch(sub, [1] * batch, [ctx] * batch, num_pages_extra=0, poison=False)
        kv_bytes = 2 * batch * ctx * HKV * D * 2
        pages = ctx // PAGE
        row = dict(batch=batch, ctx=ctx, default=str(choose_config(batch, batch, pages, HQ, HKV, PAGE)),
                   results=[])

        def measure(cfg):
            fn = functools.partial(ragged_paged_attention_pallas, sm_scale=sm_scale, config=cfg)
            try:
                t = chain_time(fn, *args)
                entry = dict(ppb=cfg.pages_per_block, splits=cfg.num_kv_splits, warps=cfg.num_warps,
                             stages=cfg.num_stages, chain_us=t * 1e6, chain_tbps=kv_bytes / t / 1e12)
            except Exception as e:
                entry = dict(config=str(cfg), error=f"{type(e).__name__}: {str(e)[:200]}")
            row["results"].append(entry)
            print(f"  sweep {batch}x{ctx} {entry}", flush=True)
            return entry.get("chain_us", float("inf"))

        base = TuningConfig(block_q=1, pages_per_block=4)
        max_splits = max(1, min(64, pages // 4, 2048 // (batch * HKV)))
        timed = {s: measure(dataclasses.replace(base, num_kv_splits=s)) for s in _pow2_up_to(max_splits)}
        best = dataclasses.replace(base, num_kv_splits=min(timed, key=timed.get))
        for kw in (dict(pages_per_block=8), dict(num_stages=3)):
            if pages // kw.get("pages_per_block", 4) >= best.num_kv_splits:
                measure(dataclasses.replace(best, **kw))
        ok = [r for r in row["results"] if "chain_us" in r]
        row["best"] = min(ok, key=lambda r: r["chain_us"]) if ok else None
        rows.append(row)
        on_row()
    return rows


def sweep_best_configs(sweep_rows) -> dict:
    """(batch, ctx) -> the sweep's fastest TuningConfig."""
    best = {}
    for row in sweep_rows or []:
        b = row.get("best") if isinstance(row, dict) else None
        if b:
            best[(row["batch"], row["ctx"])] = TuningConfig(block_q=1, pages_per_block=b["ppb"],
                                                            num_kv_splits=b["splits"], num_warps=b["warps"],
                                                            num_stages=b["stages"])
    return best


def bench_window(key, batch=16, ctx=32768, window=4096, rounds=31, reps=20) -> dict:
    """Window 4096 at ctx 32k vs no window at ctx 4k (same bytes), interleaved: each round times every
    function once (`reps` back-to-back calls), the order alternating; medians over the rounds."""
    sm_scale = 1 / math.sqrt(D)
    k1, k2 = jax.random.split(key)
    win = paged_batch(k1, [1] * batch, [ctx] * batch, num_pages_extra=0, poison=False)
    base = paged_batch(k2, [1] * batch, [window] * batch, num_pages_extra=0, poison=False)
    fns = {}
    for name, args, w in (("windowed_32k", win, window), ("unwindowed_4k", base, None)):
        fns[name] = (jax.jit(functools.partial(ragged_paged_attention_pallas, sm_scale=sm_scale, sliding_window=w)),
                     args)
    for fn, args in fns.values():
        jax.block_until_ready(fn(*args))
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            fn, args = fns[name]
            t = time.perf_counter()
            for _ in range(reps):
                out = fn(*args)
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - t) / reps)
    kv_bytes = 2 * batch * window * HKV * D * 2
    row = dict(batch=batch, ctx=ctx, window=window, rounds=rounds, reps=reps, kv_bytes=kv_bytes)
    for name, ts in times.items():
        row[f"{name}_median_us"] = statistics.median(ts) * 1e6
        row[f"{name}_min_us"] = min(ts) * 1e6
        row[f"{name}_tbps"] = kv_bytes / statistics.median(ts) / 1e12
    w, u = times["windowed_32k"], times["unwindowed_4k"]
    row["ratio"] = statistics.median(w) / statistics.median(u)
    row["ratio_per_round_median"] = statistics.median(a / b for a, b in zip(w, u))
    q = statistics.quantiles([a / b for a, b in zip(w, u)], n=4)
    row["ratio_per_round_iqr"] = [q[0], q[2]]
    print(json.dumps(row), flush=True)
    return row


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


def _write_kv_xla_scatter(k_pages, v_pages, k, v, slot_mapping):
    """Before session 4: padding sent to one out-of-bounds row, so the scatter's indices were not distinct."""
    num_pages, page_size, hkv, d = k_pages.shape
    num_slots = num_pages * page_size
    slots = jnp.where(slot_mapping < 0, num_slots, slot_mapping)

    def write(pages, new):
        return pages.reshape(num_slots, hkv, d).at[slots].set(new.astype(pages.dtype), mode="drop").reshape(pages.shape)

    return write(k_pages, k), write(v_pages, v)


KV_WRITE_VARIANTS = {
    "xla_scatter": _write_kv_xla_scatter,
    "xla_scatter_unique": write_kv_reference,   # the engine's
    **{f"pallas_b{b}": functools.partial(lambda *a, b: write_kv_pallas(*a, block_tokens=b, interpret=INTERPRET), b=b)
       for b in (1, 4, 16)},
}


def bench_kv_write(key, token_counts=(256, 2048), chain=16) -> list[dict]:
    """The donated in-place KV write (one layer's K and V) by implementation, tokens and pool size: *wall*
    per jitted call (dispatch included, as the step never pays it per layer) and *chained*, `chain` writes
    in one jitted loop (device time per write, as a model step pays it). It must not grow with the pool;
    bytes = 2 (K, V) x 2 (read the new row, write the slot) x T x Hkv x D x 2."""
    def chained(write):
        def run(k_pages, v_pages, k, v, slots):
            def body(i, pools):
                shift = i.astype(k.dtype)
                return write(*pools, k + shift, v - shift, slots)
            return lax.fori_loop(0, chain, body, (k_pages, v_pages))
        return jax.jit(run, donate_argnums=(0, 1))

    rows = []
    pools, token_counts = ((64,), (40,)) if INTERPRET else ((1024, 16384, 65536), token_counts)
    for num_pages in pools:
        shape = (num_pages, PAGE, HKV, D)
        for num_tokens in token_counts:
            k = jax.random.normal(key, (num_tokens, HKV, D), DTYPE)
            slots = jax.random.permutation(key, num_pages * PAGE)[:num_tokens].astype(jnp.int32)
            slots = slots.at[::7].set(-1)   # padding tokens, as in the engine's buckets
            want = None
            for name, write in KV_WRITE_VARIANTS.items():
                row = dict(impl=name, num_pages=num_pages, pool_bytes=2 * 2 * math.prod(shape), tokens=num_tokens)
                moved = 2 * 2 * num_tokens * HKV * D * 2
                for timer, fn, calls in (("wall", jax.jit(write, donate_argnums=(0, 1)), 1),
                                         ("chained", chained(write), chain)):
                    k_pages, v_pages = jnp.zeros(shape, DTYPE), jnp.zeros(shape, DTYPE)
                    k_pages, v_pages = fn(k_pages, v_pages, k, -k, slots)
                    if timer == "wall":
                        got = np.asarray(k_pages[:64]), np.asarray(v_pages[-64:])
                        want = got if want is None else want
                        row["equal_to_xla_scatter"] = all(np.array_equal(a, b) for a, b in zip(got, want))
                    times = []
                    for _ in range(7):
                        t = time.perf_counter()
                        for _ in range(20 // calls or 1):
                            k_pages, v_pages = fn(k_pages, v_pages, k, -k, slots)
                        jax.block_until_ready(k_pages)
                        times.append((time.perf_counter() - t) / ((20 // calls or 1) * calls))
                    us = statistics.median(times) * 1e6
                    row[f"{timer}_us"], row[f"{timer}_gbps"] = us, moved / us / 1e3
                    del k_pages, v_pages
                rows.append(row)
                print(f"kv_write {name:18s} pages={num_pages:6d} tokens={num_tokens:5d} wall {row['wall_us']:7.1f} us"
                      f"  chained {row['chained_us']:7.1f} us {row['chained_gbps']:7.1f} GB/s"
                      f"  equal={row['equal_to_xla_scatter']}", flush=True)
    return rows


def parse_shapes(text: str):
    return [tuple(int(x) for x in item.lower().split("x")) for item in text.split(",") if item]


def decode_shapes(quick: bool):
    batches, ctxs = ((1, 64), (2048, 32768)) if quick else ((1, 16, 64, 256), (512, 2048, 8192, 32768))
    shapes = [(b, c) for b in batches for c in ctxs if b * c <= MAX_DECODE_TOKENS]
    if not quick:  # the engine's decode steps: batch ~240 at ctx ~700
        shapes += [(128, 1024), (256, 1024)]
    return sorted(shapes)


def print_table(result: dict) -> None:
    print("\n== decode (KV TB/s; copy ceiling %.1f) ==" % COPY_TBPS)
    print(f"{'B':>4} {'ctx':>6} {'jpaged':>7} {'jaxPA':>7} {'sdpa':>7} {'x jaxPA':>8} {'x sdpa':>7}"
          f" {'chain':>7} {'jaxPA ch':>8}")
    for r in result.get("decode", []):
        if "error" in r:
            print(f"{r['batch']:>4} {r['ctx']:>6} error {r['error'][:60]}")
            continue
        f = lambda k, w=7: f"{r[k]:{w}.2f}" if isinstance(r.get(k), float) else f"{'-':>{w}}"
        print(f"{r['batch']:>4} {r['ctx']:>6} {f('jpaged_tbps')} {f('jax_paged_tbps')} "
              f"{f('torch_sdpa_tbps')} {f('speedup_vs_jax_paged', 8)} {f('speedup_vs_torch_sdpa')} "
              f"{f('jpaged_chain_tbps')} {f('jax_paged_chain_tbps', 8)}")
    for key in ("window", "sweep", "prefill", "mixed", "kv_write"):
        if key in result:
            print(f"\n== {key} ==\n{json.dumps(result.get(key), indent=1, default=str)}")


def run(section: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        traceback.print_exc()
        return dict(error=f"{section}: {type(e).__name__}: {str(e)[:300]}")


SECTIONS = ("checks", "sweep", "decode", "window", "prefill", "mixed", "kv_write")
DEFAULT_SECTIONS = ("checks", "decode", "window", "prefill", "mixed", "kv_write")


def main() -> int:
    global COPY_TBPS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    parser.add_argument("--quick", action="store_true", help="a few decode shapes only")
    parser.add_argument("--only", default="", help=f"comma list of sections to run: {','.join(SECTIONS)} "
                        f"(default: {','.join(DEFAULT_SECTIONS)})")
    parser.add_argument("--skip", default="", help="comma list of sections to skip")
    parser.add_argument("--shapes", default="", help="decode shapes, e.g. 16x512,256x1024")
    parser.add_argument("--sweep-shapes", default="", help="sweep shapes (default: SWEEP_SHAPES)")
    parser.add_argument("--chain", action="store_true",
                        help=f"also time decode chained ({CHAIN_LEN} calls per jit) up to B x ctx "
                             f"{CHAIN_MAX_TOKENS}")
    parser.add_argument("--variants", action="store_true", help="decode: a few launch variants per shape")
    parser.add_argument("--gqa", action="store_true", help="decode: JAX decode_attention.gqa baseline too")
    parser.add_argument("--all-jax-configs", action="store_true",
                        help="JAX paged_attention: all five block configs of v1-v3, not the three winners")
    parser.add_argument("--tag", default="", help="suffix of the JSON file name")
    parser.add_argument("--window-shape", default="16x32768x4096", help="window: batch x ctx x window")
    parser.add_argument("--interpret", action="store_true",
                        help="CPU dry run of this script: jpaged kernels in interpret mode (use tiny shapes)")
    args = parser.parse_args()
    sections = [s for s in (args.only.split(",") if args.only else DEFAULT_SECTIONS)
                if s and s not in set(args.skip.split(","))]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    if args.interpret:
        global ragged_paged_attention_pallas, INTERPRET
        ragged_paged_attention_pallas = functools.partial(ragged_paged_attention_pallas, interpret=True)
        INTERPRET = True
    if args.all_jax_configs:
        global JAX_PA_CONFIGS
        JAX_PA_CONFIGS = ((8, 16), (16, 8), (4, 16), (8, 4), (16, 16))
    key = jax.random.key(0)
    device = jax.devices()[0]
    result = dict(device=device.device_kind, platform=device.platform, jax=jax.__version__,
                  command=" ".join([sys.executable.rsplit("/", 1)[-1]] + sys.argv),
                  shapes=dict(q_heads=HQ, kv_heads=HKV, head_dim=D, page_size=PAGE, dtype="bfloat16"),
                  ceilings=dict(copy_tbps=COPY_TBPS, copy_tbps_source="H100 constant",
                                matmul_tflops=MATMUL_TFLOPS, matmul_tflops_source="H100 constant"))
    if not INTERPRET:   # the device's own copy ceiling, measured in this run (bench/common.py)
        from bench.common import copy_bandwidth
        COPY_TBPS = copy_bandwidth() / 1e12
        result["ceilings"].update(copy_tbps=COPY_TBPS, copy_tbps_source="measured in this run")
    try:
        import torch
        result["torch"] = torch.__version__
    except ImportError:
        result["torch"] = None
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"kernels_{device.platform}{args.tag}_{time.strftime('%Y%m%d_%H%M%S')}.json")

    def save():  # after every section and decode row, so a run cut short still leaves its numbers
        with open(path, "w") as f:
            json.dump(result, f, indent=1, default=str)

    t_start = time.perf_counter()
    for section in sections:
        t0 = time.perf_counter()
        if section == "checks":
            result["checks"] = run("checks", check_correctness, key)
        elif section == "decode":
            result["decode"] = []
            for batch, ctx in (parse_shapes(args.shapes) or decode_shapes(args.quick)):
                key, sub = jax.random.split(key)
                row = run("decode", bench_decode, sub, batch, ctx, chain=args.chain and
                          batch * ctx <= CHAIN_MAX_TOKENS, variants=args.variants, gqa=args.gqa,
                          config=sweep_best_configs(result.get("sweep")).get((batch, ctx)))
                row.setdefault("batch", batch)
                row.setdefault("ctx", ctx)
                print(json.dumps(row, default=str), flush=True)
                result["decode"].append(row)
                save()
        elif section == "window":
            batch, ctx, window = (int(x) for x in args.window_shape.split("x"))
            result["window"] = run("window", bench_window, key, batch, ctx, window)
        elif section == "sweep":
            result["sweep"] = []
            out = run("sweep", bench_sweep, key, parse_shapes(args.sweep_shapes) or SWEEP_SHAPES,
                      result["sweep"], save)
            if isinstance(out, dict):  # an error
                result["sweep"].append(out)
        elif section == "prefill":
            result["prefill"] = run("prefill", bench_prefill, key)
        elif section == "mixed":
            result["mixed"] = run("mixed", bench_mixed, key)
        elif section == "kv_write":
            result["kv_write"] = run("kv_write", bench_kv_write, key)
        result.setdefault("section_seconds", {})[section] = round(time.perf_counter() - t0, 1)
        print(f"== section {section}: {time.perf_counter() - t0:.1f} s (total {time.perf_counter() - t_start:.1f})",
              flush=True)
        save()
    print_table(result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
