"""Where a tensor-parallel decode step's time goes, per GPU: ms per step and host launch time for
several token paddings, and a profiler trace of the batch-1 step summarised per device (busy fraction,
time in collectives, the longest kernels).

  PYTHONPATH=. python bench/tp_step_profile.py --model llama3-8b --tp 1,2 --tokens 2,4,8,16 \\
      --out bench/results/tp_step_profile.json
  PYTHONPATH=. python bench/tp_step_profile.py --tp 1 --batch 221 --context 640 --prefill 512,512,512,291 \\
      --tokens 2048 --slots 256 --mixed-split both      # the 8B throughput run's mixed step, one GPU

Weights are random, drawn on the devices under their shardings (bench/multi_gpu.py). `--tokens` pads a
batch the way the serving engine pads it (jpaged.engine.model_runner.token_buckets); the trace is taken
at `--trace-tokens`. XLA flags apply per process: run the script once per XLA_FLAGS variant. The
launch time is how long one call takes to return when the device queue is empty; where it exceeds the
device's busy time per step, the step is bound by the host.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import gzip
import json
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (KINDS.md)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common, multi_gpu as mg  # noqa: E402
from bench.trace_steps import merge_intervals  # noqa: E402
from jpaged import sharding  # noqa: E402

COLLECTIVE_NAMES = ("nccl", "all_reduce", "allreduce", "all-reduce", "all_gather", "collective")


def summarize_per_device(trace_path, steps: int, top: int = 14) -> dict:
    """{device: busy fraction, busy and collective microseconds per step, top kernels} from a
    jax.profiler perfetto trace of `steps` steps."""
    with gzip.open(trace_path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    process = {e["pid"]: e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name"}
    by_device = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and "dur" in e and "GPU" in process.get(e["pid"], ""):
            by_device[process[e["pid"]]].append(e)
    out = {}
    for device, evs in sorted(by_device.items()):
        intervals = merge_intervals([(e["ts"], e["ts"] + e["dur"]) for e in evs])
        window = intervals[-1][1] - intervals[0][0]
        busy = sum(b - a for a, b in intervals)
        total, count = collections.Counter(), collections.Counter()
        for e in evs:
            total[e["name"][:70]] += e["dur"]
            count[e["name"][:70]] += 1
        collective = sum(t for name, t in total.items() if any(c in name.lower() for c in COLLECTIVE_NAMES))
        out[device] = dict(busy_fraction=busy / window, busy_us_per_step=busy / steps,
                           collective_us_per_step=collective / steps,
                           top_kernels=[(name, round(t / steps, 1), count[name] // steps)
                                        for name, t in total.most_common(top)])
    return out


def profile(model_name: str, tp: int, batch: int, tokens, trace_tokens: int, backend: str, context: int,
            prefill=(), slots: int | None = None, splits=(True,), top: int = 14,
            max_prefill_seqs: int | None = None) -> list:
    """Rows of ms/step, launch time and (at `trace_tokens`) the trace summary: `batch` decodes at `context`,
    plus whole prompts of the `prefill` lengths (a mixed step), padded to each of `tokens` tokens and
    `slots` sequence rows (default: as many as tokens); once per mixed-batch split setting in `splits`.
    `max_prefill_seqs`: the static bound the engine's scheduler puts in its steps (StepInput)."""
    from pallas_kernels import select_backend

    cfg = mg.load_config(model_name)
    mesh = sharding.make_mesh(tp)
    model, weights, decode_fn = mg.random_decode(cfg, mesh, jnp.bfloat16, backend)
    q_lens, kv_lens = [1] * batch + list(prefill), [context] * batch + list(prefill)
    pages = len(q_lens) * -(-max(kv_lens) // mg.PAGE)
    rows = []
    base = select_backend(mesh.devices.flat[0], sharding.kv_cache_spec(model, mesh, mg.PAGE), backend)
    for split in splits:
        decode = jax.jit(functools.partial(decode_fn, backend=dataclasses.replace(base, split_mixed=split)),
                         donate_argnums=(1,))
        for num_tokens in tokens:
            if num_tokens < sum(q_lens):
                continue
            step = dataclasses.replace(mg.ragged_step_input(q_lens, kv_lens, num_tokens, slots or num_tokens),
                                       max_prefill_seqs=max_prefill_seqs)
            held = {"cache": sharding.new_kv_cache(sharding.kv_cache_spec(model, mesh, mg.PAGE), mesh, pages),
                    "step": sharding.replicate(step, mesh)}

            def run():
                with jax.set_mesh(mesh):
                    held["step"], held["cache"], logits = decode(weights, held["cache"], held["step"])
                return logits

            start = time.perf_counter()
            jax.block_until_ready(run())
            compile_s = time.perf_counter() - start
            seconds = mg.time_steps(run, 20)
            launch = []
            for _ in range(10):
                jax.block_until_ready(held["step"])
                start = time.perf_counter()
                run()
                launch.append(time.perf_counter() - start)
            row = dict(model=model_name, tp=tp, batch=batch, prefill=list(prefill), num_tokens=num_tokens,
                       num_slots=slots or num_tokens, context=context, backend=backend, mixed_split=split,
                       max_prefill_seqs=max_prefill_seqs,
                       compile_s=compile_s, ms_per_step=1e3 * seconds,
                       launch_ms_median=1e3 * float(np.median(launch)),
                       weight_bytes_per_device=mg.local_bytes(weights))
            if num_tokens == trace_tokens:
                with tempfile.TemporaryDirectory() as trace_dir:
                    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                        for _ in range(8):
                            logits = run()
                        jax.block_until_ready(logits)
                    path = sorted(pathlib.Path(trace_dir).rglob("perfetto_trace.json.gz"))[-1]
                    row["trace"] = summarize_per_device(path, 8, top)
            print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
            for device, summary in row.get("trace", {}).items():
                print(f"  {device}: busy {summary['busy_fraction']:.2f}, {summary['busy_us_per_step']:.0f} us/step, "
                      f"collectives {summary['collective_us_per_step']:.0f} us/step", flush=True)
                for kernel in summary["top_kernels"]:
                    print("    ", kernel, flush=True)
            rows.append(row)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama3-8b", help="configs/ preset")
    p.add_argument("--tp", default="1,2", help="comma-separated TP sizes")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", default="4,16", help="comma-separated token paddings")
    p.add_argument("--trace-tokens", type=int, help="the padding traced (default the first)")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--backend", "--attn-impl", dest="backend", default="mosaic")
    p.add_argument("--prefill", default="", help="comma-separated prompt lengths prefilled in the same step "
                   "(a mixed step, e.g. 512,512,512,291 beside --batch 221 --context 640)")
    p.add_argument("--slots", type=int, help="sequence rows of the step (default: as many as tokens)")
    p.add_argument("--mixed-split", default="on", choices=("on", "off", "both"),
                   help="Backend.split_mixed for the step; both: one run each, same weights")
    p.add_argument("--max-prefill-seqs", type=int, help="StepInput.max_prefill_seqs (the engine passes "
                   "EngineConfig.max_num_prefill_seqs; default here: none)")
    p.add_argument("--top", type=int, default=14, help="kernels listed per device")
    p.add_argument("--out", default="bench/results/tp_step_profile.json")
    args = p.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",")]
    rows = []
    for tp in (int(t) for t in args.tp.split(",")):
        rows += profile(args.model, tp, args.batch, tokens, args.trace_tokens or tokens[0], args.backend,
                        args.context, prefill=[int(n) for n in args.prefill.split(",") if n], slots=args.slots,
                        splits={"on": (True,), "off": (False,), "both": (True, False)}[args.mixed_split],
                        top=args.top, max_prefill_seqs=args.max_prefill_seqs)
    result = dict(bench="tp_step_profile", command="python " + " ".join(sys.argv),
                  xla_flags=os.environ.get("XLA_FLAGS", ""), device=jax.devices()[0].device_kind,
                  num_devices=jax.device_count(), jax=jax.__version__, rows=rows)
    print(f"wrote {common.write_json(result, args.out, 'tp_step_profile')}")


if __name__ == "__main__":
    main()
