"""HF transformers `generate` on the same device: the baseline every engine figure is set beside.

  PYTHONPATH=. python -m bench.hf_baseline --model llama3-8b            # latency and throughput
  PYTHONPATH=. python -m bench.hf_baseline --modes eager,static,compile  # also the compiled static cache

Random bf16 weights of the preset's shape, built on the device (`torch.device` context +
`from_config`), SDPA attention, greedy, EOS never ends a sequence (min_new_tokens = max_new_tokens).
Modes: `eager` (dynamic cache), `static` (static cache, not compiled), `compile` (static cache with
generate's own torch.compile). A mode that fails is recorded with its error, not raised.
`latency()` and `throughput()` are called by bench/latency.py and bench/throughput.py with `--hf`
before JAX allocates anything; `release()` hands torch's memory back for the JAX run that follows.
"""
from __future__ import annotations

import argparse
import gc
import time
from typing import Sequence

MODES = ("eager", "static", "compile")


def _torch():
    import torch

    return torch


def device_name() -> str:
    return "cuda" if _torch().cuda.is_available() else "cpu"


def build_model(cfg, dtype_name: str = "bfloat16"):
    """A random-weight HF model of `cfg`'s shape, created on the device in `dtype_name`."""
    torch = _torch()
    import transformers

    hf = cfg.to_hf()
    config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    torch.manual_seed(0)
    with torch.device(device_name()):
        model = transformers.AutoModelForCausalLM.from_config(
            config, dtype=getattr(torch, dtype_name), attn_implementation="sdpa")
    return model.eval()


def release(model=None) -> None:
    """Drops torch's cached device memory so JAX can have it."""
    del model
    gc.collect()
    torch = _torch()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _generate_seconds(model, input_ids, new_tokens: int, mode: str) -> float:
    torch = _torch()
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                  attention_mask=torch.ones_like(input_ids))
    if mode in ("static", "compile"):
        kwargs["cache_implementation"] = "static"
        kwargs["disable_compile"] = mode == "static"
    sync = torch.cuda.synchronize if input_ids.is_cuda else (lambda: None)
    with torch.inference_mode():
        sync()
        start = time.perf_counter()
        out = model.generate(input_ids, **kwargs)
        sync()
    if out.shape[1] != input_ids.shape[1] + new_tokens:
        raise RuntimeError(f"generate returned {out.shape[1] - input_ids.shape[1]} tokens, asked for {new_tokens}")
    return time.perf_counter() - start


def _ids(batch: int, length: int, vocab: int, seed: int):
    torch = _torch()
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen).to(device_name())


def _timed(model, ids, new_tokens: int, mode: str) -> float:
    """Seconds of one generate call after an untimed warm-up call: identical under `compile` (a static
    cache of another length would compile again), a short one otherwise."""
    _generate_seconds(model, ids, new_tokens if mode == "compile" else min(new_tokens, 4), mode)
    return _generate_seconds(model, ids, new_tokens, mode)


def _try(fn) -> dict:
    try:
        return fn()
    except Exception as e:  # a baseline that does not run is a result, not a crash
        release()
        return dict(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500])


def latency(cfg, *, prompt_len: int, new_tokens: int, modes: Sequence[str] = ("eager", "static"),
            model=None) -> dict:
    """Batch-1 greedy decode tok/s per mode: (new_tokens - 1) / (t(new_tokens) - t(1))."""
    model = model if model is not None else build_model(cfg)
    ids = _ids(1, prompt_len, cfg.vocab_size, seed=1)

    def one(mode):
        first = _timed(model, ids, 1, mode)
        total = _timed(model, ids, new_tokens, mode)
        decode = max(total - first, 1e-9)
        return dict(decode_tok_s=(new_tokens - 1) / decode, ms_per_token=1e3 * decode / (new_tokens - 1),
                    end_to_end_tok_s=new_tokens / total, ttft_ms=1e3 * first, seconds=total)

    return {mode: _try(lambda: one(mode)) for mode in modes}


def throughput(cfg, *, batch_sizes: Sequence[int], input_len: int, output_len: int,
               modes: Sequence[str] = ("eager",), model=None) -> dict:
    """Static-batch generate of `batch` random prompts: output and total tok/s, per mode and batch."""
    model = model if model is not None else build_model(cfg)

    def one(mode, batch):
        ids = _ids(batch, input_len, cfg.vocab_size, seed=2)
        seconds = _timed(model, ids, output_len, mode)
        return dict(batch=batch, seconds=seconds, output_tok_s=batch * output_len / seconds,
                    total_tok_s=batch * (input_len + output_len) / seconds)

    return {f"{mode}_b{batch}": _try(lambda: one(mode, batch)) for mode in modes for batch in batch_sizes}


def versions() -> dict:
    import transformers

    torch = _torch()
    return dict(torch=torch.__version__, transformers=transformers.__version__, device=device_name(),
                device_kind=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")


def parse_modes(text: str) -> list[str]:
    modes = [m for m in text.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"--modes must be a comma-separated subset of {','.join(MODES)}, got {text!r}")
    return modes


def parse_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"{flag} must be comma-separated positive integers, got {text!r}")
    return values


def main(argv: Sequence[str] | None = None) -> dict:
    from bench import common

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama3-8b", help="configs/ preset or config.json path")
    p.add_argument("--modes", default="eager,static", help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batch-sizes", default="64,128")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--out", help="JSON path (default bench/results/hf_baseline_<device>.json)")
    args = p.parse_args(argv)
    cfg = common.model_config(args.model)
    modes = parse_modes(args.modes)
    model = build_model(cfg)
    result = dict(
        benchmark="hf_baseline", command=common.command_line(argv, "hf_baseline"), versions=versions(),
        model=args.model, model_shape=common.model_shape(cfg, "bfloat16"),
        workload=dict(prompt_len=args.prompt_len, new_tokens=args.new_tokens, input_len=args.input_len,
                      output_len=args.output_len, batch_sizes=parse_ints(args.batch_sizes, "--batch-sizes")),
        latency=latency(cfg, prompt_len=args.prompt_len, new_tokens=args.new_tokens, modes=modes, model=model),
        throughput=throughput(cfg, batch_sizes=parse_ints(args.batch_sizes, "--batch-sizes"),
                              input_len=args.input_len, output_len=args.output_len, modes=modes, model=model))
    print_results(result)
    default = common.RESULTS / f"hf_baseline_{common.slug(result['versions']['device_kind'])}.json"
    print(f"\nwrote {common.write_json(result, args.out or default, 'hf_baseline')}")
    return result


def print_results(result: dict) -> None:
    from bench import common

    rows = []
    for mode, r in result["latency"].items():
        rows.append((f"batch 1 {mode} decode tok/s", r.get("decode_tok_s", r.get("error"))))
    for key, r in result["throughput"].items():
        rows.append((f"{key} output tok/s", r.get("output_tok_s", r.get("error"))))
    common.print_table(f"HF transformers {result['versions']['transformers']} on {result['versions']['device_kind']}",
                       rows)


if __name__ == "__main__":
    main()
