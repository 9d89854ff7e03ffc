"""Renders the KV cache map of a small real run (docs/kv_cache_map.png and .json).

A tiny random Llama with a sliding window (so window release shows), a pool too small for the load
(swap preemption), requests sharing a system prompt (prefix sharing), one with n=2 (a copy-on-write
fork) and a host tier (evicted cached pages). The snapshot kept is the step that shows the most
page states at once.

    PYTHONPATH=. python examples/cache_map_demo.py --out docs/kv_cache_map
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from jpaged.config import EngineConfig
from jpaged.engine.cache_map import render_png
from jpaged.engine.kv_tiers import host_page_bytes
from jpaged.engine.llm_engine import Engine
from jpaged.loader import CONFIGS_DIR
from jpaged.loader.hf import random_model, read_json
from jpaged.loader.tokenizer import byte_tokenizer
from jpaged.sampling_params import SamplingParams
from models.config import ModelConfig


def build_engine(window: int = 64) -> Engine:
    cfg = dataclasses.replace(ModelConfig.from_hf(read_json(CONFIGS_DIR / "tiny-llama.json")), sliding_window=window)
    model = random_model(cfg, "float32")
    config = EngineConfig(model="tiny-llama-window", dtype="float32", block_size=8, num_kv_blocks=48,
                          max_num_seqs=8, max_num_batched_tokens=64, max_model_len=512, preemption_mode="swap",
                          num_host_kv_blocks=24, kv_host_cache_gb=1e-9)
    probe = Engine(dataclasses.replace(config, kv_host_cache_gb=0.0), model=model,
                   tokenizer=byte_tokenizer(cfg.eos_token_ids, cfg.vocab_size))
    gb = 12 * host_page_bytes(probe.kv_spec) / (1 << 30)  # a 12-page host tier
    return Engine(dataclasses.replace(config, kv_host_cache_gb=gb), model=model,
                  tokenizer=byte_tokenizer(cfg.eos_token_ids, cfg.vocab_size))


def run(engine: Engine) -> tuple[dict, int]:
    rng = np.random.RandomState(0)
    system = rng.randint(3, 250, 32).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    for i in range(6):
        engine.add_request(f"chat{i}", system + rng.randint(3, 250, 20 + 12 * i).tolist(), params)
    engine.add_request("fork", system + rng.randint(3, 250, 30).tolist(),
                       SamplingParams(temperature=0.8, n=2, max_tokens=30, ignore_eos=True, seed=1))
    best, best_score, step = None, -1, 0
    while engine.has_unfinished():
        engine.step()
        step += 1
        snapshot = engine.cache_map()
        present = {p["state"] for p in snapshot["device"]["pages"]} | {
            "host_" + p["state"] for p in snapshot["host"]["pages"]}
        score = len(present) + 3 * len(present & {"shared", "host_swapped", "host_cached", "window_released"})
        if score > best_score:
            best, best_score, best_step = snapshot, score, step
    return best, best_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/kv_cache_map", help="path without suffix for the .png and .json")
    args = ap.parse_args()
    snapshot, step = run(build_engine())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".png").write_bytes(render_png(snapshot, title=f"tiny Llama, window 64, step {step}"))
    out.with_suffix(".json").write_text(json.dumps(snapshot, indent=1))
    print(f"{out}.png: step {step}, device {snapshot['device']['counts']}, host {snapshot['host']['counts']}")


if __name__ == "__main__":
    main()
