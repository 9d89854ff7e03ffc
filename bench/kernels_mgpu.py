"""Check jpaged's Mosaic GPU prefill kernel against the reference on the GPU, then time it and its baselines.

    PYTHONPATH=. python bench/kernels_mgpu.py [--out DIR] [--only check,prefill,window,mixed] [--tag _h100_v1]

Checks (bf16, NaN-poisoned pool, shuffled page tables): ragged prefill chunks over cached prefixes with
q starts that are not multiples of 8, kv lengths that end inside a page, page sizes 16/32/64, GQA
4 and 8, MHA, head_dim 64, padding tokens and num_seqs < S; then sliding windows (64 / 256 / 4096, with the
pages wholly before each sequence's window freed: NaN in the pool, garbage in the table) and soft-cap 30,
alone and with a window (WINDOW_CHECKS). Timing (median over rounds of the mean of
back-to-back calls): causal prefill 4 x 4096 (32 q / 8 kv heads, D 128, page 16) for a few launch
configs, against jpaged's Triton kernel, JAX `attention_mgpu` (contiguous) and PyTorch SDPA (contiguous),
a 4 x 4096 prefill with window 1024 (section "window"), and engine-shaped batches (a 512-token chunk at ctx 2k alone and beside 64 decodes, 8 x 1024, the 8B throughput
run's mixed step), each also as the kernel alone on a precomputed work list and with the batch's decodes
split off to the decode kernel (the "mosaic" backend); the split is also checked against the reference. Prints as it goes; writes JSON after every section, so a
run cut short keeps what it measured.
"""
from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU in this process

import argparse
import functools
import json
import math
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from bench import kernels as kernels_bench
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention_kernel import ragged_paged_attention_pallas
from pallas_kernels.ragged_paged_attention_mgpu import (NUM_COMPUTE_WGS, MosaicConfig, launch,
                                                        ragged_paged_attention_mgpu, tile_shape, work_items)

HQ, HKV, D, PAGE = 32, 8, 128, 16
MATMUL_TFLOPS = 616.0    # bf16 matmul through XLA on an H100 (docs/performance.md "Copy and GEMM ceilings")
TOL = 2e-2               # relative Frobenius error, bf16 against the f32 reference


# The timers of bench/kernels.py, at 10 calls per round (the 4x4096 prefill is long enough).
timeit = functools.partial(kernels_bench.timeit, reps=10)
torch_time = functools.partial(kernels_bench.torch_time, reps=10)


def paged_batch(seed, q_lens, kv_lens, *, hq=HQ, hkv=HKV, d=D, page=PAGE, pad_tokens=0, extra_slots=0,
                poison=True, dtype=jnp.bfloat16, window=None):
    """A ragged batch over a shuffled pool. Poisoned: unused pages, stale slots past each kv_len,
    padding tokens and the garbage table entries past each sequence's pages all hold NaN / junk.
    With a window, the pages wholly before the window of each sequence's first new token are freed as the
    block manager frees them: garbage table entries, and no page of the pool (so NaN ones) behind them."""
    rng = np.random.default_rng(seed)
    q_lens = np.asarray(q_lens + [0] * extra_slots)
    kv_lens = np.asarray(kv_lens + [0] * extra_slots)
    pages_needed = -(-kv_lens // page)
    pages_per_seq = int(pages_needed.max())
    num_pages = int(pages_needed.sum()) + 8
    perm = rng.permutation(num_pages).astype(np.int32)
    table = rng.integers(-3, 10**6, (len(q_lens), pages_per_seq)).astype(np.int32)
    offset = 0
    for s, n in enumerate(pages_needed):
        first = 0 if window is None else max(int(kv_lens[s] - q_lens[s]) - window + 1, 0) // page
        table[s, first:n] = perm[offset:offset + n - first]
        offset += n - first
    shape = (num_pages, page, hkv, d)
    k = rng.standard_normal(shape, np.float32)
    v = rng.standard_normal(shape, np.float32)
    if poison:
        k[perm[offset:]] = np.nan
        v[perm[offset:]] = np.nan
        for s, kv in enumerate(kv_lens):
            n, tail = divmod(int(kv), page)
            if tail:
                k[table[s, n], tail:] = np.nan
                v[table[s, n], tail:] = np.nan
    num_real = int(q_lens.sum())
    q = rng.standard_normal((num_real + pad_tokens, hq, d), np.float32)
    if poison:
        q[num_real:] = np.nan
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    num_seqs = len(q_lens) - extra_slots
    return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(kv_lens, jnp.int32),
            jnp.asarray(table), jnp.asarray(cu), jnp.asarray(num_seqs, jnp.int32))


