"""Multi-LoRA step cost: the model's jitted forward with adapters in device slots against the base model
alone, for both LoRA implementations (Backend.lora "masked" and "ragged"), on one random-weight model.

Workloads (Llama-3-8B shape by default): a batch-64 decode step (each sequence at a 512-token context)
with 8 distinct rank-16 adapters on all seven targets (q/k/v/o/gate/up/down; tokens interleaved over
the adapters), and a 4 x 1024-token prefill with 4 adapters (one per sequence). Each is timed as the
base model (no LoRA argument) and with every token through an adapter (`--all-base` adds LoRA on with
every token on the base: slots loaded, index -1); the ratios are to the base model measured in the
same run. Each variant compiles the 8B step once (about six compilations by default).
Adapter weights are random, written straight into the slots' layout (jpaged/lora/manager.py).

  PYTHONPATH=. python -m bench.lora --out bench/results/lora_h100.json
  PYTHONPATH=. python -m bench.lora --tiny --out /tmp/lora_tiny.json     # CPU check of the program
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from bench import common

IMPLS = ("masked", "ragged")


def slot_weights(cfg, num_slots: int, rank: int, dtype, seed: int = 0):
    """Random per-layer {projection: (A [Din, L, kR], B [L, kR, Dout])}, the manager's device layout for
    the fused model (q/k/v and gate/up each one projection of k targets)."""
    import jax
    import jax.numpy as jnp

    from jpaged.lora.manager import slot_layout

    key = jax.random.key(seed)
    draw = jax.jit(lambda k, shape: jax.random.normal(k, shape, dtype) * jnp.asarray(0.01, dtype),
                   static_argnums=1)
    layers = []
    for i in range(cfg.num_layers):
        layer = {}
        for j, (name, (members, din, dout)) in enumerate(slot_layout(cfg, fused=True).items()):
            k = jax.random.fold_in(key, i * 16 + j)
            layer[name] = (draw(jax.random.fold_in(k, 0), (din, num_slots, len(members) * rank)),
                           draw(jax.random.fold_in(k, 1), (num_slots, len(members) * rank, dout)))
        layers.append(layer)
    return tuple(layers)


def step_input(lengths: list[int], contexts: list[int], page_size: int, lora_index):
    """A StepInput of len(lengths) sequences, sequence i computing lengths[i] tokens that end at
    contexts[i], on distinct pages; lora_index [T] or None."""
    from models.kv_cache import StepInput

    s, t = len(lengths), sum(lengths)
    pages_per_seq = -(-max(contexts) // page_size)
    page_table = np.arange(s * pages_per_seq, dtype=np.int32).reshape(s, pages_per_seq)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    positions = np.concatenate([np.arange(c - n, c) for n, c in zip(lengths, contexts)]).astype(np.int32)
    seq_of = np.repeat(np.arange(s), lengths)
    slots = page_table[seq_of, positions // page_size] * page_size + positions % page_size
    return StepInput(token_ids=np.arange(t, dtype=np.int32) % 97, positions=positions, cu_q_lens=cu,
                     kv_lens=np.asarray(contexts, np.int32), page_table=page_table,
                     slot_mapping=slots.astype(np.int32), logits_index=(cu[1:] - 1).astype(np.int32),
                     num_seqs=np.int32(s), max_prefill_seqs=max(1, s),
                     lora_index=None if lora_index is None else np.asarray(lora_index, np.int32)), s * pages_per_seq


def time_forward(model, spec, backend, step, num_pages: int, lora, reps: int) -> float:
    """Mean seconds of the jitted forward (model + the donated KV write), called back to back."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    weights, treedef = jax.tree.flatten(state)

    def forward(weights, kv_cache, step, lora):
        m = nnx.merge(graphdef, jax.tree.unflatten(treedef, weights))
        return m(kv_cache, step, backend=backend, lora=lora)

    fn = jax.jit(forward, donate_argnums=1)
    kv = spec.create(num_pages)
    step = jax.device_put(step)
    for _ in range(2):
        logits, kv = fn(weights, kv, step, lora)
    jax.block_until_ready((logits, kv))
    start = time.perf_counter()
    for _ in range(reps):
        logits, kv = fn(weights, kv, step, lora)
    jax.block_until_ready((logits, kv))
    return (time.perf_counter() - start) / reps


