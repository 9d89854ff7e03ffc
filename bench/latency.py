"""Decode latency through the engine, against the memory-bandwidth floor, and where a step's time goes.

  PYTHONPATH=. python -m bench.latency                       # Llama-3-8B shape, batch 1 and 64
  PYTHONPATH=. python -m bench.latency --hf --profile        # + HF transformers, + the step split

Batch 1: a 128-token prompt, 256 new tokens (greedy, EOS ignored); decode tok/s = 1 / mean time of
the engine steps in which the sequence decodes. Floor = bytes a decode step must read (every weight,
only the used rows of an untied embedding table, the K/V of the mean context) / the copy bandwidth
measured in this run; MBU = floor / step time. The raw jitted step, called in a loop with the same
inputs and no host work, gives the device time; engine step - raw step = host overhead, reported
again at batch 64 (the issue wants < 10%). `--profile` reruns both with timers around the engine's
phases (scheduling, input packing, sampling tensors, host->device, device, device->host,
postprocess) and estimates the device split (attention, sampling, the rest) by timing those alone.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Sequence

import numpy as np

from bench import common

NAME = "latency"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_engine_flags(p, max_num_seqs=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=64, help="batch for the host-overhead figure")
    p.add_argument("--batch-new-tokens", type=int, default=128, help="new tokens per sequence at --batch")
    p.add_argument("--raw-reps", type=int, default=50, help="raw jitted steps timed per figure")
    p.add_argument("--profile", action="store_true", help="also split step time into its phases")
    p.add_argument("--hf", action="store_true", help="also measure HF transformers generate (batch 1)")
    p.add_argument("--hf-modes", default="eager,static", help="HF modes: eager, static, compile")
    p.add_argument("--hf-new-tokens", type=int, help="new tokens in the HF runs (default --new-tokens)")
    args = p.parse_args(argv)
    for flag in ("prompt_len", "batch", "raw_reps"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for flag in ("new_tokens", "batch_new_tokens"):
        if getattr(args, flag) < 3:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 3 (a prefill and two decodes)")
    if args.hf_new_tokens is not None and args.hf_new_tokens < 2:
        raise ValueError(f"--hf-new-tokens must be >= 2, got {args.hf_new_tokens}")
    if args.batch > args.max_num_seqs:
        raise ValueError(f"--batch ({args.batch}) must be <= --max-num-seqs ({args.max_num_seqs})")
    return args


class StepProfiler(common.StepRecorder):
    """StepRecorder that also keeps the last jitted call's inputs and, with `split`, times the
    runner's phases, blocking after the transfer and after the device work to separate them."""

    def __init__(self, engine, *, split: bool):
        super().__init__(engine)
        from jpaged import sampling

        self.split = split
        self.last_call = None
        self.decode_calls = {}  # num sequences -> jitted calls of the steps in which that many decoded
        runner = engine.runner
        self._patch(runner.calls, "step", self._captured_jit)
        if split:
            self._patch(runner, "launch", lambda fn: self.timed("execute", fn))
            self._patch(runner, "fetch", lambda fn: self.timed("execute", fn))
            self._patch(runner, "build_step_input", lambda fn: self.timed("build_step_input", fn))
            self._patch(sampling.SamplingTensors, "from_params", lambda fn: self.timed("sampling_prep", fn))

    def _captured_jit(self, jit_step):
        import jax

        def wrapper(*args, **kwargs):
            # args: weights, kv_cache, int buffer, float buffer, base key, previous step's tokens
            # (jpaged/engine/model_runner.py make_step_fn); returns packed samples, tokens, kv_cache
            self.last_call = (args, kwargs)
            if self._current is not None and self._current.is_decode:
                self.decode_calls.setdefault(self._current.num_entries, []).append((args, kwargs))
            if not self.split:
                return jit_step(*args, **kwargs)
            start = time.perf_counter()
            buffers = jax.block_until_ready(jax.device_put(args[2:4]))
            self.phase("host_to_device", time.perf_counter() - start)
            start = time.perf_counter()
            outputs = jit_step(*args[:2], *buffers, *args[4:], **kwargs)
            jax.block_until_ready(outputs[0])
            self.phase("device", time.perf_counter() - start)
            return outputs
        return wrapper


def run_batch(llm, prompts, new_tokens: int, *, split: bool = False) -> StepProfiler:
    from jpaged.sampling_params import SamplingParams

    profiler = StepProfiler(llm.engine, split=split)
    try:
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True),
                     use_tqdm=False)
    finally:
        profiler.close()
    return profiler