def compare(out, ref, num_real) -> dict:
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    finite = bool(np.isfinite(out).all())
    pad_zero = bool((out[num_real:] == 0).all())
    real_out, real_ref = out[:num_real], ref[:num_real]
    rel = float(np.linalg.norm(np.nan_to_num(real_out - real_ref, nan=1e9)) / max(np.linalg.norm(real_ref), 1e-30))
    max_abs = float(np.nanmax(np.abs(real_out - real_ref))) if real_out.size else 0.0
    return dict(rel_err=rel, max_abs_err=max_abs, finite=finite, padding_zero=pad_zero,
                ok=bool(finite and pad_zero and rel < TOL))


CHECKS = [
    # name, q_lens, kv_lens, batch kwargs
    ("ragged prefill over prefixes, p16", [37, 300, 1, 130, 5], [337, 300, 1000, 130, 17], {}),
    ("single short chunk (< 8 rows)", [3], [45], {}),
    ("page 32, shuffled", [200, 64, 77], [700, 64, 100], dict(page=32)),
    ("page 64", [129, 513], [129, 1023], dict(page=64)),
    ("padding tokens + num_seqs < S", [100, 29], [160, 29], dict(pad_tokens=19, extra_slots=2)),
    ("GQA 8 (64/8 heads)", [77, 250], [77, 400], dict(hq=64)),
    ("MHA (8/8 heads)", [150, 9], [150, 300], dict(hq=8)),
    ("head_dim 64", [90, 200], [90, 333], dict(d=64)),
    ("mixed: 64 decodes + one chunk", [1] * 64 + [120], [512] * 64 + [1500], {}),
]
# Through the public dispatch (the "mosaic" backend: a mixed batch's decodes go to the Triton decode kernel, the
# rest to the Mosaic kernel, mixed_batch.attend_mixed), with decodes between, before and after the chunks.
SPLIT_CHECKS = [
    ("split: decodes + chunks + padding", [1, 1, 37, 1, 300, 1, 1, 130, 5, 1],
     [900, 17, 337, 64, 300, 1, 2000, 130, 17, 33], dict(pad_tokens=21, extra_slots=3)),
    ("split: 200 decodes + a chunk at ctx 2k", [1] * 100 + [500] + [1] * 100, [640] * 100 + [2000] + [700] * 100,
     {}),
    ("split: chunks only, no decodes", [37, 300, 5], [337, 300, 17], {}),
    ("split: window 256, decodes + chunk", [1, 1, 300, 1], [3000, 100, 3300, 257], dict(window=256)),
]


def open_result(path: str, device, **fields):
    """(result, save): the JSON at `path` (kept across runs of other sections), updated with the device,
    versions, shapes and `fields`, this command appended; save() rewrites it (called after every section,
    so a run cut short keeps its numbers)."""
    import jaxlib
    result = json.load(open(path)) if os.path.exists(path) else {}
    result.update(device=device.device_kind, platform=device.platform, jax=jax.__version__,
                  jaxlib=jaxlib.__version__,
                  shapes=dict(q_heads=HQ, kv_heads=HKV, head_dim=D, page_size=PAGE, dtype="bfloat16"), **fields)
    result.setdefault("commands", []).append(" ".join(["python"] + sys.argv))

    def save():
        with open(path, "w") as f:
            json.dump(result, f, indent=1, default=str)

    save()
    return result, save


