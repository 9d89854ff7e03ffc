"""8-bit KV pages and fp8 weights on the GPU, each against bfloat16 measured in the same run.

Sections (`--sections`, all by default):
  check          correctness of the 8-bit paths on this device: the quantizing KV write kernel against
                 the scatter, the Triton decode and prefill kernels against the jnp reference on the
                 same 8-bit pages (max abs error; bf16 q, Llama-3-8B heads);
  decode_kernel  the Triton decode kernel over bf16 / fp8 / int8 pages at B x ctx = 64 x 8k and 256 x 2k
                 (Llama-3-8B heads: 32 q, 8 kv, D 128, 16-token pages): time, KV bytes read per second,
                 and the 8-bit time over the bf16 time (target <= 0.6);
  decode_step    the engine at batch 64 (64 x --step-input in, --step-output out): mean step time and
                 output tok/s with fp8 KV against bf16 KV;
  offline        1000 x 512 in / 256 out: fp8 weights + fp8 KV against bf16 (target >= 1.4x output tok/s);
  long           a long-context workload (--long-requests x --long-input in / --long-output out) where
                 the pool's page count decides: preemptions and output tok/s with fp8 KV against bf16.

  python -m bench.kv_quant_gpu --out bench/results/kv_quant_gpu_h100.json          # GPU, Llama-3-8B shape
  python -m bench.kv_quant_gpu --tiny --out /tmp/kv_quant_gpu_tiny.json            # CPU check, tiny shapes
"""
from __future__ import annotations

import argparse
import functools
import gc
import sys
import time

import numpy as np

from bench import common

NAME = "kv_quant_gpu"
SECTIONS = ("check", "decode_kernel", "decode_step", "offline", "long")
KV_DTYPES = ("bfloat16", "fp8", "int8")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama3-8b", help="configs/ preset for the engine sections")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--kernel-shapes", default="64x8192,256x2048", help="B x ctx of the decode kernel")
    p.add_argument("--reps", type=int, default=20, help="timed calls per kernel shape")
    p.add_argument("--step-input", type=int, default=2048)
    p.add_argument("--step-output", type=int, default=128)
    p.add_argument("--offline-requests", type=int, default=1000)
    p.add_argument("--offline-input", type=int, default=512)
    p.add_argument("--offline-output", type=int, default=256)
    p.add_argument("--long-requests", type=int, default=256)
    p.add_argument("--long-input", type=int, default=8192)
    p.add_argument("--long-output", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--tiny", action="store_true", help="tiny-llama, small shapes, reference-free interpret "
                   "kernels on CPU: checks that the script runs")
    p.add_argument("--out", help="JSON path (default bench/results/kv_quant_gpu_<device>.json)")
    args = p.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    if not args.sections or any(s not in SECTIONS for s in args.sections):
        raise ValueError(f"--sections must be a comma-separated subset of {','.join(SECTIONS)}")
    if args.tiny:
        args.model, args.kernel_shapes, args.reps = "tiny-llama", "4x256,8x128", 2
        args.step_input, args.step_output = 32, 8
        args.offline_requests, args.offline_input, args.offline_output = 16, 32, 8
        args.long_requests, args.long_input, args.long_output = 8, 64, 8
        args.max_num_seqs, args.max_num_batched_tokens = 16, 128
    args.kernel_shapes = [tuple(int(x) for x in s.split("x")) for s in args.kernel_shapes.split(",")]
    return args


