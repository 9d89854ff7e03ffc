"""Prompt logprobs: how likely the model finds each prompt token after the ones before it.

`Engine.add_request` calls `PromptScorer.score` for a request with `SamplingParams.prompt_logprobs`
(vLLM's name). It is a forward pass of its own over the prompt into a scratch cache of contiguous
pages, outside the page pool and the scheduler, so requests without it pay nothing. The logits of
every position give log_softmax, the next prompt token's logprob and rank, and the top K.

Compilations stay few: the prompt is padded to a power of two (>= MIN_LEN, one compilation per
length) and runs in chunks of at most CHUNK tokens (chunked prefill into the scratch cache), so the
[chunk, V] logits stay small however long the prompt is.

Shapes: L prompt tokens, Lp padded length, C chunk, V vocab, K = SamplingParams.MAX_LOGPROBS.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jpaged.outputs import Logprob
from jpaged.sampling_params import SamplingParams
from models.kv_cache import KVCacheSpec, StepInput
from pallas_kernels import Backend

CHUNK = 512
MIN_LEN = 16


def padded_length(num_tokens: int) -> int:
    """Lp: the smallest power of two >= num_tokens and >= MIN_LEN."""
    return max(MIN_LEN, 1 << max(0, num_tokens - 1).bit_length())


def _chunk_step(start, length, chunk: int, num_pages: int, token_ids) -> StepInput:
    """Prompt tokens [start, start + chunk) as one sequence over pages 0..num_pages-1 used in order."""
    positions = start + jnp.arange(chunk, dtype=jnp.int32)
    num_new = jnp.minimum(chunk, length - start)
    return StepInput(
        token_ids=token_ids, positions=positions, cu_q_lens=jnp.stack([jnp.int32(0), num_new]).astype(jnp.int32),
        kv_lens=(start + num_new)[None].astype(jnp.int32),
        page_table=jnp.arange(num_pages, dtype=jnp.int32)[None],
        slot_mapping=jnp.where(positions < length, positions, -1),  # contiguous pages: slot == position
        logits_index=jnp.arange(chunk, dtype=jnp.int32), num_seqs=jnp.array(1, jnp.int32))


def make_score_fn(graphdef, state_treedef):
    """The pure scoring function over the model's flat weight list (graphdef, treedef closed over)."""

    def score_fn(weights, token_ids, length, *, chunk: int, spec: KVCacheSpec, num_top: int, backend: Backend):
        """token_ids: [Lp] i32 (L real); returns the logprob and rank [Lp] of token i+1 after tokens
        0..i, and the top `num_top` ids and logprobs [Lp, K] at each position i."""
        model = nnx.merge(graphdef, jax.tree.unflatten(state_treedef, weights))
        padded = token_ids.shape[0]
        num_pages = spec.pages_for(padded)
        targets = jnp.roll(token_ids, -1)                                       # [Lp] next token
        init = (spec.create(num_pages),
                jnp.zeros((padded,), jnp.float32), jnp.zeros((padded,), jnp.int32),
                jnp.zeros((padded, num_top), jnp.int32), jnp.zeros((padded, num_top), jnp.float32))

        def body(c, carry):
            kv_cache, *outs = carry
            start = c * chunk
            ids = jax.lax.dynamic_slice(token_ids, (start,), (chunk,))
            logits, kv_cache = model(kv_cache, _chunk_step(start, length, chunk, num_pages, ids),
                                     backend=backend)
            logprobs = jax.nn.log_softmax(logits, axis=-1)                      # [C, V]
            nxt = jax.lax.dynamic_slice(targets, (start,), (chunk,))
            chosen = jnp.take_along_axis(logprobs, nxt[:, None], axis=-1)[:, 0]
            ranks = jnp.sum(logprobs >= chosen[:, None], axis=-1).astype(jnp.int32)
            top_logprobs, top_ids = jax.lax.top_k(logprobs, num_top)
            new = (chosen, ranks, top_ids.astype(jnp.int32), top_logprobs)
            outs = [jax.lax.dynamic_update_slice_in_dim(o, n, start, axis=0) for o, n in zip(outs, new)]
            return (kv_cache, *outs)

        _, *outs = jax.lax.fori_loop(0, (length + chunk - 1) // chunk, body, init)
        return tuple(outs)

    return score_fn


class PromptScorer:
    """Scores prompts with `model`'s weights (pass the weights being served: nothing is copied), its pages
    as `spec` describes them and `backend`'s kernels (the engine's own). `mesh`: the mesh a sharded model
    lives on, under which the scoring function is traced (None on one device)."""

    def __init__(self, model, *, spec: KVCacheSpec, backend: Backend, mesh=None, chunk: int = CHUNK):
        if chunk < MIN_LEN or chunk & (chunk - 1):
            raise ValueError(f"chunk must be a power of two >= {MIN_LEN}, got {chunk}")
        graphdef, state = nnx.split(model)
        self._weights, treedef = jax.tree.flatten(state)
        self._num_top = min(SamplingParams.MAX_LOGPROBS, model.config.vocab_size)
        self._spec, self._backend, self._chunk, self._mesh = spec, backend, chunk, mesh
        self._jit_score = jax.jit(make_score_fn(graphdef, treedef),
                                  static_argnames=("chunk", "spec", "num_top", "backend"))

    def score(self, token_ids: list[int]) -> tuple[np.ndarray, ...]:
        """(logprobs [L-1], ranks [L-1], top_ids [L-1, K], top_logprobs [L-1, K]); row i is about
        token i+1 of the prompt."""
        length = len(token_ids)
        padded = padded_length(length)
        ids = np.zeros(padded, np.int32)
        ids[:length] = token_ids
        with jax.set_mesh(self._mesh) if self._mesh is not None else contextlib.nullcontext():
            outs = self._jit_score(self._weights, ids, np.int32(length), chunk=min(self._chunk, padded),
                                   spec=self._spec, num_top=self._num_top, backend=self._backend)
        return tuple(np.asarray(o)[:length - 1] for o in outs)

    def prompt_logprobs(self, token_ids: list[int], k: int,
                        decode: Callable[[list[int]], str]) -> list[dict[int, Logprob] | None]:
        """vLLM's RequestOutput.prompt_logprobs: None for the first token (nothing predicts it), then
        per token {token id: Logprob} holding the token itself (with its rank) and the top k."""
        if len(token_ids) < 2:
            return [None]
        logprobs, ranks, top_ids, top_logprobs = self.score(token_ids)
        texts: dict[int, str] = {}

        def text(token: int) -> str:
            if token not in texts:
                texts[token] = decode([token])
            return texts[token]

        entries: list[dict[int, Logprob] | None] = [None]
        for i, token in enumerate(token_ids[1:]):
            entry = {token: Logprob(float(logprobs[i]), int(ranks[i]), text(token))}
            for rank, (tid, lp) in enumerate(zip(top_ids[i, :k].tolist(), top_logprobs[i, :k].tolist()), start=1):
                entry.setdefault(tid, Logprob(lp, rank, text(tid)))
            entries.append(entry)
        return entries
