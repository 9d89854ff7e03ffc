"""jpaged.generate: whole-batch generation as one pure, jit-compiled function, for research code.

No engine and no host loop: a page pool is created inside the call, prompts are prefilled as one
ragged step, then a `lax.while_loop` decodes B * num_samples rows with the same model, kernels and
`jpaged.sampling.sample` as the engine, and the pool is discarded on return.

Pages (the functional block table): pages are taken in order from the pool as rows grow, so memory
follows the actual lengths. A prompt's full pages are shared by its num_samples rows; its last,
partial page is kept by sample 0 and copied once for each other sample (copy-on-write, done before
the first write). A row stops feeding tokens (and taking pages) when it samples an EOS id or
reaches max_new_tokens; its last token is never written to the cache. No page is released before
the call ends, so the peak equals the final count. A row that needs a page when the pool is empty
ends there and `out_of_pages` is set.

Shapes: B prompts, L prompt width, N num_samples, R = B * N rows, M max_new_tokens, P pages per row.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jpaged.sampling import PAD_ID, SamplingTensors, sample
from jpaged.sampling_params import SamplingParams
from models.kv_cache import MIN_STEP_TOKENS, KVCache, KVCacheSpec, StepInput
from pallas_kernels import Backend, select_backend
from pallas_kernels.kv_quant import resolve_kv_cache_dtype


@struct.dataclass
class GenerateOutput:
    tokens: jax.Array          # [B, N, M] i32, PAD_ID (-1) past each row's length
    lengths: jax.Array         # [B, N] i32, generated tokens including the EOS that ended the row
    logprobs: jax.Array | None  # [B, N, M] f32 raw-model logprobs of the tokens (0 past the length)
    pages_in_use: jax.Array    # [] i32, pages holding KV at the end
    peak_pages: jax.Array      # [] i32, most pages held at once
    out_of_pages: jax.Array    # [] bool, some row ended early because the pool was empty


@struct.dataclass
class _DecodeState:
    kv_cache: KVCache
    page_table: jax.Array  # [R, P] i32
    cache_lens: jax.Array  # [R] i32, tokens of the row in the cache
    tokens: jax.Array      # [R, M] i32
    logprobs: jax.Array    # [R, M] f32
    lengths: jax.Array     # [R] i32
    done: jax.Array        # [R] bool
    pages_used: jax.Array  # [] i32
    out_of_pages: jax.Array  # [] bool
    step: jax.Array        # [] i32


def generate(model_or_params, prompt_tokens, prompt_lens, *, max_new_tokens: int,
             sampling: SamplingParams | None = None, key: jax.Array, num_samples: int = 1,
             eos_token_ids: Sequence[int] = (), page_size: int = 16, num_pages: int | None = None,
             backend: Backend | str | None = None, kv_cache_dtype: str = "auto") -> GenerateOutput:
    """Generates num_samples continuations of each prompt; jit-compiled, callable inside jax.jit.

    Args:
      model_or_params: an NNX model with the LlamaForCausalLM contract (`model(kv_cache, step,
        backend=...) -> (logits, kv_cache)`, `kv_cache_spec(page_size)`, `config.vocab_size`),
        or its `(graphdef, state)` from `nnx.split`. Weights are arguments of the compiled call.
      prompt_tokens: [B, L] int32, prompt b in `prompt_tokens[b, :prompt_lens[b]]`.
      prompt_lens: [B] int32, each in [1, L].
      max_new_tokens: M, the most tokens generated per row.
      sampling: one SamplingParams for every row (greedy when None); its `seed` must be None (the
        rows' randomness comes from `key`), `logprobs` not None asks for the tokens' logprobs.
      key: PRNG key; the same key gives the same tokens.
      num_samples: N continuations per prompt, sharing the prompt's pages.
      eos_token_ids: ids that end a row (the EOS token is included in the output).
      page_size: tokens per KV page.
      num_pages: size of the pool; None sizes it for the longest possible output of every row.
      backend: the kernels (`pallas_kernels.Backend`); None picks the engine's for the default device
        and these pages (`pallas_kernels.select_backend`), a string is an override as the engine's.
      kv_cache_dtype: the pool's pages, as EngineConfig.kv_cache_dtype ('auto': the model dtype; 'fp8',
        'fp8_e5m2', 'int8': 8-bit pages with per-(token, kv head) scales).

    Returns:
      GenerateOutput (tokens [B, N, M], lengths [B, N], optional logprobs, page counts).
    """
    prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
    prompt_lens = jnp.asarray(prompt_lens, jnp.int32)
    if prompt_tokens.ndim != 2 or prompt_tokens.shape[1] < 1:
        raise ValueError(f"prompt_tokens must be [B, L] with L >= 1, got shape {prompt_tokens.shape}")
    batch, width = prompt_tokens.shape
    if prompt_lens.shape != (batch,):
        raise ValueError(f"prompt_lens must have shape ({batch},), got {prompt_lens.shape}")
    for name, value in (("max_new_tokens", max_new_tokens), ("num_samples", num_samples),
                        ("page_size", page_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    sampling = sampling if sampling is not None else SamplingParams(temperature=0.0)
    if sampling.seed is not None:
        raise ValueError("sampling.seed must be None in generate: pass the randomness as `key`")
    if sampling.structured_outputs is not None:
        raise ValueError("sampling.structured_outputs is not supported by jpaged.generate (its whole loop runs on "
                         "the device, the grammar's matchers on the host): use LLM.generate")
    min_pages = batch * (-(-width // page_size) + num_samples - 1)
    if num_pages is None:
        num_pages = min_pages + batch * num_samples * (-(-(max_new_tokens - 1) // page_size) + 1)
    if num_pages < min_pages:
        raise ValueError(f"num_pages must be >= {min_pages} (the prompts' pages and one partial-page copy per "
                         f"extra sample), got {num_pages}")

    if isinstance(model_or_params, nnx.Module):
        graphdef, state = nnx.split(model_or_params)
        model = model_or_params
    else:
        graphdef, state = model_or_params
        model = nnx.merge(graphdef, state)
    vocab_size = model.config.vocab_size
    spec = model.kv_cache_spec(page_size, resolve_kv_cache_dtype(kv_cache_dtype, model.dtype))
    backend = select_backend(jax.devices()[0], spec, backend)
    rows = batch * num_samples
    tensors = SamplingTensors.from_params([sampling] * rows, num_rows=rows, vocab_size=vocab_size,
                                          prompt_token_ids=[[]] * rows, output_token_ids=[[]] * rows)
    return _generate(graphdef, state, prompt_tokens, prompt_lens, tensors, key,
                     max_new_tokens=max_new_tokens, num_samples=num_samples,
                     eos_token_ids=tuple(int(t) for t in eos_token_ids), spec=spec,
                     num_pages=num_pages, backend=backend, with_logprobs=sampling.logprobs is not None)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=(
    "max_new_tokens", "num_samples", "eos_token_ids", "spec", "num_pages", "backend", "with_logprobs"))
def _generate(graphdef, state, prompt_tokens, prompt_lens, tensors: SamplingTensors, key, *,
              max_new_tokens, num_samples, eos_token_ids, spec: KVCacheSpec, num_pages, backend: Backend,
              with_logprobs):
    model = nnx.merge(graphdef, state)
    page_size = spec.page_size
    batch, width = prompt_tokens.shape
    rows = batch * num_samples
    pages_per_row = -(-(width + max_new_tokens - 1) // page_size)
    if tensors.use_penalties:
        history = jnp.where(jnp.arange(width) < prompt_lens[:, None], prompt_tokens, PAD_ID)
        tensors = tensors.replace(prompt_tokens=jnp.repeat(history, num_samples, axis=0))

    prompt_table, prompt_pages = _prompt_page_table(prompt_lens, page_size, pages_per_row)
    kv_cache = spec.create(num_pages)
    logits, kv_cache = model(kv_cache, _prefill_step(prompt_tokens, prompt_lens, prompt_table, page_size),
                             backend=backend)
    table, copy_src, copy_dst, pages_used = _fork_rows(prompt_table, prompt_lens, prompt_pages, num_samples,
                                                       page_size, num_pages)
    kv_cache = _copy_pages(kv_cache, copy_src, copy_dst)

    eos = jnp.asarray(eos_token_ids or (PAD_ID,), jnp.int32)
    first = _sample_rows(jnp.repeat(logits, num_samples, axis=0), tensors,
                         jnp.full((rows, max_new_tokens), PAD_ID, jnp.int32), jnp.zeros((rows,), jnp.int32), key, 0)
    init = _DecodeState(
        kv_cache=kv_cache, page_table=table, cache_lens=jnp.repeat(prompt_lens, num_samples),
        tokens=jnp.full((rows, max_new_tokens), PAD_ID, jnp.int32).at[:, 0].set(first.tokens),
        logprobs=jnp.zeros((rows, max_new_tokens), jnp.float32).at[:, 0].set(first.logprobs),
        lengths=jnp.ones((rows,), jnp.int32),
        done=jnp.isin(first.tokens, eos) | (max_new_tokens == 1),
        pages_used=pages_used, out_of_pages=jnp.zeros((), bool), step=jnp.ones((), jnp.int32))

    def decode(s: _DecodeState) -> _DecodeState:
        s = _take_pages(s, page_size, num_pages)
        active = ~s.done
        logits, kv_cache = model(s.kv_cache, _decode_step(s, active, page_size), backend=backend)
        out = _sample_rows(logits, tensors, s.tokens, s.lengths, key, s.step)
        row_ids = jnp.arange(rows)
        col = jnp.where(active, s.lengths, max_new_tokens)  # inactive rows write out of bounds: dropped
        lengths = s.lengths + active
        return s.replace(
            kv_cache=kv_cache, cache_lens=s.cache_lens + active,
            tokens=s.tokens.at[row_ids, col].set(out.tokens, mode="drop"),
            logprobs=s.logprobs.at[row_ids, col].set(out.logprobs, mode="drop"),
            lengths=lengths,
            done=s.done | (active & (jnp.isin(out.tokens, eos) | (lengths >= max_new_tokens))),
            step=s.step + 1)

    final = jax.lax.while_loop(lambda s: ~jnp.all(s.done), decode, init)
    shape = (batch, num_samples, max_new_tokens)
    return GenerateOutput(
        tokens=final.tokens.reshape(shape), lengths=final.lengths.reshape(batch, num_samples),
        logprobs=final.logprobs.reshape(shape) if with_logprobs else None,
        pages_in_use=final.pages_used, peak_pages=final.pages_used, out_of_pages=final.out_of_pages)


def _sample_rows(logits, tensors: SamplingTensors, tokens, lengths, key, step):
    """The engine's sampler with each row's output position and (for penalties) its output so far."""
    tensors = tensors.replace(output_position=lengths)
    if tensors.use_penalties:
        tensors = tensors.replace(output_tokens=tokens)
    return sample(logits, tensors, jax.random.fold_in(key, step))


def _prompt_page_table(prompt_lens, page_size, pages_per_row):
    """[B, P] pages of each prompt, handed out consecutively from page 0; and [B] pages per prompt."""
    num = -(-prompt_lens // page_size)
    start = jnp.cumsum(num) - num
    j = jnp.arange(pages_per_row)[None, :]
    return jnp.where(j < num[:, None], start[:, None] + j, 0).astype(jnp.int32), num


def _prefill_step(prompt_tokens, prompt_lens, page_table, page_size) -> StepInput:
    """All prompts as one ragged step over their pages: T = B * L tokens, the tail padding."""
    batch, width = prompt_tokens.shape
    cu_q_lens = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(prompt_lens)]).astype(jnp.int32)
    t = jnp.arange(batch * width, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(cu_q_lens[1:], t, side="right"), batch - 1)
    offset = t - cu_q_lens[seq]
    valid = t < cu_q_lens[-1]
    offset = jnp.where(valid, offset, 0)
    slot = page_table[seq, offset // page_size] * page_size + offset % page_size
    return StepInput(
        token_ids=prompt_tokens[seq, offset], positions=offset, cu_q_lens=cu_q_lens, kv_lens=prompt_lens,
        page_table=page_table, slot_mapping=jnp.where(valid, slot, -1).astype(jnp.int32),
        logits_index=jnp.maximum(cu_q_lens[1:] - 1, 0), num_seqs=jnp.array(batch, jnp.int32))


def _fork_rows(prompt_table, prompt_lens, prompt_pages, num_samples, page_size, num_pages):
    """Row r = b * N + s shares prompt b's full pages; samples s > 0 get a copy of its partial page.

    Returns the [R, P] row table, [R] source and destination pages of the copies (num_pages where
    a row copies nothing), and the pages used so far.
    """
    table = jnp.repeat(prompt_table, num_samples, axis=0)
    lens = jnp.repeat(prompt_lens, num_samples)
    sample_idx = jnp.tile(jnp.arange(num_samples), prompt_lens.shape[0])
    last = (lens - 1) // page_size
    copies = (sample_idx > 0) & (lens % page_size != 0)
    dst = jnp.sum(prompt_pages) + jnp.cumsum(copies) - 1
    rows = jnp.arange(table.shape[0])
    src = table[rows, last]
    table = table.at[rows, jnp.where(copies, last, table.shape[1])].set(dst.astype(jnp.int32), mode="drop")
    dst = jnp.where(copies, dst, num_pages)
    return table, src, dst, (jnp.sum(prompt_pages) + jnp.sum(copies)).astype(jnp.int32)


def _copy_pages(kv_cache: KVCache, src, dst) -> KVCache:
    """Every layer's page dst[i] := page src[i]; dst == num_pages is skipped."""
    # Every leaf has the page axis first: the scales of 8-bit pages are copied with them.
    return jax.tree.map(lambda pages: pages.at[dst].set(pages[src], mode="drop"), kv_cache)


