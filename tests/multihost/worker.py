"""One process of the loopback multi-host test: greedy tokens of the tiny model on a global mesh.

python -m tests.multihost.worker --tp 4 --coordinator 127.0.0.1:PORT --num-processes 2 --process-id I
prints {"tokens": ..., "devices": ..., "processes": ...} as its last line (tokens from every process).
"""
from __future__ import annotations

import argparse
import json

from jpaged import sharding


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, required=True)
    parser.add_argument("--coordinator")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    args = parser.parse_args()
    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    import jax
    from tests.multihost.greedy import greedy, tiny_model
    model = tiny_model("kv2")  # the same seed on every process: identical host copies before sharding
    if args.tp == 1:
        tokens, _ = greedy(model)
    else:
        mesh = sharding.make_mesh(args.tp)
        tokens, _ = greedy(sharding.shard_model(model, mesh), mesh)
    print(json.dumps({"tokens": tokens.tolist(), "devices": jax.device_count(),
                      "processes": jax.process_count()}), flush=True)


if __name__ == "__main__":
    main()