def check_case(row: dict, args, kernel, width: int = 36, **semantics) -> dict:
    """One device check: `kernel(*args, sm_scale=..., **semantics)` against the f32 reference (same
    `semantics`: sliding_window, soft_cap) on a NaN-poisoned pool (`paged_batch`); fills `row` with the first
    call's time and `compare`'s figures, prints one line."""
    try:
        q, k, v, kv_l, table, cu, ns = args
        d = q.shape[-1]
        t = time.perf_counter()
        out = jax.block_until_ready(kernel(*args, sm_scale=1 / math.sqrt(d), **semantics))
        row["first_call_s"] = time.perf_counter() - t
        safe_table = jnp.clip(table, 0, k.shape[0] - 1)  # the reference gathers every table entry
        ref = ragged_paged_attention_reference(jnp.nan_to_num(q).astype(jnp.float32), k.astype(jnp.float32),
                                               v.astype(jnp.float32), kv_l, safe_table, cu, ns,
                                               sm_scale=1 / math.sqrt(d), **semantics)
        row.update(compare(out, ref, int(cu[int(ns)])))
    except Exception as e:
        traceback.print_exc()
        row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:1500]}")
    print(f"check {row['case']:{width}s} " + (f"rel_err={row['rel_err']:.2e} max_abs={row['max_abs_err']:.2e} "
          f"finite={row['finite']} pad0={row['padding_zero']} {'ok' if row['ok'] else 'FAIL'}"
          if "rel_err" in row else f"ERROR {row['error'][:300]}"), flush=True)
    return row


WINDOW_CHECKS = [
    # name, q_lens, kv_lens, batch kwargs, sliding_window, soft_cap. Windows below, across and above
    # block_kv (128): lower-edge masked blocks, skipped blocks at both ends of a CTA's two tiles, freed pages.
    ("window 64, ragged over long prefixes", [37, 300, 1, 130, 5], [2337, 3300, 1000, 130, 17], {}, 64, None),
    ("window 256, ragged over long prefixes", [37, 300, 1, 130, 5], [2337, 3300, 1000, 130, 17], {}, 256, None),
    ("window 4096, ragged over long prefixes", [512, 300, 77], [8192, 5000, 77], {}, 4096, None),
    ("window 256, page 64, GQA 8", [129, 513], [4129, 1023], dict(page=64, hq=64), 256, None),
    ("window 64, padding + num_seqs < S", [100, 29], [1600, 29], dict(pad_tokens=19, extra_slots=2), 64, None),
    ("window 8 (< page), MHA", [150, 9], [650, 300], dict(hq=8), 8, None),
    ("soft-cap 30, ragged over prefixes", [37, 300, 1, 130, 5], [337, 300, 1000, 130, 17], {}, None, 30.0),
    ("soft-cap 30 + window 256", [37, 300, 130], [2337, 3300, 130], {}, 256, 30.0),
    ("soft-cap 30 + window 1024, head_dim 64", [90, 700], [3090, 700], dict(d=64), 1024, 30.0),
]


def run_checks(result: dict, save) -> None:
    result["checks"] = []
    for i, (name, q_lens, kv_lens, kw) in enumerate(CHECKS):
        row = dict(case=name, q_lens=q_lens[:8], kv_lens=kv_lens[:8], **{k: v for k, v in kw.items()})
        result["checks"].append(check_case(row, paged_batch(i, q_lens, kv_lens, **kw), ragged_paged_attention_mgpu))
        save()
    # Window / soft-cap: "mosaic" keeps routing these to Triton until every row here is ok on the device.
    for i, (name, q_lens, kv_lens, kw, window, cap) in enumerate(WINDOW_CHECKS):
        row = dict(case=name, q_lens=q_lens[:8], kv_lens=kv_lens[:8], sliding_window=window, soft_cap=cap, **kw)
        args = paged_batch(100 + i, q_lens, kv_lens, window=window, **kw)
        result["checks"].append(check_case(row, args, ragged_paged_attention_mgpu, width=40, sliding_window=window,
                                           soft_cap=cap))
        save()
    result["window_checks_ok"] = all(r.get("ok") for r in result["checks"] if "sliding_window" in r)
    print(f"window / soft-cap checks all ok: {result['window_checks_ok']}", flush=True)
    dispatch = functools.partial(pallas_kernels.ragged_paged_attention, backend=pallas_kernels.PRESETS["mosaic"])
    for i, (name, q_lens, kv_lens, kw) in enumerate(SPLIT_CHECKS):
        window = kw.get("window")
        row = dict(case=name, q_lens=q_lens[:8], kv_lens=kv_lens[:8], sliding_window=window)
        args = paged_batch(200 + i, q_lens, kv_lens, **kw)
        result["checks"].append(check_case(row, args, dispatch, width=40, sliding_window=window))
        save()
    result["split_checks_ok"] = all(r.get("ok") for r in result["checks"] if r["case"].startswith("split"))
    print(f"mixed-split checks all ok: {result['split_checks_ok']}", flush=True)