def _take_pages(s: _DecodeState, page_size, num_pages) -> _DecodeState:
    """Gives a fresh page to each running row whose next token starts one; rows the pool can't serve end."""
    need = ~s.done & (s.cache_lens % page_size == 0)
    page = s.pages_used + jnp.cumsum(need) - 1
    granted = need & (page < num_pages)
    starved = need & ~granted
    rows = jnp.arange(s.page_table.shape[0])
    col = jnp.where(granted, s.cache_lens // page_size, s.page_table.shape[1])
    return s.replace(page_table=s.page_table.at[rows, col].set(page.astype(jnp.int32), mode="drop"),
                     pages_used=s.pages_used + jnp.sum(granted).astype(jnp.int32),
                     done=s.done | starved, out_of_pages=s.out_of_pages | jnp.any(starved))


def _decode_step(s: _DecodeState, active, page_size) -> StepInput:
    """One token per running row, packed in row order; finished rows are empty sequences (q_len 0).

    Fewer than MIN_STEP_TOKENS rows are padded with empty sequences up to it (tokens and sequence
    slots alike, so the batch stays decode-shaped); logits come back for the real rows only.
    """
    rows = s.page_table.shape[0]
    t = max(rows, MIN_STEP_TOKENS)
    cu_q_lens = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(active)]).astype(jnp.int32)
    at = jnp.where(active, cu_q_lens[:-1], t)  # index of the row's token; t = dropped
    pos = s.cache_lens
    last_token = s.tokens[jnp.arange(rows), s.lengths - 1]
    slot = s.page_table[jnp.arange(rows), pos // page_size] * page_size + pos % page_size
    pad = t - rows
    return StepInput(
        token_ids=jnp.zeros((t,), jnp.int32).at[at].set(last_token, mode="drop"),
        positions=jnp.zeros((t,), jnp.int32).at[at].set(pos, mode="drop"),
        cu_q_lens=jnp.pad(cu_q_lens, (0, pad), mode="edge"),
        kv_lens=jnp.pad(jnp.where(active, pos + 1, 0).astype(jnp.int32), (0, pad)),
        page_table=jnp.pad(s.page_table, ((0, pad), (0, 0))),
        slot_mapping=jnp.full((t,), -1, jnp.int32).at[at].set(slot.astype(jnp.int32), mode="drop"),
        logits_index=jnp.where(active, cu_q_lens[:-1], 0), num_seqs=jnp.array(rows, jnp.int32))
