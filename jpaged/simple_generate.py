"""The first generation path: one sequence at a time over the paged cache, for `jpaged generate`.

The prompt is prefilled in one step (padded to a power-of-two bucket), then tokens are decoded one per
step. Both go through one jitted function of (params, cache, tokens), so a run compiles once per
prefill bucket and once for decode, never per token. The engine replaces these insides later.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jpaged.kv_cache import KVCache, contiguous_step_input

PAGE_SIZE = 16
MIN_PREFILL_BUCKET = 16


def prefill_bucket(num_tokens: int) -> int:
    """The padded prefill length: the next power of two, at least MIN_PREFILL_BUCKET."""
    return max(MIN_PREFILL_BUCKET, 1 << (num_tokens - 1).bit_length())


def _step(graphdef, state, kv_cache: KVCache, token_ids, num_real, start, key, temperature, *, num_pages: int,
          attn_impl: str):
    """Runs `token_ids[:num_real]` (positions start..) through the model; returns (next token, cache).

    token_ids: [T] int32, padded past num_real (padding writes no K/V and gives no logits).
    """
    model = nnx.merge(graphdef, state)
    step = contiguous_step_input(token_ids, start, kv_cache.page_size, num_pages)
    real = jnp.arange(token_ids.shape[0]) < num_real
    step = step.replace(slot_mapping=jnp.where(real, step.slot_mapping, -1),
                        cu_q_lens=jnp.stack([0, num_real]).astype(jnp.int32),
                        kv_lens=jnp.reshape(start + num_real, (1,)).astype(jnp.int32),
                        logits_index=jnp.reshape(num_real - 1, (1,)).astype(jnp.int32))
    logits, kv_cache = model(kv_cache, step, attn_impl=attn_impl)
    logits = logits[0]                                                    # [V]
    sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6))
    token = jnp.where(temperature > 0, sampled, jnp.argmax(logits)).astype(jnp.int32)
    return token, kv_cache


class SimpleGenerator:
    """Greedy or temperature sampling of one sequence at a time, up to `max_len` tokens of context."""

    def __init__(self, model, *, max_len: int, page_size: int = PAGE_SIZE, attn_impl: str = "reference"):
        cfg = model.config
        if max_len <= 0 or max_len > cfg.max_position_embeddings:
            raise ValueError(f"max_len must be in 1..{cfg.max_position_embeddings} (the model's context), "
                             f"got {max_len}")
        self.max_len = max_len
        self.num_pages = -(-max_len // page_size)
        self.graphdef, self.state = nnx.split(model)
        self.kv_cache = model.new_kv_cache(num_pages=self.num_pages, page_size=page_size)
        self._step = jax.jit(_step, static_argnums=0, static_argnames=("num_pages", "attn_impl"),
                             donate_argnames=("kv_cache",))
        self._attn_impl = attn_impl

    def _run(self, tokens: Sequence[int], start: int, key, temperature: float) -> int:
        padded = list(tokens) + [0] * (prefill_bucket(len(tokens)) - len(tokens) if len(tokens) > 1 else 0)
        token, self.kv_cache = self._step(
            self.graphdef, self.state, self.kv_cache, jnp.asarray(padded, jnp.int32), jnp.int32(len(tokens)),
            jnp.int32(start), key, jnp.float32(temperature), num_pages=self.num_pages, attn_impl=self._attn_impl)
        return int(token)

    def generate(self, prompt_ids: Sequence[int], *, max_tokens: int, temperature: float = 0.0, seed: int = 0,
                 stop_token_ids: Sequence[int] = (), on_token: Callable[[int], None] | None = None) -> list[int]:
        """New token ids after `prompt_ids`: at most `max_tokens`, ending before the first stop token."""
        if not prompt_ids:
            raise ValueError("prompt_ids must hold at least one token")
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if len(prompt_ids) + max_tokens > self.max_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds "
                             f"max_len {self.max_len}")
        base_key = jax.random.PRNGKey(seed)
        out: list[int] = []
        token = self._run(prompt_ids, 0, jax.random.fold_in(base_key, 0), temperature)
        while token not in stop_token_ids:
            out.append(token)
            if on_token is not None:
                on_token(token)
            if len(out) == max_tokens:
                break
            position = len(prompt_ids) + len(out) - 1
            token = self._run([token], position, jax.random.fold_in(base_key, len(out)), temperature)
        return out


def encode_prompt(tokenizer, prompt: str, *, chat: bool) -> list[int]:
    """Prompt token ids; with `chat`, the model's chat template around one user message."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("PROMPT must be non-empty text")
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(prompt)


def generate_texts(model, tokenizer, prompts: Sequence[str], *, chat: bool = False, max_tokens: int = 64,
                   temperature: float = 0.0, seed: int = 0, log: Callable[[str], None] | None = None
                   ) -> Iterator[str]:
    """Yields the completion text of each prompt in turn (decoded without special tokens)."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer (an HF dir needs tokenizer.json)")
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    all_ids = [encode_prompt(tokenizer, p, chat=chat) for p in prompts]
    if not all_ids or not all(all_ids):
        raise ValueError("PROMPT must be non-empty text")
    longest, context = max(len(ids) for ids in all_ids), model.config.max_position_embeddings
    if longest + max_tokens > context:
        raise ValueError(f"prompt ({longest} tokens) + max_tokens ({max_tokens}) exceeds the model's context "
                         f"of {context} tokens")
    generator = SimpleGenerator(model, max_len=longest + max_tokens)
    for ids in all_ids:
        t0 = time.perf_counter()
        out = generator.generate(ids, max_tokens=max_tokens, temperature=temperature, seed=seed,
                                 stop_token_ids=tokenizer.eos_token_ids)
        if log is not None:
            dt = time.perf_counter() - t0
            log(f"{len(ids)} prompt tokens, {len(out)} generated in {dt:.2f}s "
                f"({len(out) / dt:.1f} tok/s, compile included)")
        yield tokenizer.decode(out)