def bench_prefill(result: dict, save, batch=4, seq=4096) -> None:
    flops = 4 * batch * seq * seq * HQ * D / 2
    row = dict(batch=batch, seq=seq, causal=True, q_heads=HQ, kv_heads=HKV, head_dim=D, flops=flops, mosaic={})
    result["prefill"] = row
    sm_scale = 1 / math.sqrt(D)
    for page in (16, 64):
        args = paged_batch(0, [seq] * batch, [seq] * batch, page=page, poison=False)
        configs = [MosaicConfig(block_kv=128, num_stages=2), MosaicConfig(block_kv=64, num_stages=2),
                   MosaicConfig(block_kv=64, num_stages=3), MosaicConfig(block_kv=64, num_stages=4)]
        if page == 64:
            configs = configs[:1]
        for cfg in configs:
            label = f"page{page}_kv{cfg.block_kv}_st{cfg.num_stages}"
            try:
                fn = jax.jit(functools.partial(ragged_paged_attention_mgpu, sm_scale=sm_scale, config=cfg))
                t = timeit(fn, *args)
                row["mosaic"][label] = dict(ms=t * 1e3, tflops=flops / t / 1e12)
            except Exception as e:
                traceback.print_exc()
                row["mosaic"][label] = dict(error=f"{type(e).__name__}: {str(e)[:600]}")
            print(f"prefill mosaic {label}: {row['mosaic'][label]}", flush=True)
            save()
        if page == PAGE:
            try:
                fn = jax.jit(functools.partial(ragged_paged_attention_pallas, sm_scale=sm_scale))
                triton_out = fn(*args)
                t = timeit(fn, *args, reps=5)
                row.update(triton_ms=t * 1e3, triton_tflops=flops / t / 1e12)
                mosaic_out = ragged_paged_attention_mgpu(*args, sm_scale=sm_scale)
                row["mosaic_vs_triton"] = compare(mosaic_out, triton_out, batch * seq)
            except Exception as e:
                traceback.print_exc()
                row["triton_error"] = f"{type(e).__name__}: {str(e)[:600]}"
            print(f"prefill triton: {row.get('triton_tflops')} TFLOP/s; mosaic vs triton "
                  f"{row.get('mosaic_vs_triton')}", flush=True)
            save()
        del args
    bench_attention_mgpu(row, batch, seq, flops)
    save()
    bench_torch_sdpa(row, batch, seq, flops)
    best = max((v["tflops"] for v in row["mosaic"].values() if "tflops" in v), default=None)
    row["mosaic_best_tflops"] = best
    for base in ("triton", "jax_attention_mgpu", "torch_sdpa"):
        if best and row.get(f"{base}_tflops"):
            row[f"best_over_{base}"] = best / row[f"{base}_tflops"]
    save()