def _time(fn, reps: int) -> float:
    """Median seconds of `fn()` (after one warm-up call)."""
    fn().block_until_ready()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn().block_until_ready()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def check(args) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from pallas_kernels import kv_quant
    from pallas_kernels.kv_write import write_kv_quantized_pallas, write_kv_quantized_reference
    from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference
    from pallas_kernels.ragged_paged_attention_kernel import ragged_paged_attention_pallas

    interpret = jax.devices()[0].platform != "gpu"
    hq, hkv, d, page = (4, 2, 32, 16) if args.tiny else (32, 8, 128, 16)
    q_lens, kv_lens = [1, 1, 1, 1], [250, 17, 64, 129]            # decode-shaped; prefill below
    rows = []
    for name in ("fp8", "fp8_e5m2", "int8"):
        dtype = kv_quant.resolve_kv_cache_dtype(name, jnp.bfloat16)
        key = jax.random.key(3)
        num_pages = 64
        new = jax.random.normal(key, (2, 200, hkv, d), jnp.bfloat16) * 3
        slots = jax.random.permutation(key, num_pages * page)[:200].astype(jnp.int32)
        pools = (jnp.zeros((num_pages, page, hkv, d), dtype), jnp.zeros((num_pages, page, hkv, d), dtype),
                 jnp.zeros((num_pages, page, hkv), jnp.float32), jnp.zeros((num_pages, page, hkv), jnp.float32))
        want = write_kv_quantized_reference(*pools, new[0], new[1], slots)
        got = jax.jit(functools.partial(write_kv_quantized_pallas, interpret=interpret))(*pools, new[0], new[1], slots)
        write_equal = all(bool(jnp.array_equal(a.astype(jnp.float32), b.astype(jnp.float32)))
                          for a, b in zip(want, got))
        kp = jax.random.normal(jax.random.fold_in(key, 1), (num_pages, page, hkv, d), jnp.float32)
        vp = jax.random.normal(jax.random.fold_in(key, 2), (num_pages, page, hkv, d), jnp.float32)
        (kq, ks), (vq, vs) = kv_quant.quantize(kp, dtype), kv_quant.quantize(vp, dtype)
        errors = {}
        for shape, ql in (("decode", q_lens), ("prefill", [37, 1, 64, 5])):
            t = sum(ql)
            table = jnp.arange(num_pages, dtype=jnp.int32).reshape(4, num_pages // 4)
            q = jax.random.normal(jax.random.fold_in(key, 4), (t, hq, d), jnp.bfloat16)
            meta = (jnp.asarray(kv_lens, jnp.int32), table,
                    jnp.asarray(np.concatenate([[0], np.cumsum(ql)]), jnp.int32), jnp.int32(4))
            scales = dict(k_scale=ks, v_scale=vs)
            ref = jax.jit(lambda q: ragged_paged_attention_reference(
                q.astype(jnp.float32), kq, vq, *meta, sm_scale=d ** -0.5, **scales))(q)
            out = jax.jit(lambda q: ragged_paged_attention_pallas(
                q, kq, vq, *meta, sm_scale=d ** -0.5, interpret=interpret, **scales))(q)
            errors[shape] = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
        row = dict(kv_dtype=name, kv_write_kernel_equals_scatter=write_equal,
                   decode_max_abs_err=errors["decode"], prefill_max_abs_err=errors["prefill"],
                   ok=write_equal and max(errors.values()) < 0.05)
        rows.append(row)
        print(f"check {name:9s} write==scatter {write_equal}  decode err {errors['decode']:.2e}  "
              f"prefill err {errors['prefill']:.2e}  {'ok' if row['ok'] else 'FAILED'}", flush=True)
    return rows


def decode_kernel(args) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from pallas_kernels import kv_quant
    from pallas_kernels.ragged_paged_attention_kernel import ragged_paged_attention_pallas

    interpret = jax.devices()[0].platform != "gpu"
    hq, hkv, d, page = (4, 2, 32, 16) if args.tiny else (32, 8, 128, 16)
    rows = []
    for batch, ctx in args.kernel_shapes:
        pages_per_seq = ctx // page
        num_pages = batch * pages_per_seq
        key = jax.random.key(0)
        q = jax.random.normal(key, (batch, hq, d), jnp.bfloat16)
        table = jax.random.permutation(key, num_pages).astype(jnp.int32).reshape(batch, pages_per_seq)
        kv_lens = jnp.full((batch,), ctx, jnp.int32)
        cu = jnp.arange(batch + 1, dtype=jnp.int32)
        base = None
        for name in KV_DTYPES:
            dtype = kv_quant.resolve_kv_cache_dtype(name, jnp.bfloat16)
            shape = (num_pages, page, hkv, d)
            k = jax.random.normal(jax.random.fold_in(key, 1), shape, jnp.bfloat16)
            v = jax.random.normal(jax.random.fold_in(key, 2), shape, jnp.bfloat16)
            scales = {}
            if kv_quant.is_quantized(dtype):
                (k, ks), (v, vs) = kv_quant.quantize(k, dtype), kv_quant.quantize(v, dtype)
                scales = dict(k_scale=ks, v_scale=vs)
            fn = jax.jit(lambda q, k, v, s: ragged_paged_attention_pallas(
                q, k, v, kv_lens, table, cu, jnp.int32(batch), sm_scale=d ** -0.5, interpret=interpret, **s))
            seconds = _time(lambda: fn(q, k, v, scales), args.reps)
            kv_bytes = 2 * batch * ctx * hkv * (d * jnp.dtype(dtype).itemsize + (4 if scales else 0))
            row = dict(batch=batch, ctx=ctx, kv_dtype=name, us=seconds * 1e6, kv_bytes=kv_bytes,
                       tb_per_s=kv_bytes / seconds / 1e12)
            if base is None:
                base = seconds
            row["time_over_bf16"] = seconds / base
            rows.append(row)
            print(f"decode kernel {batch}x{ctx} {name:9s} {seconds * 1e6:9.1f} us  {row['tb_per_s']:.2f} TB/s  "
                  f"x{row['time_over_bf16']:.3f} of bf16", flush=True)
            del k, v, scales, fn
            gc.collect()
    return rows


def _engine_run(args, cfg, *, kv_cache_dtype: str, quantization: str, prompts, output_lens, warmup: int):
    from jpaged.sampling_params import SamplingParams

    model = common.random_model(cfg, "float32" if args.tiny else "bfloat16")
    llm = common.make_llm(model, "float32" if args.tiny else "bfloat16",
                          max_model_len=max(map(len, prompts)) + max(output_lens),
                          max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          enable_prefix_caching=False, kv_cache_dtype=kv_cache_dtype, quantization=quantization,
                          num_kv_blocks=4096 if args.tiny else None)
    del model
    rng = np.random.default_rng(1)
    warm = [rng.integers(0, cfg.vocab_size, len(p)).tolist() for p in prompts[:warmup]]
    llm.generate(warm, [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
                        for n in output_lens[:warmup]], use_tqdm=False)
    run = common.timed_generate(llm, prompts, output_lens)
    run.pop("ttft_s")
    run |= dict(kv_cache_dtype=kv_cache_dtype, quantization=quantization, num_pages=llm.engine.runner.num_pages,
                backend=llm.engine.backend.describe(), output_tok_s=run["output_tokens"] / run["seconds"],
                mean_step_ms=1e3 * run["seconds"] / max(1, run["num_steps"]))
    del llm
    gc.collect()
    print(f"  {kv_cache_dtype:9s} weights={quantization:4s} {run['output_tok_s']:10.1f} out tok/s  "
          f"{run['mean_step_ms']:.2f} ms/step  pages {run['num_pages']}  preemptions {run['num_preemptions']}",
          flush=True)
    return run


def _workload(args, cfg, name, num, input_len, output_len, configs):
    rng = np.random.default_rng(0)
    prompts = common.random_prompts(rng, [input_len] * num, cfg.vocab_size)
    outs = [output_len] * num
    print(f"{name}: {num} x {input_len} in / {output_len} out", flush=True)
    runs = [_engine_run(args, cfg, kv_cache_dtype=kv, quantization=quant, prompts=prompts, output_lens=outs,
                        warmup=min(num, args.max_num_seqs)) for kv, quant in configs]
    base = runs[0]["output_tok_s"]
    for run in runs:
        run["speedup_over_first"] = run["output_tok_s"] / base
    return dict(num_requests=num, input_len=input_len, output_len=output_len, runs=runs)


def main(argv=None) -> None:
    args = parse_args(argv)
    common.prepare_memory(with_torch=False)
    cfg = common.model_config(args.model)
    result = dict(bench=NAME, device=common.device_info(), command=common.command_line(argv, NAME),
                  model=args.model, model_shape=common.model_shape(cfg, "bfloat16"), sections={})
    if "check" in args.sections:
        result["sections"]["check"] = check(args)
    if "decode_kernel" in args.sections:
        result["sections"]["decode_kernel"] = decode_kernel(args)
    if "decode_step" in args.sections:
        result["sections"]["decode_step"] = _workload(
            args, cfg, "decode_step (batch 64)", 64, args.step_input, args.step_output,
            [("bfloat16", "none"), ("fp8", "none")])
    if "offline" in args.sections:
        result["sections"]["offline"] = _workload(
            args, cfg, "offline", args.offline_requests, args.offline_input, args.offline_output,
            [("bfloat16", "none"), ("fp8", "none"), ("bfloat16", "fp8"), ("fp8", "fp8")])
    if "long" in args.sections:
        result["sections"]["long"] = _workload(
            args, cfg, "long", args.long_requests, args.long_input, args.long_output,
            [("bfloat16", "none"), ("fp8", "none")])
    print(f"wrote {common.write_json(result, args.out, NAME)}")


if __name__ == "__main__":
    sys.exit(main())
