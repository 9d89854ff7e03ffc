"""Speculative decoding on the GPU: step times of verification (n-gram, a Llama-3.2-1B-shape draft,
self-drafting) against plain decoding, and tok/s at the acceptance measured on CPU.

  PYTHONPATH=. python -m bench.spec_decode --out bench/results/spec_decode_h100.json
  PYTHONPATH=. python -m bench.spec_decode --tiny --out /tmp/spec_decode_tiny.json     # CPU smoke

Random weights (Llama-3-8B shape target, `--draft-model` shape draft), so acceptance is not meaningful
except when self-drafting (the draft is the target's own weights: every proposal is accepted, the
bound). For each batch size and k, one engine per mode decodes `--new-tokens` greedy tokens after a
`--prompt-len` prompt; the figure is the mean engine step of the decode phase:
- plain: no speculation (the baseline, measured in the same run);
- ngram: every decode verifies k proposed tokens (forced: the proposer always offers k), the step a
  real n-gram proposal costs;
- draft: k one-token steps of the draft, then the verification;
- self_draft: the target drafts for itself; measured tok/s and mean accepted length (~k + 1).
Projected tok/s = batch x mean accepted length / step time, at the mean accepted length of
`--acceptance` (bench/results/spec_decode_acceptance_cpu.json, measured at k = 4 on CPU; other k use
the per-token acceptance a solving (1 - a^(k+1)) / (1 - a) = L(4), i.e. independent acceptances), and
at length 3 (the issue's bound: batch-1 >= 1.8x plain).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import time

import numpy as np

from bench import common

NAME = "spec_decode"
CPU_ACCEPTANCE = common.RESULTS / "spec_decode_acceptance_cpu.json"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_engine_flags(p, max_num_seqs=8, max_num_batched_tokens=2048)
    p.add_argument("--draft-model", default="llama3.2-1b", help="configs/ preset of the draft")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--ks", default="1,2,3,4,5")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--acceptance", default=str(CPU_ACCEPTANCE), help="CPU acceptance JSON (mean accepted lengths)")
    p.add_argument("--tiny", action="store_true", help="tiny-llama target and draft, float32, on CPU: a smoke run")
    args = p.parse_args(argv)
    if args.tiny:
        args.model, args.draft_model, args.dtype, args.new_tokens, args.prompt_len = "tiny-llama", "tiny-llama", "float32", 12, 16
        args.ks = "1,3"
    return args


def per_token_acceptance(mean_length: float, k: int = 4) -> float:
    """a with (1 - a^(k+1)) / (1 - a) = mean_length (bisection; expected length of k independent trials)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        a = (lo + hi) / 2
        if sum(a ** i for i in range(k + 1)) < mean_length:
            lo = a
        else:
            hi = a
    return (lo + hi) / 2


def expected_length(a: float, k: int) -> float:
    return sum(a ** i for i in range(k + 1))


def cpu_lengths(path: str) -> dict[str, float]:
    """Mean accepted length at k = 4 per (workload, proposer kind) from the CPU study."""
    file = pathlib.Path(path)
    if not file.is_file():
        return {}
    data = json.loads(file.read_text())
    out = {}
    for workload, entry in data["workloads"].items():
        for name, r in entry["proposers"].items():
            kind = "ngram" if name == "ngram" else "draft"
            out[f"{workload}/{name}"] = (kind, r["mean_accepted_length"], data["k"])
    return out


