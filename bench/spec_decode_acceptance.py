"""Speculative decoding's acceptance on real text: mean accepted length of the n-gram and draft-model
proposers with the default model (SmolLM2-135M-Instruct), greedy, on CPU.

  PYTHONPATH=. python -m bench.spec_decode_acceptance --out bench/results/spec_decode_acceptance_cpu.json

Two workloads through the chat template: summarisation prompts that quote their source (a proposer can
copy from the prompt) and free chat. Proposers: n-gram lookup (k = 4, n = 1..4) and drafts made of the
default model's first N layers (`draft_num_layers`). Mean accepted length = tokens per verifying step
(accepted proposals + the target's own token); outputs are checked equal to plain greedy decoding.
`--tiny` runs a seconds-long smoke on a tiny random model.
"""
from __future__ import annotations

import argparse
import time

from bench import common

NAME = "spec_decode_acceptance"

SOURCE = ("The Great Barrier Reef is the world's largest coral reef system, composed of over 2,900 individual "
          "reefs and 900 islands stretching for over 2,300 kilometres over an area of approximately 344,400 "
          "square kilometres. The reef is located in the Coral Sea, off the coast of Queensland, Australia. "
          "It can be seen from outer space and is the world's biggest single structure made by living "
          "organisms. The reef is composed of and built by billions of tiny organisms known as coral polyps. "
          "It supports a wide diversity of life and was selected as a World Heritage Site in 1981. Climate "
          "change, pollution and crown-of-thorns starfish outbreaks are the main threats to its health, and "
          "mass coral bleaching events struck in 2016, 2017, 2020 and 2022.")
SOURCE2 = ("Johannes Gutenberg introduced movable-type printing to Europe around 1440. His press combined "
           "metal type cast in a hand mould, an oil-based ink and a wooden screw press adapted from those used "
           "for wine. The Gutenberg Bible, printed around 1455, was the first major book produced this way. "
           "Within fifty years presses operated in more than two hundred European cities and had printed "
           "millions of copies, making books cheaper, spreading literacy and speeding the exchange of ideas "
           "during the Renaissance and the Reformation.")
WORKLOADS = {
    "summarise": [f"Summarise the following text in three sentences, quoting its key facts:\n\n{SOURCE}",
                  f"Summarise the following text, keeping its numbers:\n\n{SOURCE2}",
                  f"Rewrite this paragraph as a bulleted list of facts:\n\n{SOURCE}"],
    "chat": ["What are some good habits for staying healthy?",
             "Write a short story about a robot who learns to paint.",
             "Explain how a rainbow forms."],
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    p.add_argument("--draft-layers", default="8,16", help="comma-separated draft_num_layers values")
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--tiny", action="store_true", help="a tiny random model and 8 tokens: a smoke run")
    p.add_argument("--out", help="JSON path (default bench/results/spec_decode_acceptance_<device>.json)")
    return p.parse_args(argv)


def load(tiny: bool):
    if tiny:
        from tests.engine.conftest import ByteTokenizer
        from tests.hf_reference import jpaged_from_hf, tiny_hf_model

        return jpaged_from_hf(tiny_hf_model("llama3", seed=7)), ByteTokenizer()
    from jpaged.loader import load_model

    return load_model("default", dtype="float32")


def run(model, tokenizer, prompts, new_tokens: int, spec=None) -> dict:
    from jpaged.config import EngineConfig
    from jpaged.engine.llm_engine import Engine
    from jpaged.sampling_params import SamplingParams

    draft = (model, tokenizer) if spec and spec["method"] == "draft_model" else None
    engine = Engine(EngineConfig(model="default", dtype="float32", max_model_len=1024, max_num_seqs=8,
                                 max_num_batched_tokens=512, speculative_config=spec),
                    model=model, tokenizer=tokenizer, draft=draft)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done, start = {}, time.perf_counter()
    while engine.has_unfinished():
        done |= {o.request_id: o for o in engine.step() if o.finished}
    outs = [done[str(i)] for i in range(len(prompts))]
    s = engine.stats()
    return dict(tokens=[o.outputs[0].token_ids for o in outs], seconds=time.perf_counter() - start,
                num_steps=s["num_steps"], proposed=s.get("spec_proposed_tokens"),
                accepted=s.get("spec_accepted_tokens"), verify_steps=s.get("spec_verify_steps"),
                per_request=[o.spec_decode for o in outs])


def main(argv=None) -> dict:
    args = parse_args(argv)
    model, tokenizer = load(args.tiny)
    new_tokens = 8 if args.tiny else args.new_tokens
    proposers = {"ngram": {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": 4}}
    for n in (int(x) for x in args.draft_layers.split(",") if x):
        n = min(n, model.config.num_layers)
        proposers[f"draft_{n}_layers"] = {"method": "draft_model", "model": "default",
                                         "num_speculative_tokens": args.k, "draft_num_layers": n}
    rows, result = [], dict(device=common.device_info(), command=common.command_line(argv, NAME),
                            model="tiny random llama" if args.tiny else "SmolLM2-135M-Instruct (default)",
                            num_layers=model.config.num_layers, k=args.k, new_tokens=new_tokens,
                            sampling="greedy", workloads={})
    for workload, texts in WORKLOADS.items():
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
        base = run(model, tokenizer, prompts, new_tokens)
        entry = dict(prompts=texts, plain=dict(seconds=base["seconds"], num_steps=base["num_steps"]), proposers={})
        for name, spec in proposers.items():
            r = run(model, tokenizer, prompts, new_tokens, spec)
            mean = 1 + r["accepted"] / r["verify_steps"] if r["verify_steps"] else 1.0
            entry["proposers"][name] = dict(
                spec=spec, mean_accepted_length=mean, acceptance_rate=r["accepted"] / max(r["proposed"], 1),
                proposed=r["proposed"], accepted=r["accepted"], verify_steps=r["verify_steps"],
                num_steps=r["num_steps"], seconds=r["seconds"], equals_plain_greedy=r["tokens"] == base["tokens"],
                per_request=r["per_request"])
            rows.append((f"{workload:<9} {name:<16} mean accepted length", mean))
            print(f"{workload} {name}: mean accepted length {mean:.2f} ({r['seconds']:.0f} s)", flush=True)
        result["workloads"][workload] = entry
    common.print_table(f"speculative decoding acceptance (k = {args.k}, greedy)", rows)
    path = common.write_json(result, args.out, NAME)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