def run_workload(name, model, spec, base_backend, lengths, contexts, num_adapters, slots, reps, all_base) -> dict:
    t = sum(lengths)
    per_token = np.arange(t) % num_adapters if name == "decode" else np.repeat(np.arange(len(lengths)), lengths)
    figures = {}
    base_step, pages = step_input(lengths, contexts, spec.page_size, None)
    figures["base_ms"] = 1e3 * time_forward(model, spec, base_backend, base_step, pages, None, reps)
    for impl in IMPLS:
        backend = dataclasses.replace(base_backend, lora=impl)
        try:
            variants = [("adapters", per_token % num_adapters)] + ([("all_base", np.full(t, -1))] if all_base else [])
            for label, index in variants:
                step, _ = step_input(lengths, contexts, spec.page_size, index)
                ms = 1e3 * time_forward(model, spec, backend, step, pages, slots, reps)
                figures[f"{impl}_{label}_ms"] = ms
                figures[f"{impl}_{label}_ratio"] = ms / figures["base_ms"]
        except Exception as e:  # one implementation failing to lower on a device is a finding, not a crash
            figures[f"{impl}_error"] = f"{type(e).__name__}: {e}"[:500]
    print(name, {k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}, flush=True)
    return figures


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama3-8b", help="configs/ preset or config.json path")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    common.add_backend_flag(p)
    p.add_argument("--decode-batch", type=int, default=64)
    p.add_argument("--decode-context", type=int, default=512)
    p.add_argument("--decode-adapters", type=int, default=8)
    p.add_argument("--prefill-seqs", type=int, default=4)
    p.add_argument("--prefill-len", type=int, default=1024)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--all-base", action="store_true", help="also time LoRA on with every token on the base model")
    p.add_argument("--tiny", action="store_true", help="tiny-llama, small batches, few reps (CPU check)")
    p.add_argument("--out", help="JSON path (default bench/results/lora_<device>.json)")
    args = p.parse_args(argv)
    if args.tiny:
        args.model, args.dtype, args.reps = "tiny-llama", "float32", 3
        args.decode_batch, args.decode_context, args.prefill_len, args.rank = 8, 64, 64, 4
    common.prepare_memory(with_torch=False)
    import jax

    from models.kv_cache import KVCacheSpec
    from pallas_kernels import select_backend

    cfg = common.model_config(args.model)
    model = common.random_model(cfg, args.dtype)
    model.fuse_projections()  # as the engine serves one device
    spec = KVCacheSpec.for_model(cfg, 16, model.dtype)
    backend = select_backend(jax.devices()[0], spec, args.backend)
    num_slots = max(args.decode_adapters, args.prefill_seqs)
    slots = slot_weights(cfg, num_slots, args.rank, model.dtype)
    result = dict(benchmark="lora", command=common.command_line(argv, "lora"), device=common.device_info(),
                  model=args.model, shape=common.model_shape(cfg, args.dtype), backend=backend.describe(),
                  lora=dict(rank=args.rank, slots=num_slots, targets=7),
                  workloads=dict(decode=dict(batch=args.decode_batch, context=args.decode_context,
                                             adapters=args.decode_adapters),
                                 prefill=dict(seqs=args.prefill_seqs, tokens=args.prefill_len,
                                              adapters=args.prefill_seqs)),
                  targets=dict(decode_ratio=1.25, prefill_ratio=1.3), figures={})
    print(f"jax {jax.__version__}, {result['device']['device_kind']}, backend {backend.describe()}", flush=True)
    result["figures"]["decode"] = run_workload(
        "decode", model, spec, backend, [1] * args.decode_batch, [args.decode_context] * args.decode_batch,
        args.decode_adapters, slots, args.reps, args.all_base)
    result["figures"]["prefill"] = run_workload(
        "prefill", model, spec, backend, [args.prefill_len] * args.prefill_seqs,
        [args.prefill_len] * args.prefill_seqs, args.prefill_seqs, slots, max(3, args.reps // 3), args.all_base)
    path = common.write_json(result, args.out, "lora")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
