"""A research loop around jpaged.generate: random search on a tiny model's weights, one compiled program.

The model is defined here, in user code (its shape as a ModelConfig, its weights random); each
iteration perturbs the weights, samples 4 continuations of each of a batch of prompts and scores
them, all inside one `jax.jit`. The weights are arguments of that program, so changing them never
recompiles. The reward (how often a continuation uses the low half of the vocabulary) stands in for
a task's score.

  PYTHONPATH=. python examples/research_loop.py
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

import jpaged
from jpaged.sampling_params import SamplingParams
from models.config import ModelConfig
from models.llama import LlamaForCausalLM

CONFIG = ModelConfig(architecture="LlamaForCausalLM", vocab_size=512, hidden_size=64, intermediate_size=128,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, eos_token_ids=(0,))
PROMPTS, PROMPT_LEN, SAMPLES, NEW_TOKENS = 8, 12, 4, 32
graphdef, params = nnx.split(LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(0)))


@jax.jit
def rollout_reward(params, prompts, prompt_lens, key):
    """Mean reward over every sampled token of every row (tokens past a row's EOS don't count)."""
    out = jpaged.generate((graphdef, params), prompts, prompt_lens, max_new_tokens=NEW_TOKENS, key=key,
                                   num_samples=SAMPLES, eos_token_ids=CONFIG.eos_token_ids, page_size=8,
                                   sampling=SamplingParams(temperature=1.0, top_p=0.95))
    valid = jnp.arange(NEW_TOKENS) < out.lengths[..., None]
    low = (out.tokens < CONFIG.vocab_size // 2) & valid
    return low.sum() / valid.sum(), out.lengths.sum(), out.pages_in_use


@jax.jit
def perturb(params, key, scale=0.02):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def main(iterations: int = 8):
    key = jax.random.PRNGKey(0)
    key, k_prompts, k_lens = jax.random.split(key, 3)
    prompts = jax.random.randint(k_prompts, (PROMPTS, PROMPT_LEN), 1, CONFIG.vocab_size)
    prompt_lens = jax.random.randint(k_lens, (PROMPTS,), 4, PROMPT_LEN + 1)
    best, (best_reward, _, _) = params, rollout_reward(params, prompts, prompt_lens, key)
    for it in range(iterations):
        key, k_noise, k_sample = jax.random.split(key, 3)
        candidate = perturb(best, k_noise)
        start = time.perf_counter()
        reward, tokens, pages = jax.block_until_ready(rollout_reward(candidate, prompts, prompt_lens, k_sample))
        seconds = time.perf_counter() - start
        if reward > best_reward:
            best, best_reward = candidate, reward
        print(f"iter {it}: reward {float(reward):.3f} (best {float(best_reward):.3f}), {int(tokens)} tokens "
              f"in {seconds * 1e3:.0f} ms, {int(pages)} KV pages, compiled {rollout_reward._cache_size()}x")


if __name__ == "__main__":
    main()
