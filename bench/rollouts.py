"""RL-style rollouts: many samples per prompt with EOS at random (seeded) points.

jpaged.generate (paged pool, shared prompt pages) against the usual research code in the same run:
a dense per-row [max_len] KV cache decoded with plain jnp attention in a `lax.while_loop`. Both run
the same random-weight model, the same prompts and the same stop points (the model's EOS logit is
forced at each row's seeded length and masked elsewhere, so both do identical work); tokens are
compared before the timings are trusted.

  python bench/rollouts.py                   # Llama-3-8B shape, 64 prompts x 8 samples, 512 + up to 1024
  python bench/rollouts.py --preset tiny     # CPU smoke test
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jpaged.generate import generate
from models.kv_cache import KVCacheSpec
from jpaged.sampling_params import SamplingParams
from models.config import ModelConfig
from models.layers import apply_rope, rope_inv_freq
from models.llama import LlamaForCausalLM

ROOT = pathlib.Path(__file__).resolve().parents[1]
HBM_TBPS = {"H100": 3.35, "H200": 4.8}


@dataclasses.dataclass(frozen=True)
class Workload:
    config: str
    dtype: str
    num_prompts: int
    num_samples: int
    prompt_len: int
    max_new_tokens: int
    page_size: int


PRESETS = {
    "llama3-8b": Workload("llama3-8b", "bfloat16", 64, 8, 512, 1024, 16),
    "tiny": Workload("tiny-llama", "float32", 4, 3, 16, 24, 8),
}


class ForcedStop(nnx.Module):
    """Wraps a model so a row emits EOS exactly as its stop_at-th token and never before.

    Works for both loops here because each sequence s of a decode step is row s and has
    kv_lens = prompt_len + tokens generated so far; prefill (kv_lens = prompt_len) never forces,
    as stop_at >= 2.
    """

    def __init__(self, base, stop_at, prompt_len: int, eos: int):
        self.base, self.config = base, base.config
        self.stop_at = nnx.Variable(jnp.asarray(stop_at, jnp.int32))
        self.prompt_len, self.eos = prompt_len, eos

    def kv_cache_spec(self, page_size, dtype=None):
        return self.base.kv_cache_spec(page_size, dtype)

    def __call__(self, kv_cache, step, *, backend):
        logits, kv_cache = self.base(kv_cache, step, backend=backend)
        return force_stop(logits, step.kv_lens[:logits.shape[0]] - self.prompt_len,
                          self.stop_at[...][:logits.shape[0]], self.eos), kv_cache


def force_stop(logits, generated, stop_at, eos):
    """logits [S, V]; the next token is number generated + 1: EOS there, never elsewhere."""
    stop = generated + 1 == stop_at
    return logits.at[:, eos].set(jnp.where(stop, jnp.inf, -jnp.inf))


def dense_forward(model, tokens, positions, cache, attend_len):
    """Plain research-code step: tokens/positions [R, T], cache (k, v) lists of [R, max_len, Hkv, D]."""
    cfg = model.config
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    rows, t = tokens.shape
    hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    x = model.embed_tokens(tokens)                                            # [R, T, E]
    row_ids = jnp.arange(rows)[:, None]
    mask = jnp.arange(attend_len)[None, None, :] <= positions[:, :, None]     # [R, T, Lk]
    new_k, new_v = [], []
    for layer, ck, cv in zip(model.layers, *cache):
        a = layer.self_attn
        h = layer.input_layernorm(x)
        q, k, v = (a.q_proj(h).reshape(rows * t, hq, d), a.k_proj(h).reshape(rows * t, hkv, d),
                   a.v_proj(h).reshape(rows, t, hkv, d))
        if a.q_norm is not None:
            q, k = a.q_norm(q), a.k_norm(k)
        q = apply_rope(q, positions.reshape(-1), inv_freq).reshape(rows, t, hkv, hq // hkv, d)
        k = apply_rope(k, positions.reshape(-1), inv_freq).reshape(rows, t, hkv, d)
        ck, cv = ck.at[row_ids, positions].set(k), cv.at[row_ids, positions].set(v)
        s = jnp.einsum("rtkgd,rlkd->rkgtl", q, ck[:, :attend_len]).astype(jnp.float32) * d ** -0.5
        p = jax.nn.softmax(jnp.where(mask[:, None, None], s, -jnp.inf), axis=-1).astype(cv.dtype)
        o = jnp.einsum("rkgtl,rlkd->rtkgd", p, cv[:, :attend_len]).reshape(rows, t, hq * d)
        x = x + a.o_proj(o)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        new_k.append(ck)
        new_v.append(cv)
    h = model.norm(x[:, -1])
    logits = model.embed_tokens.attend(h) if model.lm_head is None else model.lm_head(h)
    return logits.astype(jnp.float32), (new_k, new_v)


@jax.jit(static_argnums=(0,), static_argnames=("num_samples", "max_new_tokens", "eos"))
def dense_generate(graphdef, state, prompts, stop_at, *, num_samples, max_new_tokens, eos):
    """Greedy rollouts over a dense per-row cache; prompts [B, L] (full length), stop_at [B * N]."""
    model = nnx.merge(graphdef, state)
    cfg = model.config
    batch, width = prompts.shape
    rows, max_len = batch * num_samples, width + max_new_tokens
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    cache = ([jnp.zeros(shape, model.dtype)] * cfg.num_layers,) * 2
    positions = jnp.broadcast_to(jnp.arange(width), (batch, width))
    logits, cache = dense_forward(model, prompts, positions, cache, width)
    cache = jax.tree.map(lambda c: jnp.repeat(c, num_samples, axis=0), cache)
    logits = force_stop(jnp.repeat(logits, num_samples, axis=0), jnp.zeros((rows,), jnp.int32), stop_at, eos)
    tokens = jnp.full((rows, max_new_tokens), -1, jnp.int32).at[:, 0].set(jnp.argmax(logits, -1))

    def body(carry):
        step, tokens, cache, done = carry
        pos = jnp.full((rows, 1), width - 1 + step)
        logits, cache = dense_forward(model, jax.lax.dynamic_slice_in_dim(tokens, step - 1, 1, axis=1), pos, cache,
                                      max_len)
        new = jnp.argmax(force_stop(logits, jnp.full((rows,), step), stop_at, eos), -1)
        tokens = tokens.at[:, step].set(jnp.where(done, -1, new))
        return step + 1, tokens, cache, done | (new == eos)

    done = tokens[:, 0] == eos
    _, tokens, _, _ = jax.lax.while_loop(lambda c: (c[0] < max_new_tokens) & ~jnp.all(c[3]), body,
                                         (jnp.ones((), jnp.int32), tokens, cache, done))
    return tokens


def pages_needed(prompt_len, stop_at, num_samples, page_size):
    shared = prompt_len // page_size
    own = -(-(prompt_len + stop_at - 1) // page_size) - shared
    return int(shared * (len(stop_at) // num_samples) + own.sum())


def timed(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def run_paged(model, prompts, lens, stop_at, w, eos, backend):
    """Times jpaged.generate after a compile-only call (every row stopping at once, same shapes)."""
    num_pages = pages_needed(w.prompt_len, stop_at, w.num_samples, w.page_size)

    def call():
        return generate(model, prompts, lens, max_new_tokens=w.max_new_tokens, key=jax.random.PRNGKey(0),
                        num_samples=w.num_samples, eos_token_ids=(eos,), page_size=w.page_size,
                        num_pages=num_pages, backend=backend, sampling=SamplingParams(temperature=0.0))

    model.stop_at[...] = jnp.full((len(stop_at),), 2, jnp.int32)
    _, compile_s = timed(call)
    model.stop_at[...] = jnp.asarray(stop_at, jnp.int32)
    out, seconds = timed(call)
    if bool(out.out_of_pages) or not (np.asarray(out.lengths).ravel() == stop_at).all():
        raise SystemExit("rollouts: jpaged.generate lengths differ from the stop schedule")
    tokens = np.asarray(out.tokens).reshape(len(stop_at), -1)
    return tokens, seconds, compile_s, dict(num_pages=num_pages, pages_in_use=int(out.pages_in_use))


def run_dense(model, prompts, stop_at, w, eos, prompts_per_chunk):
    """Times the dense baseline, prompts_per_chunk prompts (and their samples) at a time."""
    graphdef, state = nnx.split(model.base)
    chunks = range(0, w.num_prompts, prompts_per_chunk)

    def call(stops):
        return [dense_generate(graphdef, state, prompts[c:c + prompts_per_chunk],
                               stops[c * w.num_samples:(c + prompts_per_chunk) * w.num_samples],
                               num_samples=w.num_samples, max_new_tokens=w.max_new_tokens, eos=eos)
                for c in chunks]

    _, compile_s = timed(lambda: call(jnp.full((len(stop_at),), 2, jnp.int32)))
    out, seconds = timed(lambda: call(jnp.asarray(stop_at, jnp.int32)))
    return np.concatenate([np.asarray(o) for o in out]), seconds, compile_s


def run_engine(base, prompts, stop_at, w):
    """The serving engine on the same work: one request per (prompt, sample) with max_tokens = its stop
    point (EOS ignored), so every row generates exactly as many tokens as in the other two runs. Requests
    go in sample-major order, so each prompt's later samples find its pages in the prefix cache (as
    generate's samples share them). Runs last: the engine fuses the model's projections in place."""
    from bench import common
    from jpaged.sampling_params import SamplingParams

    rows = len(stop_at)
    llm = common.make_llm(base, w.dtype, max_model_len=w.prompt_len + w.max_new_tokens, max_num_seqs=rows,
                          max_num_batched_tokens=2048, block_size=w.page_size)
    start = time.perf_counter()
    llm.engine.warmup()
    compile_s = time.perf_counter() - start
    order = [(p, s) for s in range(w.num_samples) for p in range(w.num_prompts)]
    params = [SamplingParams(temperature=0.0, max_tokens=int(stop_at[p * w.num_samples + s]), ignore_eos=True)
              for p, s in order]
    start = time.perf_counter()
    outs = llm.generate([prompts[p].tolist() for p, _ in order], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    if [len(o.outputs[0].token_ids) for o in outs] != [sp.max_tokens for sp in params]:
        raise SystemExit("rollouts: the engine's lengths differ from the stop schedule")
    stats = llm.engine.stats()
    return seconds, compile_s, dict(prefix_cache_hits=stats["prefix_cache_hits"], num_pages=stats["num_total_pages"],
                                    num_preemptions=stats["num_preemptions"])


def dense_prompts_per_chunk(cfg, w, dtype, weight_bytes) -> int:
    """As many prompts as the device's memory holds dense caches for (all of them without a limit)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        return w.num_prompts
    row_bytes = 2 * cfg.num_layers * (w.prompt_len + w.max_new_tokens) * cfg.num_kv_heads * cfg.head_dim * \
        jnp.dtype(dtype).itemsize
    budget = 0.6 * (stats["bytes_limit"] - weight_bytes)
    fit = max(1, int(budget // (row_bytes * w.num_samples)))
    return max(d for d in range(1, w.num_prompts + 1) if w.num_prompts % d == 0 and d <= fit)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama3-8b")
    p.add_argument("--backend", "--attn-impl", dest="backend", default="reference",
                   help="a pallas_kernels.select_backend override ('auto', 'mosaic', ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=pathlib.Path, default=None, help="JSON path (default bench/results/)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    w = PRESETS[args.preset]
    cfg = ModelConfig.from_hf(json.loads((ROOT / "configs" / f"{w.config}.json").read_text()))
    eos = cfg.eos_token_ids[0] if cfg.eos_token_ids else cfg.vocab_size - 1
    rs = np.random.RandomState(args.seed)
    rows = w.num_prompts * w.num_samples
    stop_at = rs.randint(2, w.max_new_tokens + 1, size=rows).astype(np.int32)
    prompts = rs.randint(0, cfg.vocab_size, size=(w.num_prompts, w.prompt_len)).astype(np.int32)
    lens = np.full((w.num_prompts,), w.prompt_len, np.int32)
    dtype = jnp.dtype(w.dtype)
    model = ForcedStop(LlamaForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(args.seed)), stop_at, w.prompt_len, eos)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model.base, nnx.Param)))

    paged_tokens, paged_s, paged_compile_s, pool = run_paged(model, prompts, lens, stop_at, w, eos, args.backend)
    per_chunk = dense_prompts_per_chunk(cfg, w, dtype, weight_bytes)
    dense_tokens, dense_s, dense_compile_s = run_dense(model, prompts, stop_at, w, eos, per_chunk)
    engine_s, engine_compile_s, engine_stats = run_engine(model.base, prompts, stop_at, w)
    same = float((paged_tokens == dense_tokens).all(axis=1).mean())
    if w.dtype == "float32" and same < 1.0:
        raise SystemExit(f"rollouts: generate and the dense baseline disagree on {1 - same:.0%} of the rows")

    generated = int(stop_at.sum())
    device = jax.devices()[0]
    ceiling = next((v for k, v in HBM_TBPS.items() if k in device.device_kind), None)
    steps = int(stop_at.max())
    results = {}
    for name, seconds, compile_s in (("jpaged_generate", paged_s, paged_compile_s),
                                     ("engine", engine_s, engine_compile_s),
                                     ("dense_baseline", dense_s, dense_compile_s)):
        results[name] = dict(seconds=seconds, compile_seconds=compile_s, tokens_per_s=generated / seconds,
                             weight_tb_per_s=steps * weight_bytes / seconds / 1e12)
    token_bytes = KVCacheSpec.for_model(cfg, 1, dtype).bytes_per_page
    results["jpaged_generate"].update(pool, kv_bytes=pool["num_pages"] * w.page_size * token_bytes)
    results["engine"].update(engine_stats)
    results["dense_baseline"].update(prompts_per_chunk=per_chunk,
                                     kv_bytes=per_chunk * w.num_samples * (w.prompt_len + w.max_new_tokens) * token_bytes)
    report = dict(
        bench="rollouts", device=device.device_kind, platform=device.platform, jax=jax.__version__,
        flax=flax.__version__, backend=args.backend, hbm_ceiling_tb_per_s=ceiling,
        workload=dataclasses.asdict(w) | dict(seed=args.seed, generated_tokens=generated, decode_steps=steps,
                                              weight_bytes=weight_bytes),
        results=results, speedup_vs_dense=dense_s / paged_s, generate_vs_engine=engine_s / paged_s,
        rows_identical_to_dense=same, command="python bench/rollouts.py " + " ".join(sys.argv[1:]))

    print(f"{w.num_prompts} prompts x {w.num_samples} samples, prompt {w.prompt_len}, "
          f"up to {w.max_new_tokens} new ({generated} generated), {device.device_kind}")
    print(f"{'':18}{'tok/s':>12}{'seconds':>10}{'weights TB/s':>14}  (ceiling {ceiling or '?'} TB/s)")
    for name, r in results.items():
        print(f"{name:18}{r['tokens_per_s']:12.1f}{r['seconds']:10.2f}{r['weight_tb_per_s']:14.3f}")
    print(f"speedup vs dense: {report['speedup_vs_dense']:.2f}x; generate / engine speed: "
          f"{report['generate_vs_engine']:.2f}; rows identical to dense: {same:.0%}; KV memory "
          f"paged {results['jpaged_generate']['kv_bytes'] / 2**30:.2f} GiB vs dense "
          f"{results['dense_baseline']['kv_bytes'] / 2**30:.2f} GiB per chunk of {per_chunk} prompts")
    out = args.out or ROOT / "bench" / "results" / f"rollouts_{args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