def bench_window(result: dict, save, batch=4, seq=4096, window=1024) -> None:
    """Causal prefill 4 x 4096 with a sliding window: Mosaic (default config) against the Triton kernel."""
    visible = sum(min(p + 1, window) for p in range(seq))          # kv positions each query sees
    flops = 4 * batch * visible * HQ * D
    row = dict(batch=batch, seq=seq, window=window, flops=flops)
    result["window"] = row
    args = paged_batch(0, [seq] * batch, [seq] * batch, poison=False)
    for impl, kernel in (("mosaic", ragged_paged_attention_mgpu), ("triton", ragged_paged_attention_pallas)):
        try:
            fn = jax.jit(functools.partial(kernel, sm_scale=1 / math.sqrt(D), sliding_window=window))
            t = timeit(fn, *args)
            row[f"{impl}_ms"], row[f"{impl}_tflops"] = t * 1e3, flops / t / 1e12
        except Exception as e:
            traceback.print_exc()
            row[f"{impl}_error"] = f"{type(e).__name__}: {str(e)[:600]}"
        print(f"window {window} prefill {impl}: {row.get(f'{impl}_tflops')} TFLOP/s", flush=True)
        save()
    if row.get("mosaic_ms") and row.get("triton_ms"):
        row["triton_over_mosaic"] = row["triton_ms"] / row["mosaic_ms"]
    save()


