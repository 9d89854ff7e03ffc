"""Decode tokens/s and MBU under tensor parallelism, and data parallel through the serving engine, as JSON.

  python bench/multi_gpu.py                          # Llama-3-8B at TP 1 and 2, 70B at TP 2, batch 1 and 64
  python bench/multi_gpu.py --tp 1,2,4,8             # any number of GPUs (70B only at TP >= 2)
  python bench/multi_gpu.py --engine-dp 2 --no-tp-sweep   # serving engine: 2 replicas x TP 1 vs 1 GPU
  python bench/multi_gpu.py --preset tiny --devices 8 --dp 2   # on CPU with 8 virtual devices

Weights are random, built on the devices already sharded (each device draws only its own slices) and
never whole on one device. Each decode step reads every weight once plus the KV of every sequence:
MBU = (weight + KV bytes one device reads per step) / copy bandwidth / step time, the copy bandwidth
being bench.common.copy_bandwidth on each device (read + written bytes / median time of a 2 GiB copy,
after a warm-up), the median over the devices. Before timing, every TP size's first-step logits are
compared with the smallest TP size's of the same model.

--engine-dp R runs the first model through the serving engine (`make_engine`, greedy, chunked
prefill, async steps): R replicas x TP 1 with the largest batch of the preset on each, against one
replica on one device at that batch; decode tokens/s counted over steps where every sequence decodes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

PRESETS = {
    # model label -> (configs/ preset, TP sizes, batch sizes); context 1024, bf16.
    "h200": dict(models={"llama3-8b": ("llama3-8b", (1, 2)), "llama3-70b": ("llama3-70b", (2,))},
                 batches=(1, 64), context=1024, steps=20),
    "tiny": dict(models={"tiny-kv8": ("tiny-kv8", (1, 2)), "tiny-kv2": ("tiny-llama", (2,))},
                 batches=(1, 8), context=64, steps=8),
}
TINY_KV8 = {"architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 128,
            "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 8,
            "num_key_value_heads": 8, "head_dim": 16}
PAGE = 16


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="h200")
    p.add_argument("--devices", type=int, help="run on CPU with this many virtual devices")
    p.add_argument("--tp", help="comma-separated TP sizes, replacing the preset's (the 70B shape keeps TP >= 2)")
    p.add_argument("--dp", type=int, default=0, help="also compare data parallel: one engine per replica "
                   "against one SPMD program over all replicas, with this many replicas")
    p.add_argument("--engine-dp", type=int, default=0, help="also measure the serving engine with this many "
                   "data-parallel replicas (TP 1 each) against one replica on one device")
    p.add_argument("--no-tp-sweep", dest="tp_sweep", action="store_false", help="skip the TP table")
    p.add_argument("--backend", "--attn-impl", dest="backend", default="reference",
                   help="a pallas_kernels.select_backend override ('auto', 'auto,kv_write=pallas', ...)")
    p.add_argument("--steps", type=int)
    p.add_argument("--out", default="bench/results/multi_gpu.json")
    return p.parse_args()


# Parsed before JAX is imported (--devices sets the CPU device count); None when imported as a module
# (bench/tp_step_profile.py uses the helpers below).
args = parse_args() if __name__ == "__main__" else None
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (KINDS.md)
if args is not None and args.devices:
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import functools  # noqa: E402

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench import common  # noqa: E402
from jpaged import sharding  # noqa: E402
from models.sharding import MODEL, state_shardings, tp_model_config  # noqa: E402
from pallas_kernels import select_backend  # noqa: E402
from jpaged.engine.model_runner import token_buckets  # noqa: E402
from models.kv_cache import StepInput  # noqa: E402
from models import LlamaForCausalLM, ModelConfig  # noqa: E402


def load_config(name: str) -> ModelConfig:
    if name == "tiny-kv8":
        return ModelConfig.from_hf(TINY_KV8)
    with open(os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.json")) as f:
        return ModelConfig.from_hf(json.load(f))


@functools.lru_cache(maxsize=None)
def _random_param(shape, dtype, sharding_, is_norm):
    def draw(key):
        if is_norm:
            return jnp.ones(shape, dtype)
        return (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(dtype)
    return jax.jit(draw, out_shardings=sharding_)


def random_model(cfg: ModelConfig, mesh, dtype) -> LlamaForCausalLM:
    """Random weights drawn on the devices under their shardings; the same values for every mesh."""
    tp_cfg = tp_model_config(cfg, mesh.shape[MODEL])
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: LlamaForCausalLM(tp_cfg, dtype=dtype)))
    shardings = state_shardings(abstract, mesh)
    flat = []
    for i, (path, var) in enumerate(nnx.to_flat_state(abstract)):
        name = ".".join(map(str, path))
        make = _random_param(tuple(var.shape), jnp.dtype(var.dtype), shardings[name], name.endswith("norm.weight"))
        flat.append((path, var.replace(make(jax.random.key(i)))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def decode_step_input(batch: int, context: int, num_tokens: int | None = None) -> StepInput:
    """Host arrays: every sequence decodes its token at position context - 1, pages [b * P, (b + 1) * P).

    Padded as the serving engine pads a decode batch: to `num_tokens` tokens (default its token bucket,
    jpaged.engine.model_runner.token_buckets, at least 4) and as many sequence rows, the padding ones
    empty (kv_len 0, no slot written), so the kernels see a decode-shaped batch (T == S). Without the
    padding, one token makes XLA on the GPU turn every weight under 10M elements (q, k, v and o at TP 2)
    into a multiply + reduce that writes and re-reads a product the size of the weight.
    """
    num_tokens = num_tokens or next(b for b in token_buckets(1 << 20) if b >= batch)
    return ragged_step_input([1] * batch, [context] * batch, num_tokens, num_tokens)


def ragged_step_input(q_lens, kv_lens, num_tokens: int, num_slots: int) -> StepInput:
    """Host arrays of a ragged batch: sequence s's q_lens[s] new tokens end its kv_lens[s] context, its
    pages are contiguous after sequence s - 1's, and the tokens and slots past the real ones are padding
    (no KV written, empty kv range), as the serving engine pads a step."""
    q_lens, kv_lens = np.asarray(q_lens, np.int32), np.asarray(kv_lens, np.int32)
    real, batch = int(q_lens.sum()), len(q_lens)
    if real > num_tokens or batch > num_slots:
        raise ValueError(f"{real} tokens / {batch} sequences do not fit {num_tokens} tokens / {num_slots} slots")
    pages = -(-int(kv_lens.max()) // PAGE)
    table = np.zeros((num_slots, pages), np.int32)
    table[:batch] = np.arange(batch)[:, None] * pages + np.arange(pages)
    cu = np.full(num_slots + 1, real, np.int32)
    cu[:batch + 1] = np.concatenate([[0], np.cumsum(q_lens)])
    seq = np.repeat(np.arange(batch), q_lens)
    positions = np.zeros(num_tokens, np.int32)
    positions[:real] = kv_lens[seq] - q_lens[seq] + np.arange(real) - cu[seq]
    slots = np.full(num_tokens, -1, np.int32)
    slots[:real] = table[seq, positions[:real] // PAGE] * PAGE + positions[:real] % PAGE
    all_kv = np.zeros(num_slots, np.int32)
    all_kv[:batch] = kv_lens
    return StepInput(
        token_ids=np.arange(num_tokens, dtype=np.int32) % 100, positions=positions, cu_q_lens=cu,
        kv_lens=all_kv, page_table=table, slot_mapping=slots,
        logits_index=np.minimum(cu[1:] - 1, max(real - 1, 0)).astype(np.int32), num_seqs=np.asarray(batch, np.int32))


def make_decode(graphdef, treedef, backend):
    """decode(weights, kv_cache, step) over the model's flat weight list, as the serving engine's step
    takes it: flattening an NNX State on every call cost 3.5 ms of host time at TP 1 and 5 ms at TP 2,
    as long as the TP-2 batch-1 step itself."""
    def decode(weights, kv_cache, step, backend=backend):
        model = nnx.merge(graphdef, jax.tree.unflatten(treedef, weights))
        logits, kv_cache = model(kv_cache, step, backend=backend)
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return step.replace(token_ids=step.token_ids.at[:tokens.shape[0]].set(tokens)), kv_cache, logits
    return decode


def random_decode(cfg: ModelConfig, mesh, dtype, backend: str):
    """(model, flat weights, unjitted decode(weights, kv_cache, step, backend=)) for random weights on `mesh`,
    with the kernels of the `backend` override (pallas_kernels.select_backend).
    On one device the projections are fused, as the serving engine fuses them (ModelRunner); split, XLA's
    dot merger concatenates the q/k/v weights at every step (bench/README.md, session 6)."""
    model = random_model(cfg, mesh, dtype)
    if mesh.size == 1:
        model.fuse_projections()
    graphdef, state = nnx.split(model)
    weights, treedef = jax.tree.flatten(state)
    spec = sharding.kv_cache_spec(model, mesh, PAGE)
    return model, weights, make_decode(graphdef, treedef, select_backend(mesh.devices.flat[0], spec, backend))


def local_bytes(tree) -> int:
    """Bytes of `tree` held by the first device (what that device reads when it reads all of it)."""
    dev = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == dev)


def time_steps(run, steps: int, repeats: int = 5) -> float:
    """Seconds per call: the median over `repeats` timings of `steps` back-to-back calls."""
    for _ in range(3):
        out = run()
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            out = run()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / steps)
    return float(np.median(times))


def bench_tp(cfg: ModelConfig, tp: int, batches, context: int, steps: int, dtype, backend: str, bandwidth):
    mesh = sharding.make_mesh(tp)
    model, weights, decode = random_decode(cfg, mesh, dtype, backend)
    decode = jax.jit(decode, donate_argnums=(1,))
    rows, first_logits = [], {}
    for batch in batches:
        cache = sharding.new_kv_cache(sharding.kv_cache_spec(model, mesh, PAGE), mesh, batch * -(-context // PAGE))
        step = sharding.replicate(decode_step_input(batch, context), mesh)
        holder = {"step": step, "cache": cache}

        def run():
            with jax.set_mesh(mesh):
                holder["step"], holder["cache"], logits = decode(weights, holder["cache"], holder["step"])
            return logits

        first_logits[batch] = sharding.to_host(run())[:, :1000].astype(np.float32)
        holder["step"] = step
        seconds = time_steps(run, steps)
        kv_read = batch * context * cfg.num_layers * 2 * cfg.head_dim * jnp.dtype(dtype).itemsize * \
            model.config.num_kv_heads // tp
        weight_bytes = local_bytes(weights)
        rows.append(dict(tp=tp, batch=batch, context=context, num_tokens=int(step.token_ids.shape[0]),
                         ms_per_step=seconds * 1e3, tokens_per_s=batch / seconds,
                         weight_bytes_per_device=weight_bytes, kv_bytes_per_device=kv_read,
                         mbu=(weight_bytes + kv_read) / bandwidth / seconds))
        del holder, cache
    return rows, first_logits


def bench_dp(cfg: ModelConfig, replicas: int, batch: int, context: int, steps: int, dtype, backend: str):
    """Tokens/s of `replicas` data-parallel replicas: one engine (jitted step) per replica on its own row
    of the mesh, dispatched from one Python loop, against one SPMD program vmapped over replicas."""
    tp = jax.device_count() // replicas
    mesh = sharding.make_mesh(tp, replicas)
    out = {"replicas": replicas, "tp": tp, "batch_per_replica": batch}

    engines = []
    for sub in sharding.replica_meshes(mesh):
        model, weights, decode = random_decode(cfg, sub, dtype, backend)
        engines.append(dict(mesh=sub, weights=weights, decode=jax.jit(decode, donate_argnums=(1,)),
                            cache=sharding.new_kv_cache(sharding.kv_cache_spec(model, sub, PAGE), sub, batch * -(-context // PAGE)),
                            step=sharding.replicate(decode_step_input(batch, context), sub)))

    def run_per_replica():
        for e in engines:  # dispatch is asynchronous: replicas run at the same time
            with jax.set_mesh(e["mesh"]):
                e["step"], e["cache"], logits = e["decode"](e["weights"], e["cache"], e["step"])
        return logits

    out["per_replica_tokens_per_s"] = replicas * batch / time_steps(run_per_replica, steps)
    del engines

    model, weights, decode = random_decode(cfg, mesh, dtype, backend)
    cache = sharding.new_replica_kv_cache(sharding.kv_cache_spec(model, mesh, PAGE), mesh, batch * -(-context // PAGE))
    step = sharding.stack_replicas([decode_step_input(batch, context)] * replicas, mesh)
    spmd = jax.jit(sharding.over_replicas(decode), donate_argnums=(1,))
    holder = {"step": step, "cache": cache}

    def run_spmd():
        with jax.set_mesh(mesh):
            holder["step"], holder["cache"], logits = spmd(weights, holder["cache"], holder["step"])
        return logits

    out["spmd_tokens_per_s"] = replicas * batch / time_steps(run_spmd, steps)
    return out


def targets(runs) -> dict[str, float]:
    """Issue 8's targets: batch-1 latency at TP n over TP 1 (<= 0.6 at TP 2), batch-1 MBU of the big shape."""
    out = {}
    by_key = {(r["model"], r["tp"], r["batch"]): r for r in runs}
    for (model, tp, batch), r in by_key.items():
        base = by_key.get((model, 1, batch))
        if batch == 1 and tp > 1 and base is not None:
            out[f"{model} batch-1 latency tp{tp}/tp1"] = r["ms_per_step"] / base["ms_per_step"]
        if batch == 1 and model == list(PRESETS[args.preset]["models"])[-1]:
            out[f"{model} batch-1 MBU tp{tp}"] = r["mbu"]
    return out


