"""One process of the multi-host serving test: a TP engine over the devices of every process.

python -m tests.multihost.engine_worker --coordinator 127.0.0.1:PORT --num-processes 2 --process-id I
Process 0 schedules; its last line is {"tokens": ..., "reference": ..., "processes": ..., "devices": ...}
with the reference from a one-device engine on process 0. The other processes follow and print nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

from jpaged import sharding

PROMPTS = ([5, 17, 99, 3, 41, 7, 200], [1, 2, 250, 64, 9], [8, 8, 30])


def run(engine) -> list[list[int]]:
    """Greedy completions of PROMPTS; the last one asks for n=2 (a fork, so pages are copied on write)."""
    from jpaged.sampling_params import SamplingParams
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), list(prompt), SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                                                                n=2 if i == 2 else 1))
    done = {}
    while engine.has_unfinished():
        done |= {o.request_id: o for o in engine.step() if o.finished}
    return [c.token_ids for i in range(len(PROMPTS)) for c in done[str(i)].outputs]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    args = parser.parse_args()
    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    import jax
    from jpaged.config import EngineConfig
    from jpaged.engine import multihost
    from jpaged.engine.data_parallel import make_engine
    from jpaged.engine.llm_engine import Engine
    from tests.multihost.greedy import IdTokenizer, tiny_model

    model = tiny_model("kv2")  # the same seed on every process: identical host copies before sharding
    config = EngineConfig(model="test", dtype="float32", block_size=8, max_model_len=32, max_num_seqs=8,
                          max_num_batched_tokens=16, tensor_parallel_size=jax.device_count())
    engine = make_engine(config, model=model, tokenizer=IdTokenizer())
    tokens = multihost.lead_or_follow(engine, lambda: run(engine))
    if tokens is None:  # a follower
        return
    one_device = Engine(dataclasses.replace(config, tensor_parallel_size=1, num_kv_blocks=engine.runner.num_pages),
                        model=model, tokenizer=IdTokenizer())
    print(json.dumps({"tokens": tokens, "reference": run(one_device), "processes": jax.process_count(),
                      "devices": engine.runner.mesh.devices.size}), flush=True)


if __name__ == "__main__":
    main()
