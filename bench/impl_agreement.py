"""Do the attention impls give the same greedy tokens inside the engine? (device check, not a timing)

  PYTHONPATH=. python -m bench.impl_agreement --impls reference,pallas,mosaic

One random model, one set of prompts of mixed lengths (chunked prefill over cached prefixes, then
decodes), greedy. Each impl's tokens are compared with the first impl's: per request, the index of the
first differing token. bf16 rounding differs between kernels, so near-ties may flip late in a
random-weight model; the first impl against itself under another kernel (e.g. reference vs pallas) is
the control for how often that happens.
"""
from __future__ import annotations

import argparse

import numpy as np

from bench import common


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_engine_flags(p, max_num_seqs=32, max_num_batched_tokens=1024)
    p.add_argument("--impls", default="reference,pallas,mosaic")
    p.add_argument("--num-requests", type=int, default=24)
    p.add_argument("--max-prompt-len", type=int, default=1500)
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args(argv)
    from jpaged.sampling_params import SamplingParams

    cfg = common.model_config(args.model)
    model = common.random_model(cfg, args.dtype)
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, args.max_prompt_len, args.num_requests)
    prompts = common.random_prompts(rng, lengths, cfg.vocab_size)
    # Shared prefixes, so some prefill chunks start over cached pages.
    for i in range(1, len(prompts), 3):
        prompts[i] = prompts[i - 1][: len(prompts[i - 1]) // 2] + prompts[i]
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    max_len = max(map(len, prompts)) + args.new_tokens + 16
    tokens = {}
    for impl in args.impls.split(","):
        llm = common.make_llm(model, args.dtype, **common.engine_kwargs(args, max_len, backend=impl))
        outs = llm.generate(prompts, params, use_tqdm=False)
        tokens[impl] = [list(o.outputs[0].token_ids) for o in outs]
        del llm
    first = args.impls.split(",")[0]
    result = dict(benchmark="impl_agreement", command=common.command_line(argv, "impl_agreement"),
                  device=common.device_info(), model=args.model, prompt_lens=[len(x) for x in prompts],
                  new_tokens=args.new_tokens, against=first, impls={})
    for impl, toks in tokens.items():
        diverge = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
                   for x, y in zip(tokens[first], toks)]
        result["impls"][impl] = dict(
            identical_requests=sum(d == args.new_tokens for d in diverge),
            first_token_equal=sum(d > 0 for d in diverge), first_divergence=diverge)
        print(f"{impl} vs {first}: {result['impls'][impl]['identical_requests']}/{len(prompts)} identical, "
              f"first token equal in {result['impls'][impl]['first_token_equal']}, divergence at {diverge}",
              flush=True)
    common.write_json(result, args.out, "impl_agreement")
    return result


if __name__ == "__main__":
    main()