def engine_decode_rate(engine, num_seqs: int, context: int, steps: int, max_tokens: int, vocab: int) -> dict:
    """Decode tokens/s of `engine` over `steps` steps in which all num_seqs greedy sequences decode:
    prompts of `context` random tokens are prefilled first, then a few untimed steps compile the
    decode shape."""
    from jpaged.sampling_params import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    rng = np.random.default_rng(0)
    ids = [f"dp-{i}" for i in range(num_seqs)]
    for rid in ids:
        engine.add_request(rid, rng.integers(0, vocab, size=context).tolist(), params)
    started: set[str] = set()
    while len(started) < num_seqs:
        started |= {o.request_id for o in engine.step() if o.outputs[0].token_ids}
    for _ in range(4):
        engine.step()
    before = engine.stats()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    seconds = time.perf_counter() - start
    after = engine.stats()
    if after["num_running"] != num_seqs:
        raise RuntimeError(f"{after['num_running']} of {num_seqs} sequences still running after the timed steps "
                           "(finished or preempted): raise max_tokens or num_kv_blocks")
    for rid in ids:
        engine.abort(rid)
    return dict(tokens_per_s=(after["generation_tokens"] - before["generation_tokens"]) / seconds,
                ms_per_step=1e3 * seconds / steps,
                **{k: after[k] - before[k] for k in ("num_compilations", "num_preemptions")})