def decode_call(profiler: StepProfiler, num_seqs: int):
    """The captured call of a step in which `num_seqs` sequences decoded. Not simply the last call:
    sequences admitted in different steps finish in different steps, so the last steps of a batch
    run fewer sequences (comparing with them understated the raw step at batch 64 by up to 25 %).
    The middle one of those steps, so its context is the mean context of the timed steps."""
    calls = profiler.decode_calls.get(num_seqs)
    return calls[len(calls) // 2] if calls else profiler.last_call


def raw_step_seconds(runner, call, reps: int) -> float:
    """Mean seconds of the runner's jitted step called back to back on one decode batch (no host work)."""
    import jax

    args, kwargs = call
    inputs = tuple(jax.device_put(args[2:4])) + tuple(args[4:])
    kv_cache = runner.kv_cache
    for _ in range(2):
        out, _, kv_cache = runner.calls["step"](runner.weights, kv_cache, *inputs, **kwargs)
    jax.block_until_ready((out, kv_cache))
    start = time.perf_counter()
    for _ in range(reps):
        out, _, kv_cache = runner.calls["step"](runner.weights, kv_cache, *inputs, **kwargs)
    jax.block_until_ready((out, kv_cache))
    seconds = (time.perf_counter() - start) / reps
    runner.kv_cache = kv_cache
    return seconds


def _time_jitted(fn, *args, reps: int = 20) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(reps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / reps


def device_split(runner, call) -> dict:
    """Attention (all layers) and sampling of the captured decode batch, each timed alone, in ms."""
    import jax
    import jax.numpy as jnp

    import pallas_kernels
    from jpaged import sampling
    from jpaged.engine import packing

    cfg = runner.model_config
    args, kwargs = call
    step, tensors, *_ = packing.unpack(jnp.asarray(args[2]), jnp.asarray(args[3]), kwargs["layout"])
    key = args[4]
    k_pages, v_pages = runner.kv_cache.k[0], runner.kv_cache.v[0]
    q = jax.random.normal(jax.random.key(0), (step.num_tokens, cfg.num_heads, cfg.head_dim), k_pages.dtype)
    attend = jax.jit(lambda q, k, v, s: pallas_kernels.ragged_paged_attention(
        q, k, v, s.kv_lens, s.page_table, s.cu_q_lens, s.num_seqs, sm_scale=cfg.head_dim ** -0.5,
        sliding_window=cfg.sliding_window, backend=runner.backend))
    logits = jax.random.normal(jax.random.key(1), (tensors.num_rows, cfg.vocab_size), jnp.float32)
    sample = jax.jit(lambda lg, t, k: sampling.sample(lg, t, k, num_top_logprobs=kwargs["num_top_logprobs"]))
    return dict(attention_all_layers_ms=1e3 * cfg.num_layers * _time_jitted(attend, q, k_pages, v_pages, step),
                sampling_ms=1e3 * _time_jitted(sample, logits, tensors, key))


def phase_split(profiler: StepProfiler, batch: int) -> dict:
    """Mean ms per decode step of each phase; d2h and postprocess are what the timers leave over."""
    steps = profiler.decode_steps(batch)
    mean = lambda name: 1e3 * statistics.fmean(s.phases.get(name, 0.0) for s in steps)  # noqa: E731
    execute = mean("execute")
    split = dict(
        step_ms=1e3 * statistics.fmean(s.seconds for s in steps),
        host_schedule_ms=mean("schedule"), host_build_step_input_ms=mean("build_step_input"),
        host_sampling_prep_ms=mean("sampling_prep"), host_to_device_ms=mean("host_to_device"),
        device_ms=mean("device"))
    split["device_to_host_ms"] = execute - sum(split[k] for k in (
        "host_build_step_input_ms", "host_sampling_prep_ms", "host_to_device_ms", "device_ms"))
    split["host_postprocess_ms"] = split["step_ms"] - split["host_schedule_ms"] - execute
    split["num_steps"] = len(steps)
    return split


def bytes_floor(model, dtype_name: str, bandwidth: float, batch: int, mean_context: float) -> dict:
    cfg = model.config
    kv = batch * mean_context * common.kv_bytes_per_token(cfg, dtype_name)
    read = common.weight_bytes_read_per_step(model, batch) + kv
    every_weight = common.weight_bytes(model) + kv
    return dict(bytes_per_step=read, floor_ms=1e3 * read / bandwidth,
                floor_all_weights_ms=1e3 * every_weight / bandwidth, mean_context=mean_context)


def measure(llm, model, args, batch: int, new_tokens: int, bandwidth: float, rng) -> dict:
    """Warm-up run, timed run, raw step: the figures of one batch size."""
    vocab = model.config.vocab_size
    run_batch(llm, common.random_prompts(rng, [args.prompt_len] * batch, vocab), new_tokens)
    compiled = llm.engine.runner.num_compilations
    timed = run_batch(llm, common.random_prompts(rng, [args.prompt_len] * batch, vocab), new_tokens)
    compiled = llm.engine.runner.num_compilations - compiled
    decodes = timed.decode_steps(batch)
    if not decodes or timed.last_call is None:
        raise ValueError(f"no step decoded all {batch} sequences at once; raise --max-num-seqs or the token budget")
    step_s = statistics.fmean(s.seconds for s in decodes)
    raw_s = raw_step_seconds(llm.engine.runner, decode_call(timed, batch), args.raw_reps)
    floor = bytes_floor(model, args.dtype, bandwidth, batch, args.prompt_len + new_tokens / 2)
    figures = dict(
        batch=batch, decode_steps=len(decodes), step_ms=1e3 * step_s,
        step_ms_median=1e3 * statistics.median(s.seconds for s in decodes),
        decode_tok_s=batch / step_s, raw_step_ms=1e3 * raw_s, raw_decode_tok_s=batch / raw_s,
        host_overhead_ms=1e3 * (step_s - raw_s), host_overhead_fraction=(step_s - raw_s) / step_s,
        ttft_ms=1e3 * timed.records[0].seconds, total_s=sum(s.seconds for s in timed.records),
        mbu=floor["floor_ms"] / (1e3 * step_s), raw_mbu=floor["floor_ms"] / (1e3 * raw_s),
        compilations_during_timed_run=compiled, **floor)
    if args.profile:
        profiled = run_batch(llm, common.random_prompts(rng, [args.prompt_len] * batch, vocab), new_tokens,
                             split=True)
        split = phase_split(profiled, batch)
        split |= device_split(llm.engine.runner, decode_call(profiled, batch))
        split["device_other_ms"] = split["device_ms"] - split["attention_all_layers_ms"] - split["sampling_ms"]
        figures["profile"] = split
    return figures


def run_hf(cfg, args) -> dict:
    from bench import hf_baseline

    model = hf_baseline.build_model(cfg, args.dtype)
    try:
        return dict(versions=hf_baseline.versions(), batch1=hf_baseline.latency(
            cfg, prompt_len=args.prompt_len, new_tokens=args.hf_new_tokens or args.new_tokens,
            modes=hf_baseline.parse_modes(args.hf_modes), model=model))
    finally:
        del model
        hf_baseline.release()


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    common.prepare_memory(with_torch=args.hf)
    cfg = common.model_config(args.model)
    hf = run_hf(cfg, args) if args.hf else None
    bandwidth = common.copy_bandwidth()
    start = time.perf_counter()
    model = common.random_model(cfg, args.dtype)
    build_s = time.perf_counter() - start
    max_len = args.prompt_len + max(args.new_tokens, args.batch_new_tokens)
    llm = common.make_llm(model, args.dtype, **common.engine_kwargs(args, max_len, enable_prefix_caching=False))
    rng = np.random.default_rng(0)
    result = dict(
        benchmark=NAME, command=common.command_line(argv, NAME), device=common.device_info(),
        model=args.model, model_shape=common.model_shape(cfg, args.dtype),
        weight_bytes=common.weight_bytes(model), model_build_s=build_s,
        engine=dict(backend=llm.engine.runner.backend.describe(), block_size=args.block_size,
                    max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                    num_kv_pages=llm.engine.runner.num_pages),
        workload=dict(prompt_len=args.prompt_len, new_tokens=args.new_tokens, batch=args.batch,
                      hf_new_tokens=args.hf_new_tokens or args.new_tokens,
                      batch_new_tokens=args.batch_new_tokens, prompts="random token ids", greedy=True,
                      ignore_eos=True),
        copy_bandwidth_bytes_s=bandwidth,
        batch1=measure(llm, model, args, 1, args.new_tokens, bandwidth, rng),
        batched=measure(llm, model, args, args.batch, args.batch_new_tokens, bandwidth, rng),
        baselines=dict(hf_transformers=hf) if hf else {})
    print_results(result)
    print(f"\nwrote {common.write_json(result, args.out, NAME)}")
    return result


def print_results(r: dict) -> None:
    b1, bb = r["batch1"], r["batched"]
    rows = [("device", r["device"]["device_kind"]), ("backend", r["engine"]["backend"]),
            ("copy bandwidth GB/s", r["copy_bandwidth_bytes_s"] / 1e9),
            ("batch 1 decode tok/s", b1["decode_tok_s"]), ("batch 1 step ms", b1["step_ms"]),
            ("batch 1 raw jitted step ms", b1["raw_step_ms"]), ("batch 1 floor ms", b1["floor_ms"]),
            ("batch 1 MBU (engine / raw step)", f"{b1['mbu']:.3f} / {b1['raw_mbu']:.3f}"),
            (f"batch {bb['batch']} decode tok/s", bb["decode_tok_s"]),
            (f"batch {bb['batch']} step / raw ms", f"{bb['step_ms']:.2f} / {bb['raw_step_ms']:.2f}"),
            (f"batch {bb['batch']} host overhead", f"{100 * bb['host_overhead_fraction']:.1f} %"),
            ("compilations while timed", b1["compilations_during_timed_run"] + bb["compilations_during_timed_run"])]
    for mode, h in (r["baselines"].get("hf_transformers") or {}).get("batch1", {}).items():
        rows.append((f"HF {mode} batch 1 decode tok/s", h.get("decode_tok_s", h.get("error"))))
    common.print_table(f"decode latency, {r['model']}", rows)
    for label, fig in (("batch 1", b1), (f"batch {bb['batch']}", bb)):
        if "profile" in fig:
            common.print_table(f"profile, {label}, ms per decode step",
                               [(k, v) for k, v in fig["profile"].items()])


if __name__ == "__main__":
    main()