def decode_steps(engine, prompts, new_tokens: int) -> dict:
    """Runs prompts (greedy, EOS ignored); times the engine steps after every prompt has its first token
    (but the first of them)."""
    from jpaged.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    ids = [f"r{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, p, params)
    produced = {rid: 0 for rid in ids}
    times, tokens_timed, decode_steps_seen = [], 0, 0
    before = engine.stats()
    while engine.has_unfinished():
        # The first decode step is left out: there the draft model computes its KV of the prompts.
        decoding = all(n > 0 for n in produced.values())
        decode_steps_seen += decoding
        decoding = decoding and decode_steps_seen > 1
        start = time.perf_counter()
        outs = engine.step()
        elapsed = time.perf_counter() - start
        new = 0
        for o in outs:
            count = len(o.outputs[0].token_ids)
            new += count - produced[o.request_id]
            produced[o.request_id] = count
        if decoding:
            times.append(elapsed)
            tokens_timed += new
    after = engine.stats()
    spec = {k: after.get(k, 0) - before.get(k, 0) for k in ("spec_proposed_tokens", "spec_accepted_tokens",
                                                             "spec_verify_steps")}
    mean_length = (1 + spec["spec_accepted_tokens"] / spec["spec_verify_steps"]) if spec["spec_verify_steps"] else 1.0
    return dict(step_ms=1e3 * statistics.mean(times), step_ms_median=1e3 * statistics.median(times),
                steps=len(times), tok_per_s=tokens_timed / sum(times), mean_accepted_length=mean_length, **spec)


def set_speculation(engine, spec: dict | None, draft=None) -> None:
    """Gives the (idle) engine a speculator for `spec` (None: plain decoding), its compiled steps kept."""
    from jpaged.engine.spec_decode.setup import load_draft, make_speculator

    engine.speculator = None  # the previous draft's pool is freed before the next one is made
    config = dataclasses.replace(engine.config, speculative_config=spec)
    net = load_draft(config, engine.model, engine.tokenizer, draft)
    engine.speculator = make_speculator(config, net, num_pages=engine.runner.num_pages,
                                        max_model_len=engine.max_model_len)


def main(argv=None) -> dict:
    args = parse_args(argv)
    common.prepare_memory(with_torch=False)
    import jax

    from jpaged.engine.spec_decode import ngram

    cfg, draft_cfg = common.model_config(args.model), common.model_config(args.draft_model)
    if cfg.vocab_size != draft_cfg.vocab_size:
        raise ValueError(f"--draft-model's vocabulary ({draft_cfg.vocab_size}) must be --model's ({cfg.vocab_size})")
    model = common.random_model(cfg, args.dtype)
    draft = common.random_model(draft_cfg, args.dtype, seed=1)
    batches = [int(b) for b in args.batches.split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    max_len = args.prompt_len + args.new_tokens + max(ks) + 8
    # A pool just big enough: the draft's pool has as many pages (a self-draft's as many bytes).
    num_pages = max(batches) * -(-max_len // args.block_size) + 16
    llm = common.make_llm(model, args.dtype, **common.engine_kwargs(args, max_len, max_num_seqs=max(batches),
                                                                  num_kv_blocks=num_pages))
    engine = llm.engine
    rng = np.random.default_rng(0)
    forced = ngram.propose  # the n-gram mode proposes k tokens every step (random weights match nothing)

    def forced_propose(ids, k, max_n, min_n):
        return [int(ids[-1]) % cfg.vocab_size] * k

    result = dict(device=common.device_info(), command=common.command_line(argv, NAME),
                  target=common.model_shape(cfg, args.dtype), draft=common.model_shape(draft_cfg, args.dtype),
                  prompt_len=args.prompt_len, new_tokens=args.new_tokens, batches={})
    lengths = cpu_lengths(args.acceptance)
    result["cpu_acceptance"] = {name: dict(kind=kind, mean_accepted_length=length, k=k,
                                           per_token=per_token_acceptance(length, k))
                                for name, (kind, length, k) in lengths.items()}
    rows = []
    for batch in batches:
        prompts = common.random_prompts(rng, [args.prompt_len] * batch, cfg.vocab_size)
        set_speculation(engine, None)
        decode_steps(engine, prompts, 4)  # compiles
        plain = decode_steps(engine, prompts, args.new_tokens)
        entry = dict(plain=plain, k={})
        rows.append((f"batch {batch} plain step ms / tok/s", f"{plain['step_ms']:.2f} / {plain['tok_per_s']:.0f}"))
        for k in ks:
            modes = {}
            for mode in ("ngram", "draft", "self_draft"):
                if mode == "ngram":
                    ngram.propose = forced_propose
                    set_speculation(engine, {"method": "ngram", "num_speculative_tokens": k})
                else:
                    ngram.propose = forced
                    net = draft if mode == "draft" else engine.model
                    set_speculation(engine, {"method": "draft_model", "model": mode, "num_speculative_tokens": k},
                                    draft=(net, engine.tokenizer))
                decode_steps(engine, prompts, k + 4)  # compiles
                r = decode_steps(engine, prompts, args.new_tokens)
                ngram.propose = forced
                step_s = r["step_ms"] / 1e3
                kind = "ngram" if mode == "ngram" else "draft"
                r["projected_tok_per_s"] = {
                    name: batch * expected_length(a["per_token"], k) / step_s
                    for name, a in result["cpu_acceptance"].items() if a["kind"] == kind}
                r["projected_tok_per_s_at_length_3"] = batch * min(3.0, k + 1) / step_s
                r["speedup_at_length_3"] = r["projected_tok_per_s_at_length_3"] / plain["tok_per_s"]
                modes[mode] = r
                rows.append((f"batch {batch} k {k} {mode:<10} step ms / x at L=3",
                             f"{r['step_ms']:.2f} / {r['speedup_at_length_3']:.2f}"
                             + (f" (measured L {r['mean_accepted_length']:.2f}, {r['tok_per_s']:.0f} tok/s)"
                                if mode == "self_draft" else "")))
            entry["k"][k] = modes
        result["batches"][batch] = entry
        set_speculation(engine, None)
    jax.effects_barrier()
    common.print_table(f"speculative decoding, {args.model} target, {args.draft_model} draft", rows)
    path = common.write_json(result, args.out, NAME)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