def bench_attention_mgpu(row, batch, seq, flops) -> None:
    """JAX's contiguous FA3 kernel, best of its block configs, f16 (as measured before) and bf16."""
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu as am
    except Exception as e:
        row["jax_attention_mgpu_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        return
    for dtype in (jnp.float16, jnp.bfloat16):
        key = jax.random.key(1)
        q = jax.random.normal(key, (batch, seq, HQ, D), dtype)
        k = jax.random.normal(key, (batch, seq, HKV, D), dtype)
        for block_kv in (128, 64):
            label = f"{jnp.dtype(dtype).name}_kv{block_kv}"
            try:
                cfg = am.TuningConfig(block_q=64, block_kv=block_kv, max_concurrent_steps=2, causal=True)
                t = timeit(jax.jit(functools.partial(am.attention, config=cfg)), q, k, k)
                row[f"jax_attention_mgpu[{label}]_tflops"] = flops / t / 1e12
            except Exception as e:
                row[f"jax_attention_mgpu[{label}]_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"attention_mgpu {label}: {row.get(f'jax_attention_mgpu[{label}]_tflops')}", flush=True)
    figures = [v for k, v in row.items() if k.startswith("jax_attention_mgpu[") and k.endswith("_tflops")]
    if figures:
        row["jax_attention_mgpu_tflops"] = max(figures)


def bench_torch_sdpa(row, batch, seq, flops) -> None:
    try:
        import torch
        import torch.nn.functional as F
        qt = torch.randn(batch, HQ, seq, D, device="cuda", dtype=torch.bfloat16)
        kt = torch.randn(batch, HKV, seq, D, device="cuda", dtype=torch.bfloat16)
        t = torch_time(lambda: F.scaled_dot_product_attention(qt, kt, kt, is_causal=True, enable_gqa=True))
        row.update(torch_sdpa_tflops=flops / t / 1e12, torch=torch.__version__)
        del qt, kt
        torch.cuda.empty_cache()
    except Exception as e:
        row["torch_sdpa_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    print(f"torch sdpa: {row.get('torch_sdpa_tflops')}", flush=True)


# The engine's mixed step in the 1000 x 512/256 run (bench/README.md): ~221 decodes at ctx ~640 beside a
# 2,048-token budget's prefill chunks (three whole 512-token prompts and the start of a fourth), 256 slots.
ENGINE_MIXED = ([1] * 221 + [512] * 3 + [291], [640] * 221 + [512] * 3 + [291], dict(extra_slots=31))


def _split_dispatch(split: bool, sm_scale: float):
    """The "mosaic" backend with the mixed-batch split on or off (Backend.split_mixed)."""
    backend = dataclasses.replace(pallas_kernels.PRESETS["mosaic"], split_mixed=split)
    return jax.jit(lambda *args: pallas_kernels.ragged_paged_attention(*args, sm_scale=sm_scale, backend=backend))


def bench_mixed(result: dict, save) -> None:
    """Shapes the engine sends: a 512-token chunk at ctx 2k alone and beside 64 decodes at ctx 2k, 8 x 1024, and
    the throughput run's mixed step; the Mosaic kernel alone, with the decodes split off, and Triton; the
    decodes alone through the decode kernel (what the split adds)."""
    sm_scale = 1 / math.sqrt(D)
    rows = {}
    for name, q_lens, kv_lens, kw in (("chunk512_ctx2k", [512], [2048], {}),
                                      ("64dec2k_plus_chunk512", [1] * 64 + [512], [2048] * 65, {}),
                                      ("8x1024_prefill", [1024] * 8, [1024] * 8, {}),
                                      ("engine_221dec640_plus_chunks", *ENGINE_MIXED)):
        args = paged_batch(3, q_lens, kv_lens, poison=False, **kw)
        row = {}
        variants = (("mosaic", jax.jit(functools.partial(ragged_paged_attention_mgpu, sm_scale=sm_scale))),
                    ("mosaic_split", _split_dispatch(True, sm_scale)),
                    ("triton", jax.jit(functools.partial(ragged_paged_attention_pallas, sm_scale=sm_scale))))
        for impl, fn in variants:
            try:
                row[f"{impl}_us"] = timeit(fn, *args, reps=20) * 1e6
            except Exception as e:
                row[f"{impl}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        num_dec = sum(1 for n in q_lens if n == 1)
        if num_dec:  # the decodes alone, decode-shaped (one row per slot, the others empty): the split's part
            q, k, v, kv_l, table, cu, ns = args
            dec = np.asarray([n == 1 for n in q_lens] + [False] * (table.shape[0] - len(q_lens)))
            q_dec = q[jnp.minimum(cu[:-1], q.shape[0] - 1)]
            dec_args = (q_dec, k, v, jnp.where(jnp.asarray(dec), kv_l, 0), table,
                        jnp.arange(table.shape[0] + 1, dtype=jnp.int32), ns)
            fn = jax.jit(functools.partial(ragged_paged_attention_pallas, sm_scale=sm_scale))
            row["decodes_alone_us"] = timeit(fn, *dec_args, reps=20) * 1e6
            kv_bytes = sum(kv for n, kv in zip(q_lens, kv_lens) if n == 1) * HKV * D * 2 * 2
            row["decodes_alone_kv_tb_s"] = kv_bytes / row["decodes_alone_us"] / 1e6
        try:  # the kernel on a precomputed work list: what the list costs inside the call
            q, k, v, kv_l, table, cu, ns = args
            items = work_items(cu, ns, kv_l, q.shape[0], NUM_COMPUTE_WGS * tile_shape(HQ, HKV)[2])
            alone = jax.jit(functools.partial(launch, sm_scale=sm_scale, config=MosaicConfig()))
            row["mosaic_kernel_only_us"] = timeit(alone, items, table, q, k, v, reps=20) * 1e6
        except Exception as e:
            row["mosaic_kernel_only_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        for impl in ("triton", "mosaic_split"):
            if "mosaic_us" in row and f"{impl}_us" in row:
                row[f"{impl}_over_mosaic"] = row[f"{impl}_us"] / row["mosaic_us"]
        rows[name] = row
        print(f"mixed {name}: {row}", flush=True)
        result["mixed"] = rows
        save()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    parser.add_argument("--only", default="check,prefill,window,mixed",
                        help="comma list: check,prefill,window,mixed")
    parser.add_argument("--tag", default="", help="suffix of the JSON file name")
    args = parser.parse_args()
    sections = set(args.only.split(","))
    device = jax.devices()[0]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"kernels_mgpu{args.tag}.json")
    result, save = open_result(path, device,
                               ceilings=dict(matmul_tflops=MATMUL_TFLOPS), default_config=str(MosaicConfig()))
    if "check" in sections:
        run_checks(result, save)
    if "prefill" in sections:
        bench_prefill(result, save)
    if "window" in sections:
        bench_window(result, save)
    if "mixed" in sections:
        bench_mixed(result, save)
    save()
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
