"""Mixture of experts: the grouped GEMM (ragged_dot vs the Pallas kernel vs a dense GEMM of the same
FLOPs), batch-1 decode with MBU on the bytes a token actually reads, and offline throughput.

  PYTHONPATH=. python -m bench.moe --out bench/results/moe_qwen3-30b-a3b_h100.json   # everything, one H100
  PYTHONPATH=. python -m bench.moe --sections gemm                                  # the GEMMs only
  PYTHONPATH=. python -m bench.moe --tiny --out /tmp/moe_tiny.json                  # CPU smoke run

Sections (--sections, comma-separated):
  gemm:    at the model's expert shapes, T tokens routed uniformly at random to k of X experts: the
           gate/up GEMM with its SwiGLU ([T k, H] x [X, H, 2F]) and the down GEMM ([T k, F] x [X, F, H]),
           each as `jax.lax.ragged_dot` and as the Pallas kernel (checked against ragged_dot), beside a
           dense [T k, H] x [H, 2F] GEMM of the same FLOPs. TFLOP/s = 2 T k H N / median time.
  decode:  one request, --decode-prompt-len tokens in, --decode-tokens out, greedy; tok/s = decode
           tokens / (last token time - first token time). MBU = bytes one decode step reads (attention,
           norms and router of every layer, k experts of each MoE layer, dense MLPs, one embedding row,
           the LM head, the KV cache of the context) / step time / copy bandwidth measured in this run.
  offline: --num-requests x --input-len / --output-len through the engine, all given at once.
--tiny: a 2-layer MoE of hidden 64 and small workloads, with the Pallas kernel in the interpreter.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

import numpy as np

from bench import common

NAME = "moe"
SECTIONS = ("gemm", "decode", "offline")
TINY_CONFIG = {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 256, "hidden_size": 64,
               "intermediate_size": 128, "moe_intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_experts": 8,
               "num_experts_per_tok": 2, "norm_topk_prob": True, "max_position_embeddings": 1024}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_engine_flags(p, max_num_seqs=256)
    p.set_defaults(model="qwen3-30b-a3b")
    p.add_argument("--tiny", action="store_true", help="tiny model and workloads (CPU check)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--gemm-tokens", default="4,16,64,256,1024,4096", help="tokens T of the GEMM section")
    p.add_argument("--decode-prompt-len", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=256)
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    args = p.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    if not args.sections or any(s not in SECTIONS for s in args.sections):
        raise ValueError(f"--sections must be a comma-separated subset of {','.join(SECTIONS)}")
    args.gemm_tokens = [int(t) for t in args.gemm_tokens.split(",")]
    if args.tiny:
        args.gemm_tokens = [4, 32]
        args.decode_prompt_len, args.decode_tokens = 8, 8
        args.num_requests, args.input_len, args.output_len = 8, 16, 8
        args.max_num_seqs, args.max_num_batched_tokens = 8, 64
        args.dtype = "float32"
    return args


def model_config(args):
    from models import ModelConfig

    return ModelConfig.from_hf(TINY_CONFIG) if args.tiny else common.model_config(args.model)


# -- grouped GEMM -------------------------------------------------------------------------------

def _median_seconds(fn, *args, reps: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def gemm_section(cfg, dtype_name: str, token_counts: Sequence[int], interpret: bool) -> dict:
    import jax
    import jax.numpy as jnp

    from pallas_kernels import grouped_gemm as gg
    from pallas_kernels.matmul_mgpu import interleave_gate_up

    dtype = jnp.dtype(dtype_name)
    h, f, x, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok
    keys = jax.random.split(jax.random.key(0), 4)
    w_gate_up = interleave_gate_up(*(jax.random.normal(kk, (x, h, f), dtype) * h ** -0.5 for kk in keys[:2]))
    w_down = jax.random.normal(keys[2], (x, f, h), dtype) * f ** -0.5
    reps = 2 if interpret else 50
    rows_out = []
    for t in token_counts:
        m = t * k
        experts = jax.random.randint(jax.random.fold_in(keys[3], t), (m,), 0, x)
        group_sizes = jnp.bincount(experts, length=x).astype(jnp.int32)
        a = jax.random.normal(jax.random.fold_in(keys[3], 3 * t + 2), (m, h), dtype)
        hid = jax.random.normal(jax.random.fold_in(keys[3], t + 1), (m, f), dtype)
        for name, lhs, w, epilogue, n in (("gate_up_swiglu", a, w_gate_up, "swiglu", 2 * f),
                                          ("down", hid, w_down, "none", h)):
            flops = 2 * m * lhs.shape[1] * n
            ref = jax.jit(lambda l, w, g, e=epilogue: gg.grouped_gemm_reference(l, w, g, epilogue=e))
            pallas = jax.jit(lambda l, w, g, e=epilogue: gg.grouped_gemm_pallas(l, w, g, epilogue=e,
                                                                              interpret=interpret))
            dense_w = w[0]
            dense = jax.jit(lambda l, w: jnp.dot(l, w, preferred_element_type=jnp.float32).astype(l.dtype))
            row = dict(op=name, tokens=t, rows=m, k_dim=int(lhs.shape[1]), n_dim=n, experts=x,
                       experts_hit=int((group_sizes > 0).sum()), flops=flops)
            ref_s = _median_seconds(ref, lhs, w, group_sizes, reps=reps)
            row.update(ragged_dot_ms=1e3 * ref_s, ragged_dot_tflops=flops / ref_s / 1e12)
            dense_s = _median_seconds(dense, lhs, dense_w, reps=reps)
            row.update(dense_ms=1e3 * dense_s, dense_tflops=flops / dense_s / 1e12)
            # Bytes the grouped GEMM must read: the weights of the experts hit, the rows, the output.
            nbytes = (row["experts_hit"] * lhs.shape[1] * n + m * lhs.shape[1] + m * n) * dtype.itemsize
            row.update(min_bytes=nbytes, ragged_dot_tb_s=nbytes / ref_s / 1e12)
            reason = gg.unsupported_reason(lhs, w, epilogue=epilogue)
            if reason is None:
                try:
                    got = pallas(lhs, w, group_sizes)
                except Exception as e:  # noqa: BLE001 - recorded: a kernel that does not compile here
                    row["pallas_error"] = f"{type(e).__name__}: {str(e)[:500]}"
                    rows_out.append(row)
                    continue
                want = ref(lhs, w, group_sizes)
                err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
                scale = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
                pallas_s = _median_seconds(pallas, lhs, w, group_sizes, reps=reps)
                row.update(pallas_ms=1e3 * pallas_s, pallas_tflops=flops / pallas_s / 1e12,
                           pallas_tb_s=nbytes / pallas_s / 1e12, pallas_max_abs_err=err, ref_max_abs=scale,
                           pallas_over_ragged_dot=ref_s / pallas_s)
            else:
                row["pallas_unsupported"] = reason
            rows_out.append(row)
            print(f"gemm {name} T={t}: ragged_dot {row['ragged_dot_ms']:.3f} ms, pallas "
                  f"{row.get('pallas_ms', float('nan')):.3f} ms, dense {row['dense_ms']:.3f} ms",
                  file=sys.stderr, flush=True)
    return dict(dtype=dtype_name, rows=rows_out)


# -- decode and offline -------------------------------------------------------------------------

def active_bytes_per_decode_step(model, context: int, dtype_name: str) -> int:
    """Bytes one batch-1 decode step reads: every weight except the unused experts and the embedding
    table (one row), plus the K/V of `context` tokens."""
    from flax import nnx

    cfg = model.config
    total = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        nbytes = var.get_value().nbytes
        name = ".".join(map(str, path))
        if ".experts_" in name:
            nbytes = nbytes * cfg.num_experts_per_tok // cfg.num_experts
        elif name == "embed_tokens.embedding" and not cfg.tie_word_embeddings:
            nbytes = nbytes // cfg.vocab_size
        total += nbytes
    return total + context * common.kv_bytes_per_token(cfg, dtype_name)


def decode_section(llm, model, args, bandwidth: float, rng) -> dict:
    from jpaged.sampling_params import SamplingParams

    prompt = common.random_prompts(rng, [args.decode_prompt_len], model.config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=args.decode_tokens, ignore_eos=True)
    llm.generate(prompt, params, use_tqdm=False)   # compiles the decode and prefill buckets
    prompt = common.random_prompts(rng, [args.decode_prompt_len], model.config.vocab_size)
    start = time.monotonic()
    out = llm.generate(prompt, params, use_tqdm=False)[0]
    seconds = time.monotonic() - out.first_token_time    # first token's time is the prefill's
    step_s = seconds / (args.decode_tokens - 1)
    del start
    nbytes = active_bytes_per_decode_step(model, args.decode_prompt_len + args.decode_tokens // 2, args.dtype)
    return dict(prompt_len=args.decode_prompt_len, decode_tokens=args.decode_tokens, tok_s=1 / step_s,
                step_ms=1e3 * step_s, bytes_per_step=nbytes, bandwidth_bytes_s=bandwidth,
                mbu=nbytes / step_s / bandwidth)


def offline_section(llm, args, vocab: int, rng) -> dict:
    inputs, outputs = [args.input_len] * args.num_requests, [args.output_len] * args.num_requests
    warm = min(args.max_num_seqs, args.num_requests)
    llm.engine.warmup()
    common.timed_generate(llm, common.random_prompts(rng, inputs[:warm], vocab), outputs[:warm])
    run = common.timed_generate(llm, common.random_prompts(rng, inputs, vocab), outputs)
    run.pop("ttft_s")
    stats = llm.engine.stats()
    return dict(output_tok_s=run["output_tokens"] / run["seconds"],
                total_tok_s=(run["input_tokens"] + run["output_tokens"]) / run["seconds"],
                expert_load_imbalance_total=float(np.max(stats["expert_tokens"]) / np.mean(stats["expert_tokens"])),
                **run)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    common.prepare_memory(with_torch=False)
    import jax

    cfg = model_config(args)
    interpret = jax.default_backend() != "gpu"
    result = dict(benchmark=NAME, command=common.command_line(argv, NAME), device=common.device_info(),
                  model="tiny-moe" if args.tiny else args.model, model_shape=common.model_shape(cfg, args.dtype)
                  | dict(num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                         moe_intermediate_size=cfg.moe_intermediate_size, moe_layers=len(cfg.moe_layers),
                         active_params=cfg.num_params(active=True)), results={})
    if "gemm" in args.sections:
        result["results"]["gemm"] = gemm_section(cfg, args.dtype, args.gemm_tokens, interpret)
    if {"decode", "offline"} & set(args.sections):
        rng = np.random.default_rng(1)
        start = time.perf_counter()
        model = common.random_model(cfg, args.dtype)
        result["model_build_s"] = time.perf_counter() - start
        max_len = max(args.decode_prompt_len + args.decode_tokens, args.input_len + args.output_len)
        llm = common.make_llm(model, args.dtype, **common.engine_kwargs(args, max_len))
        result["engine"] = dict(backend=llm.engine.runner.backend.describe(), max_num_seqs=args.max_num_seqs,
                                max_num_batched_tokens=args.max_num_batched_tokens,
                                num_kv_pages=llm.engine.runner.num_pages)
        served = llm.engine.runner.model
        if "decode" in args.sections:
            result["results"]["decode"] = decode_section(llm, served, args, common.copy_bandwidth(), rng)
        if "offline" in args.sections:
            result["results"]["offline"] = offline_section(llm, args, cfg.vocab_size, rng)
    print_results(result)
    print(f"\nwrote {common.write_json(result, args.out, NAME)}")
    return result


def print_results(r: dict) -> None:
    rows = [("device", r["device"]["device_kind"]), ("model", r["model"])]
    for g in r["results"].get("gemm", {}).get("rows", []):
        rows.append((f"{g['op']} T={g['tokens']} TFLOP/s ragged_dot / pallas / dense",
                     f"{g['ragged_dot_tflops']:.2f} / {g.get('pallas_tflops', float('nan')):.2f} / "
                     f"{g['dense_tflops']:.2f}"))
    if "decode" in r["results"]:
        d = r["results"]["decode"]
        rows += [("batch-1 decode tok/s", d["tok_s"]), ("batch-1 MBU (active bytes)", d["mbu"])]
    if "offline" in r["results"]:
        o = r["results"]["offline"]
        rows += [("offline output tok/s", o["output_tok_s"]), ("offline total tok/s", o["total_tok_s"])]
    common.print_table(f"mixture of experts, {r['model']}", rows)


if __name__ == "__main__":
    main()