def bench_engine_dp(cfg: ModelConfig, replicas: int, batch: int, context: int, steps: int, backend: str) -> dict:
    """The serving engine with `replicas` data-parallel replicas x TP 1, `batch` sequences each, against
    one replica on one device with `batch` sequences: decode tokens/s of each (ideal speedup: replicas)."""
    import dataclasses

    from jpaged.config import EngineConfig
    from jpaged.engine.data_parallel import make_engine
    budget = min(2048, max(16, batch * context))
    max_tokens = -(-batch * context // budget) + steps + 16  # decode steps during prefill + warm-up + timed
    max_len = context + max_tokens
    config = EngineConfig(model="random", dtype="bfloat16", block_size=PAGE, max_num_seqs=batch,
                          max_num_batched_tokens=budget, max_model_len=max_len, enable_prefix_caching=False,
                          num_kv_blocks=batch * -(-max_len // PAGE) + 16, backend=backend)
    model = common.random_model(cfg, "bfloat16")  # on the first device; other replicas copy it to theirs
    out = dict(replicas=replicas, tp=1, batch_per_replica=batch, context=context, steps=steps,
               engine=dict(max_num_batched_tokens=budget, max_model_len=max_len, num_kv_blocks=config.num_kv_blocks))
    for name, dp in (("one_replica", 1), ("data_parallel", replicas)):
        engine = make_engine(dataclasses.replace(config, data_parallel_size=dp), model=model,
                             tokenizer=common.IdTokenizer())
        out[name] = engine_decode_rate(engine, dp * batch, context, steps, max_tokens, cfg.vocab_size)
        del engine
    out["speedup"] = out["data_parallel"]["tokens_per_s"] / out["one_replica"]["tokens_per_s"]
    return out


def measure_bandwidth() -> tuple[float, list[float]]:
    """bench.common.copy_bandwidth on every local device; (median, per device)."""
    per_device = [common.copy_bandwidth(device=d, warmup_s=0.3 if d.platform == "gpu" else 0.0)
                  for d in jax.local_devices()]
    return float(np.median(per_device)), per_device


def tp_sweep(preset: dict, steps: int, dtype, bandwidth: float) -> list[dict]:
    """bench_tp over every model and TP size of the preset; each TP size's logits checked against the first."""
    tp_override = tuple(int(t) for t in args.tp.split(",")) if args.tp else None
    runs = []
    print(f"{'model':<12} {'tp':>3} {'batch':>5} {'ms/step':>9} {'tok/s':>10} {'MBU':>6}  "
          f"(copy bandwidth {bandwidth / 1e9:.0f} GB/s, ctx {preset['context']})")
    for label, (config_name, tps) in preset["models"].items():
        cfg = load_config(config_name)
        tps = tuple(t for t in (tp_override or tps) if t <= jax.device_count() and ("70b" not in label or t >= 2))
        reference = None
        for tp in tps:
            rows, logits = bench_tp(cfg, tp, preset["batches"], preset["context"], steps, dtype, args.backend,
                                    bandwidth)
            if reference is None:
                reference = (tp, logits)
            for row in rows:
                diff = float(np.abs(logits[row["batch"]] - reference[1][row["batch"]]).max())
                scale = float(np.abs(reference[1][row["batch"]]).max())
                # bf16: at TP > 1 the row-parallel GEMMs' partial sums are rounded to bf16 before the
                # all-reduce, which moves random-weight logits by up to ~5 % of their scale (0.28 at
                # 5.4 for Llama-3-8B at batch 64 on the H200); a wrong shard layout moves them by O(scale).
                if diff > 0.1 * scale + 1e-3:
                    raise SystemExit(f"{label} tp={tp}: logits differ from tp={reference[0]} by {diff} (scale {scale})")
                row.update(model=label, max_logit_diff_vs_tp=[reference[0], diff])
                runs.append(row)
                print(f"{label:<12} {tp:>3} {row['batch']:>5} {row['ms_per_step']:>9.2f} "
                      f"{row['tokens_per_s']:>10.1f} {row['mbu']:>6.2f}")
    return runs


def main():
    preset = PRESETS[args.preset]
    dtype = jnp.bfloat16
    steps = args.steps or preset["steps"]
    device = jax.devices()[0]
    bandwidth, per_device = measure_bandwidth()
    result = dict(bench="multi_gpu", command="python " + " ".join(sys.argv), xla_flags=os.environ.get("XLA_FLAGS", ""),
                  preset=args.preset, device=device.device_kind, platform=device.platform,
                  num_devices=jax.device_count(), jax=jax.__version__, flax=flax.__version__,
                  python=platform.python_version(), backend=args.backend, dtype="bfloat16",
                  copy_bandwidth_bytes_per_s=bandwidth, copy_bandwidth_per_device=per_device, runs=[])
    print("copy bandwidth GB/s per device: " + ", ".join(f"{b / 1e9:.0f}" for b in per_device))
    if args.tp_sweep:
        result["runs"] = tp_sweep(preset, steps, dtype, bandwidth)
        result["targets"] = targets(result["runs"])
        for name, value in result["targets"].items():
            print(f"{name}: {value:.2f}")
    first_model = load_config(next(iter(preset["models"].values()))[0])
    if args.dp:
        result["data_parallel"] = bench_dp(first_model, args.dp, preset["batches"][-1], preset["context"], steps,
                                           dtype, args.backend)
        dp = result["data_parallel"]
        print(f"data parallel x{dp['replicas']} (tp {dp['tp']}, batch {dp['batch_per_replica']} each): "
              f"one engine per replica {dp['per_replica_tokens_per_s']:.1f} tok/s, "
              f"one SPMD program {dp['spmd_tokens_per_s']:.1f} tok/s")
    if args.engine_dp:
        if args.engine_dp > jax.device_count():
            raise SystemExit(f"--engine-dp {args.engine_dp} needs that many devices, {jax.device_count()} present")
        result["data_parallel_engine"] = e = bench_engine_dp(
            first_model, args.engine_dp, preset["batches"][-1], preset["context"], steps, args.backend)
        print(f"serving engine, batch {e['batch_per_replica']} per replica, ctx {e['context']}: "
              f"1 replica {e['one_replica']['tokens_per_s']:.1f} tok/s, {e['replicas']} replicas "
              f"{e['data_parallel']['tokens_per_s']:.1f} tok/s ({e['speedup']:.2f}x)")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
