"""Offline throughput with every request under a JSON schema against the same requests unconstrained.

  PYTHONPATH=. python -m bench.structured --out bench/results/structured_llama3-8b_h100.json  # GPU
  PYTHONPATH=. python -m bench.structured --tiny --out /tmp/structured.json                    # CPU smoke run

Both runs: --num-seqs (256) requests of --input-len (256) random token ids, --output-len (128) tokens
each, sampled at temperature 1 with EOS ignored, all given at once, random weights of --model (Llama-3-8B
shape). The constrained run puts every request under a nested schema (an array of at least
--output-len objects with enums, bounded numbers and strings, a nested object), so each request is
masked by its grammar at every one of its tokens. Random weights need a tokenizer: by default a
synthetic byte-level vocabulary of the model's size (the 256 bytes, then seeded random words of 2-8
letters, digits and JSON punctuation, some after a space); --tokenizer DIR takes a real HF tokenizer
directory instead. Before each timed run the same workload runs once with other prompts, so
compilation and grammar compilation are outside the timing. overhead = 1 - constrained / unconstrained
output tokens/s, measured in the same process.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

import numpy as np

from bench import common

NAME = "structured"

ITEM = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 99999},
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["alpha", "beta", "gamma"]},
        "score": {"type": "number", "minimum": -1, "maximum": 1},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "owner": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                   "active": {"type": "boolean"}},
                  "required": ["city", "active"], "additionalProperties": False},
    },
    "required": ["id", "name", "kind", "score", "tags", "owner"],
    "additionalProperties": False,
}


def schema(output_len: int) -> dict:
    """More items than output_len tokens can hold: no request finishes its JSON early."""
    return {"type": "array", "items": ITEM, "minItems": output_len}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_engine_flags(p, max_num_seqs=256)
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--tokenizer", help="an HF tokenizer directory (tokenizer.json); default: synthetic")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny-llama, 8 sequences of 16+16 tokens")
    p.add_argument("--mask-cost", action="store_true",
                   help="only time the host side: --num-seqs matchers of the schema filling one bitmask per step "
                        "for --output-len steps (random allowed tokens), no model")
    args = p.parse_args(argv)
    if args.tiny:
        args.model, args.dtype, args.num_seqs, args.input_len, args.output_len = "tiny-llama", "float32", 8, 16, 16
        args.max_num_seqs, args.max_num_batched_tokens = 8, 128
    for flag in ("num_seqs", "input_len", "output_len"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    return args


def synthetic_tokenizer(vocab_size: int, seed: int = 0):
    """A byte-level BPE vocabulary of `vocab_size` tokens: 256 bytes, then distinct random words."""
    import tokenizers
    import tokenizers.decoders
    import tokenizers.models
    import tokenizers.pre_tokenizers

    from jpaged.loader.tokenizer import Tokenizer, bytes_to_unicode

    spelling = bytes_to_unicode()
    rng = np.random.default_rng(seed)
    alphabet = list("abcdefghijklmnopqrstuvwxyz0123456789") + list('",:{}[]-._ ')
    vocab = {spelling[b]: b for b in range(256)}
    while len(vocab) < vocab_size - 1:
        word = "".join(rng.choice(alphabet, size=int(rng.integers(2, 9))))
        word = (" " + word) if rng.random() < 0.3 else word
        vocab.setdefault("".join(spelling[b] for b in word.encode()), len(vocab))
    vocab["<eos>"] = len(vocab)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, []))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    return Tokenizer(tok, eos_token_ids=[vocab_size - 1])


def timed(llm, prompts, params) -> dict:
    compiled = llm.engine.runner.num_compilations
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return dict(seconds=seconds, output_tokens=tokens, output_tok_s=tokens / seconds,
                compilations=llm.engine.runner.num_compilations - compiled)


def mask_cost(args, tokenizer, vocab_size: int) -> dict:
    """Milliseconds per step the host spends on the masks of --num-seqs constrained rows."""
    from jpaged.sampling_params import SamplingParams
    from jpaged.structured import StructuredOutputsParams
    from jpaged.structured.grammar import Constraints

    class Row:  # what Constraints reads of a sequence
        def __init__(self, i, params):
            self.seq_id, self.sampling_params, self.token_ids, self.num_prompt_tokens = i, params, [0], 1

    eos = list(getattr(tokenizer, "eos_token_ids", ()))
    constraints = Constraints(tokenizer, vocab_size, eos)
    params = SamplingParams(structured_outputs=StructuredOutputsParams(json=schema(args.output_len)))
    start = time.perf_counter()
    constraints.check(params.structured_outputs)
    compile_s = time.perf_counter() - start
    rows = [Row(i, params) for i in range(args.num_seqs)]
    rng = np.random.default_rng(0)
    times = []
    for _ in range(args.output_len):
        start = time.perf_counter()
        mask = constraints.bitmask(rows, len(rows))
        times.append(time.perf_counter() - start)
        bits = np.unpackbits(mask.view(np.uint8), axis=1, bitorder="little")[:, :vocab_size]
        for r, row in enumerate(rows):
            row.token_ids.append(int(rng.choice(np.flatnonzero(bits[r]))))
    ms = 1e3 * np.asarray(times[1:])  # the first step builds llguidance's caches
    return dict(grammar_compile_s=compile_s, first_step_ms=1e3 * times[0], median_step_ms=float(np.median(ms)),
                p90_step_ms=float(np.percentile(ms, 90)), rows=args.num_seqs, steps=args.output_len)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    common.prepare_memory(with_torch=False)
    from jpaged.llm import LLM
    from jpaged.sampling_params import SamplingParams
    from jpaged.structured import StructuredOutputsParams

    cfg = common.model_config(args.model)
    if args.tokenizer:
        from jpaged.loader.tokenizer import Tokenizer
        tokenizer = Tokenizer.from_dir(args.tokenizer)
    elif cfg.vocab_size <= 257:  # a byte vocabulary, the model's own EOS
        from jpaged.loader.tokenizer import byte_tokenizer
        tokenizer = byte_tokenizer(eos_token_ids=list(cfg.eos_token_ids), vocab_size=cfg.vocab_size)
    else:
        tokenizer = synthetic_tokenizer(cfg.vocab_size)
    if args.mask_cost:
        result = dict(benchmark=NAME + "_mask_cost", command=common.command_line(argv, NAME), device=common.device_info(),
                      model=args.model, vocab_size=cfg.vocab_size, mask_cost=mask_cost(args, tokenizer, cfg.vocab_size))
        common.print_table("structured outputs: host mask cost", list(result["mask_cost"].items()))
        print(f"\nwrote {common.write_json(result, args.out, NAME + '_mask_cost')}")
        return result
    model = common.random_model(cfg, args.dtype)
    max_len = args.input_len + args.output_len
    kw = common.engine_kwargs(args, max_len)
    llm = LLM(model="random", model_obj=model, tokenizer=tokenizer, dtype=args.dtype,
              enable_prefix_caching=True, **kw)
    free = SamplingParams(temperature=1.0, max_tokens=args.output_len, ignore_eos=True, seed=None)
    constrained = SamplingParams(temperature=1.0, max_tokens=args.output_len, ignore_eos=True,
                                 structured_outputs=StructuredOutputsParams(json=schema(args.output_len)))
    rng = np.random.default_rng(0)
    prompts = lambda: common.random_prompts(rng, [args.input_len] * args.num_seqs, cfg.vocab_size)  # noqa: E731
    results = {}
    for name, params in (("unconstrained", free), ("json_schema", constrained)):
        start = time.perf_counter()
        timed(llm, prompts(), [params] * args.num_seqs)  # warm-up: compilations, grammar
        print(f"{name}: warmed up in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        results[name] = timed(llm, prompts(), [params] * args.num_seqs)
        print(f"{name}: {results[name]['output_tok_s']:.1f} output tok/s", file=sys.stderr, flush=True)
    overhead = 1 - results["json_schema"]["output_tok_s"] / results["unconstrained"]["output_tok_s"]
    result = dict(
        benchmark=NAME, command=common.command_line(argv, NAME), device=common.device_info(),
        model=args.model, model_shape=common.model_shape(cfg, args.dtype),
        workload=dict(num_seqs=args.num_seqs, input_len=args.input_len, output_len=args.output_len,
                      temperature=1.0, tokenizer=args.tokenizer or f"synthetic byte-level, {cfg.vocab_size} tokens",
                      schema=schema(args.output_len)),
        engine=dict(backend=llm.engine.runner.backend.describe(), max_num_seqs=args.max_num_seqs,
                    max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
                    max_model_len=max_len),
        results=results, overhead=overhead)
    common.print_table(f"structured outputs, {args.model}", [
        ("device", result["device"]["device_kind"]),
        ("unconstrained output tok/s", results["unconstrained"]["output_tok_s"]),
        ("json_schema output tok/s", results["json_schema"]["output_tok_s"]),
        ("overhead", overhead)])
    print(f"\nwrote {common.write_json(result, args.out, NAME)}")
    return result


if __name__ == "__main__":
    main()
