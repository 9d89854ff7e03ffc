"""Quality of 8-bit KV pages and fp8 weights on the real default model (CPU, float32 compute).

Two figures per configuration, each against the model with bfloat16 KV pages and float32 weights:
- perplexity over a fixed text (the Apache-2.0 license shipped in jaxlib's dist-info, >= 2,000 tokens),
  scored in 512-token chunks through the paged cache (`PromptScorer`, the engine's prompt-logprobs
  path), so every chunk attends to the earlier chunks' quantized pages and to its own;
- greedy agreement over 32 prompts (windows of that text): the share of the baseline's greedy tokens
  reproduced before the first divergence, and the share of prompts reproduced exactly.

    python -m bench.kv_quant_quality --out bench/results/kv_quant_quality_cpu.json
    python -m bench.kv_quant_quality --tiny --out /tmp/q.json    # a quick check: fewer prompts and tokens
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import sys
import time

import numpy as np

# name -> (kv_cache_dtype, quantization)
CONFIGS = {
    "bfloat16 KV": ("bfloat16", "none"),
    "fp8 (e4m3) KV": ("fp8", "none"),
    "int8 KV": ("int8", "none"),
    "fp8 weights, bfloat16 KV": ("bfloat16", "fp8"),
    "fp8_e5m2 KV": ("fp8_e5m2", "none"),
    "fp8 weights + fp8 KV": ("fp8", "fp8"),
}
BASELINE = "bfloat16 KV"


def fixed_text() -> tuple[str, str]:
    """(the text, where it comes from): jaxlib's LICENSE.txt (Apache 2.0)."""
    dist = importlib.metadata.distribution("jaxlib")
    path = next(f for f in dist.files if str(f).endswith("LICENSE.txt"))
    return dist.locate_file(path).read_text(), f"jaxlib-{dist.version} {path}"


def perplexity(model, token_ids: list[int], kv_cache_dtype: str) -> float:
    from jpaged.engine.prompt_logprobs import PromptScorer
    from models.kv_cache import KVCacheSpec
    from pallas_kernels import REFERENCE
    from pallas_kernels.kv_quant import resolve_kv_cache_dtype

    spec = KVCacheSpec.for_model(model.config, 16, resolve_kv_cache_dtype(kv_cache_dtype, model.dtype))
    logprobs = PromptScorer(model, spec=spec, backend=REFERENCE).score(token_ids)[0]
    return float(np.exp(-np.mean(logprobs)))


def greedy(model, tokenizer, prompts, max_tokens: int, kv_cache_dtype: str) -> list[list[int]]:
    from jpaged import LLM, SamplingParams

    llm = LLM(model_obj=model, tokenizer=tokenizer, dtype="float32", kv_cache_dtype=kv_cache_dtype,
              max_model_len=1024, max_num_seqs=32, num_kv_blocks=2048, quantization="none")
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def agreement(base: list[list[int]], other: list[list[int]]) -> dict:
    prefix = []
    for a, b in zip(base, other):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        prefix.append(n / len(a))
    return dict(token_agreement=float(np.mean(prefix)),
                prompts_identical=float(np.mean([a == b for a, b in zip(base, other)])))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="JSON path (default bench/results/kv_quant_quality_<device>.json)")
    p.add_argument("--tiny", action="store_true", help="a quick check: 512 text tokens, 4 prompts of 8 tokens")
    p.add_argument("--model", default="default", help="the model (jpaged --model); default SmolLM2-135M-Instruct")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per prompt")
    p.add_argument("--text-tokens", type=int, default=2048, help="tokens of the fixed text scored")
    args = p.parse_args(argv)
    if args.tiny:
        args.num_prompts, args.max_tokens, args.text_tokens = 4, 8, 512

    from jpaged.loader import load_model
    from models import fp8_linear

    text, source = fixed_text()
    _, tokenizer = load_model(args.model, dtype="float32")
    ids = tokenizer.encode(text)
    if len(ids) < args.text_tokens:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than --text-tokens {args.text_tokens}")
    ids = ids[:args.text_tokens]
    rng = np.random.default_rng(0)
    starts = rng.integers(0, len(ids) - 64, args.num_prompts)
    prompts = [ids[s:s + int(n)] for s, n in zip(starts, rng.integers(8, 64, args.num_prompts))]

    import jax
    rows, base_tokens = {}, None
    for name, (kv_dtype, quant) in CONFIGS.items():
        start = time.perf_counter()
        model, tokenizer = load_model(args.model, dtype="float32")   # a fresh copy: the engine fuses in place
        if quant == "fp8":
            model.fuse_projections()
            fp8_linear.quantize_model(model, jax.devices()[0])
        ppl = perplexity(model, ids, kv_dtype)
        tokens = greedy(model, tokenizer, prompts, args.max_tokens, kv_dtype)
        if base_tokens is None:
            base_tokens = tokens
        rows[name] = dict(kv_cache_dtype=kv_dtype, quantization=quant, perplexity=ppl,
                          **agreement(base_tokens, tokens), seconds=time.perf_counter() - start)
        print(f"{name:28s} ppl {ppl:8.4f}  agreement {rows[name]['token_agreement']:.3f}  "
              f"identical {rows[name]['prompts_identical']:.3f}", flush=True)
        path = _write(args, argv, rows, text, source, ids, prompts)   # after every row: a partial run counts
    print(f"wrote {path}")


def _write(args, argv, rows, text, source, ids, prompts):
    import jax

    from bench.common import command_line, device_info, write_json
    from models import fp8_linear

    base = rows[BASELINE]["perplexity"]
    for row in rows.values():
        row["perplexity_change_pct"] = 100 * (row["perplexity"] / base - 1)
    result = dict(
        bench="kv_quant_quality", device=device_info(), model=args.model, compute_dtype="float32",
        fp8_weights_mode=fp8_linear.device_mode(jax.devices()[0]),
        text=dict(source=source, sha256=hashlib.sha256(text.encode()).hexdigest(), tokens=len(ids)),
        greedy=dict(num_prompts=len(prompts), max_tokens=args.max_tokens, prompt_tokens="8-63, windows of the text"),
        baseline=BASELINE, rows=rows,
        command=command_line(argv, "kv_quant_quality"))
    return write_json(result, args.out, "kv_quant_quality")


if __name__ == "__main__":
    sys.exit(main())
