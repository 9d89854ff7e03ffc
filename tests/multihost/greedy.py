"""Tiny models and a greedy loop over a two-sequence ragged batch, shared by the multi-device tests."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jpaged import sharding
from models.kv_cache import StepInput
from models import LlamaForCausalLM, ModelConfig

PAGE = 4
PAGES_PER_SEQ = 6
TOKENS = 16  # every step is padded to 16 tokens, so each model compiles one step
PROMPTS = ([5, 17, 99, 3, 41, 7, 200], [1, 2, 250, 64, 9])
NEW_TOKENS = 8

CONFIGS = {
    # 8 kv heads: every tensor-parallel size up to 8 splits whole heads.
    "kv8": ModelConfig(architecture="LlamaForCausalLM", vocab_size=256, hidden_size=64, intermediate_size=128,
                       num_layers=2, num_heads=8, num_kv_heads=8, head_dim=16),
    # 2 kv heads with q/k/v biases and tied embeddings: TP 4 and 8 repeat the kv heads.
    "kv2": ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=256, hidden_size=64, intermediate_size=128,
                       num_layers=2, num_heads=8, num_kv_heads=2, head_dim=16, qkv_bias=True,
                       tie_word_embeddings=True),
}


class IdTokenizer:
    """For engines fed token ids: decoding maps each id to a printable character; nothing is encoded."""

    eos_token_ids = [2]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(32 + int(i) % 95) for i in ids)


def tiny_model(name: str) -> LlamaForCausalLM:
    """Random weights scaled up from the 0.02 init, so greedy tokens vary instead of repeating."""
    model = LlamaForCausalLM(CONFIGS[name], dtype=jnp.float32, rngs=nnx.Rngs(7))
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x * 4.0, state))


def batch_step(tokens: list[list[int]], starts: list[int]) -> dict[str, np.ndarray]:
    """A ragged StepInput (as numpy) for sequences s owning pages [s * P, (s + 1) * P)."""
    lens = [len(t) for t in tokens]
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    positions = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lens)]).astype(np.int32)
    seq = np.repeat(np.arange(len(tokens)), lens)
    table = (np.arange(len(tokens))[:, None] * PAGES_PER_SEQ + np.arange(PAGES_PER_SEQ)).astype(np.int32)
    slots = table[seq, positions // PAGE] * PAGE + positions % PAGE
    pad = TOKENS - len(seq)
    return dict(token_ids=np.pad(np.concatenate(tokens), (0, pad)).astype(np.int32),
                positions=np.pad(positions, (0, pad)), cu_q_lens=cu,
                kv_lens=np.asarray([s + n for s, n in zip(starts, lens)], np.int32), page_table=table,
                slot_mapping=np.pad(slots, (0, pad), constant_values=-1).astype(np.int32),
                logits_index=(cu[1:] - 1).astype(np.int32), num_seqs=np.asarray(len(tokens), np.int32))


@nnx.jit
def _step(model, kv_cache, step):
    logits, kv_cache = model(kv_cache, step)
    return jnp.argmax(logits, axis=-1), logits, kv_cache


def greedy(model, mesh=None, prompts=PROMPTS, new_tokens=NEW_TOKENS):
    """Greedy tokens [S, new_tokens] and first-step logits; on `mesh` when given (model from shard_model)."""
    num_pages = len(prompts) * PAGES_PER_SEQ
    if mesh is None:
        cache, put = model.new_kv_cache(num_pages, PAGE), lambda d: StepInput(**d)
    else:
        cache = sharding.new_kv_cache(sharding.kv_cache_spec(model, mesh, PAGE), mesh, num_pages)
        put = lambda d: sharding.replicate(StepInput(**d), mesh)  # noqa: E731
    tokens, starts, out, first_logits = [list(p) for p in prompts], [0] * len(prompts), [], None
    for _ in range(new_tokens):
        if mesh is None:
            next_ids, logits, cache = _step(model, cache, put(batch_step(tokens, starts)))
        else:
            with jax.set_mesh(mesh):
                next_ids, logits, cache = _step(model, cache, put(batch_step(tokens, starts)))
        next_ids = sharding.to_host(next_ids)
        first_logits = sharding.to_host(logits) if first_logits is None else first_logits
        out.append(next_ids)
        starts = [s + len(t) for s, t in zip(starts, tokens)]
        tokens = [[int(i)] for i in next_ids]
    return np.stack(out, axis=1), first_logits


def greedy_replicas(model, mesh, prompt_sets, new_tokens=NEW_TOKENS):
    """Greedy tokens [R, S, new_tokens]: replica r serves prompt_sets[r], all in one SPMD step."""
    num_pages = len(prompt_sets[0]) * PAGES_PER_SEQ
    cache = sharding.new_replica_kv_cache(sharding.kv_cache_spec(model, mesh, PAGE), mesh, num_pages)
    graphdef, state = nnx.split(model)

    def step_fn(state, kv_cache, step):
        logits, kv_cache = nnx.merge(graphdef, state)(kv_cache, step)
        return jnp.argmax(logits, axis=-1), kv_cache

    step_fn = jax.jit(sharding.over_replicas(step_fn))
    tokens = [[list(p) for p in prompts] for prompts in prompt_sets]
    starts = [[0] * len(prompts) for prompts in prompt_sets]
    out = []
    for _ in range(new_tokens):
        steps = [StepInput(**batch_step(t, s)) for t, s in zip(tokens, starts)]
        with jax.set_mesh(mesh):
            next_ids, cache = step_fn(state, cache, sharding.stack_replicas(steps, mesh))
        next_ids = sharding.to_host(next_ids)                                   # [R, S]
        out.append(next_ids)
        starts = [[a + len(b) for a, b in zip(s, t)] for s, t in zip(starts, tokens)]
        tokens = [[[int(i)] for i in row] for row in next_ids]
    return np.stack(out, axis=-1)
