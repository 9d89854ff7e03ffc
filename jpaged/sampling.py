"""On-device sampling: one jitted function turns a batch's logits into tokens, logprobs and ranks.

Sits after the model in the step (docs/architecture.md): `model_runner` and `jpaged.generate` both
build a `SamplingTensors` (per-row settings as arrays) and call `sample`. Semantics follow vLLM:
logit_bias and the structured-outputs token bitmask first (docs/structured_outputs.md), then
penalties (repetition over prompt + output, then frequency and presence over output), then
rows short of `min_tokens` outputs bar their stop ids (EOS and `stop_token_ids`); greedy rows take the
argmax of the processed logits, the others divide by their temperature, drop tokens under min-p, keep
the top-k then the top-p nucleus, and draw with the Gumbel-max trick.
Returned logprobs are of the raw model logits (vLLM's default `raw_logprobs`), before any processing.

Shapes: S rows (sequences, padded to a bucket), V vocab, K top logprobs, H history length, B barred ids,
W = ceil(V / 32) bitmask words, L biased ids.
"""
from __future__ import annotations

from typing import Collection, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jpaged.sampling_params import SamplingParams

PAD_ID = -1  # history padding; never a token


@struct.dataclass
class SamplingTensors:
    """Per-row sampling settings of one step, padded to the batch bucket (padding rows are greedy)."""

    temperature: jax.Array         # [S] f32, 0 = greedy
    top_k: jax.Array               # [S] i32, V when off
    top_p: jax.Array               # [S] f32, 1 when off
    min_p: jax.Array               # [S] f32, 0 when off
    presence_penalty: jax.Array    # [S] f32
    frequency_penalty: jax.Array   # [S] f32
    repetition_penalty: jax.Array  # [S] f32
    seed: jax.Array                # [S, 2] u32, the low and high 32 bits of the row's seed
    has_seed: jax.Array            # [S] bool, False: the row draws from the key passed to `sample`
    output_position: jax.Array     # [S] i32, index of the token being sampled within the output
    prompt_tokens: jax.Array       # [S, Hp] i32 prompt ids, PAD_ID padded ([S, 0] without penalties)
    output_tokens: jax.Array       # [S, Ho] i32 generated ids, PAD_ID padded ([S, 0] without penalties)
    min_tokens: jax.Array          # [S] i32, the row may not sample a barred id while output_position < it
    barred_ids: jax.Array          # [S, B] i32 EOS and stop_token_ids, PAD_ID padded ([S, 0] without min_tokens)
    token_bitmask: jax.Array = None  # [S, W] i32 packed allowed-token bits ([S, 0] without a constraint)
    logit_bias_ids: jax.Array = None     # [S, L] i32, PAD_ID padded ([S, 0] without logit_bias)
    logit_bias_values: jax.Array = None  # [S, L] f32
    # Which optional stages any row needs; static, so unused stages cost nothing in the compiled step.
    use_penalties: bool = struct.field(pytree_node=False, default=False)
    use_top_k_top_p: bool = struct.field(pytree_node=False, default=False)
    use_min_p: bool = struct.field(pytree_node=False, default=False)
    use_min_tokens: bool = struct.field(pytree_node=False, default=False)
    use_bitmask: bool = struct.field(pytree_node=False, default=False)
    use_logit_bias: bool = struct.field(pytree_node=False, default=False)

    @property
    def num_rows(self) -> int:
        return self.temperature.shape[0]

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams], *, num_rows: int, vocab_size: int,
                    output_positions: Sequence[int] | None = None,
                    prompt_token_ids: Sequence[Sequence[int]] | None = None,
                    output_token_ids: Sequence[Sequence[int]] | None = None,
                    eos_token_ids: Collection[int] = (),
                    token_bitmask: np.ndarray | None = None) -> "SamplingTensors":
        """Builds the tensors on the host for `params[i]` in row i; rows past len(params) are greedy padding.

        Args:
          params: one SamplingParams per real row.
          num_rows: S, the batch bucket (>= len(params)).
          vocab_size: V of the logits.
          output_positions: per real row, how many tokens it has generated so far (the fold-in step of
            seeded rows); zeros when None.
          prompt_token_ids, output_token_ids: per real row, its token history; needed only when some
            row uses a penalty. Histories are padded to a power-of-two length so the step compiles for
            a few lengths only.
          eos_token_ids: the model's EOS ids, barred (with each row's stop_token_ids, as in vLLM) from
            rows that have fewer than `min_tokens` outputs, unless the row ignores EOS.
        """
        n = len(params)
        if num_rows < n:
            raise ValueError(f"num_rows must be >= len(params) ({n}), got {num_rows}")
        if output_positions is not None and len(output_positions) != n:
            raise ValueError(f"output_positions must have {n} entries, got {len(output_positions)}")

        # Rows usually share a few SamplingParams objects: each column is computed per distinct object and
        # spread over the rows with one gather (a per-row Python loop per column cost ~1 ms at 256 rows).
        slot: dict[int, int] = {}
        distinct: list[SamplingParams] = []
        row_of = np.empty(n, np.int64)
        for i, p in enumerate(params):
            j = slot.get(id(p))
            if j is None:
                j = slot[id(p)] = len(distinct)
                distinct.append(p)
            row_of[i] = j

        def column(values, fill, dtype):
            out = np.full((num_rows,), fill, dtype)
            if n:
                out[:n] = np.asarray(values, dtype)[row_of]
            return out

        top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in distinct]
        seeds = [(p.seed or 0) % 2**64 for p in distinct]
        seed = np.zeros((num_rows, 2), np.uint32)
        seed[:, 0] = column([s & 0xFFFFFFFF for s in seeds], 0, np.uint32)
        seed[:, 1] = column([s >> 32 for s in seeds], 0, np.uint32)
        use_penalties = any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0
                            for p in distinct)
        prompt_hist = output_hist = np.zeros((num_rows, 0), np.int32)
        if use_penalties:
            if prompt_token_ids is None or output_token_ids is None:
                raise ValueError("prompt_token_ids and output_token_ids are required when a row uses a penalty")
            prompt_hist = pad_histories(prompt_token_ids, num_rows)
            output_hist = pad_histories(output_token_ids, num_rows)
        positions = list(output_positions) if output_positions is not None else [0] * n
        barred = ([barred_ids(p, eos_token_ids) if pos < p.min_tokens else [] for p, pos in zip(params, positions)]
                  if any(p.min_tokens for p in distinct) else [])
        use_min_tokens = any(barred)
        barred_hist = (pad_histories(barred, num_rows, minimum=4) if use_min_tokens
                       else np.zeros((num_rows, 0), np.int32))
        if token_bitmask is not None and token_bitmask.shape != (num_rows, (vocab_size + 31) // 32):
            raise ValueError(f"token_bitmask must be [{num_rows}, {(vocab_size + 31) // 32}], got {token_bitmask.shape}")
        use_logit_bias = any(p.logit_bias for p in distinct)
        bias_ids = np.zeros((num_rows, 0), np.int32)
        bias_values = np.zeros((num_rows, 0), np.float32)
        if use_logit_bias:
            biases = [params[i].logit_bias or {} for i in range(n)]
            bias_ids = pad_histories([list(b) for b in biases], num_rows, minimum=4)
            bias_values = np.zeros(bias_ids.shape, np.float32)
            for i, b in enumerate(biases):
                bias_values[i, :len(b)] = list(b.values())
        return cls(
            temperature=np.asarray(column([p.temperature for p in distinct], 0.0, np.float32)),
            top_k=np.asarray(column(top_k, vocab_size, np.int32)),
            top_p=np.asarray(column([p.top_p for p in distinct], 1.0, np.float32)),
            min_p=np.asarray(column([p.min_p for p in distinct], 0.0, np.float32)),
            presence_penalty=np.asarray(column([p.presence_penalty for p in distinct], 0.0, np.float32)),
            frequency_penalty=np.asarray(column([p.frequency_penalty for p in distinct], 0.0, np.float32)),
            repetition_penalty=np.asarray(column([p.repetition_penalty for p in distinct], 1.0, np.float32)),
            seed=np.asarray(seed),
            has_seed=np.asarray(column([p.seed is not None for p in distinct], False, bool)),
            output_position=np.concatenate([np.asarray(positions, np.int32), np.zeros(num_rows - n, np.int32)]),
            prompt_tokens=np.asarray(prompt_hist),
            output_tokens=np.asarray(output_hist),
            min_tokens=np.asarray(column([p.min_tokens for p in distinct], 0, np.int32)),
            barred_ids=barred_hist,
            use_penalties=use_penalties,
            use_top_k_top_p=any(not p.greedy and (0 < p.top_k < vocab_size or p.top_p < 1.0) for p in distinct),
            use_min_p=any(not p.greedy and p.min_p > 0.0 for p in distinct),
            use_min_tokens=use_min_tokens,
            token_bitmask=(np.asarray(token_bitmask, np.int32) if token_bitmask is not None
                           else np.zeros((num_rows, 0), np.int32)),
            logit_bias_ids=bias_ids,
            logit_bias_values=bias_values,
            use_bitmask=token_bitmask is not None,
            use_logit_bias=use_logit_bias,
        )


def barred_ids(params: SamplingParams, eos_token_ids: Collection[int]) -> list[int]:
    """Ids a row may not sample before its min_tokens-th output: its stop_token_ids and, unless it
    ignores EOS, the EOS ids (vLLM's MinTokensLogitsProcessor)."""
    eos = () if params.ignore_eos else eos_token_ids
    return sorted(set(params.stop_token_ids) | {int(t) for t in eos})


def pad_histories(histories: Sequence[Sequence[int]], num_rows: int, minimum: int = 16) -> np.ndarray:
    """[num_rows, H] int32 of token ids padded with PAD_ID; H is a power of two >= minimum."""
    longest = max((len(h) for h in histories), default=0)
    width = max(minimum, 1 << (longest - 1).bit_length()) if longest else minimum
    out = np.full((num_rows, width), PAD_ID, np.int32)
    for i, h in enumerate(histories):
        out[i, :len(h)] = h
    return out


@struct.dataclass
class SamplerOutput:
    tokens: jax.Array        # [S] i32
    logprobs: jax.Array      # [S] f32, raw-model logprob of the sampled token
    ranks: jax.Array         # [S] i32, 1 + tokens whose raw logprob is higher (ties count against it)
    top_ids: jax.Array       # [S, K] i32, highest raw logprobs first
    top_logprobs: jax.Array  # [S, K] f32


def row_keys(tensors: SamplingTensors, key: jax.Array) -> jax.Array:
    """[S] keys: seeded rows fold their output position into their seed's key, others split `key`."""
    def seeded(seed, position):
        return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed[0]), seed[1]), position)

    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    own = jax.vmap(seeded)(tensors.seed, tensors.output_position)
    shared = jax.random.split(key, tensors.num_rows)
    return jnp.where(tensors.has_seed[:, None], own, shared)


def token_counts(token_ids: jax.Array, vocab_size: int) -> jax.Array:
    """[S, H] ids (PAD_ID padded) -> [S, V] i32 occurrence counts, one scatter-add."""
    rows = jnp.arange(token_ids.shape[0])[:, None]
    ids = jnp.where(token_ids < 0, vocab_size, token_ids)  # padding lands out of bounds and is dropped
    return jnp.zeros((token_ids.shape[0], vocab_size), jnp.int32).at[rows, ids].add(1, mode="drop")


def apply_penalties(logits: jax.Array, tensors: SamplingTensors) -> jax.Array:
    """vLLM/HF penalties on [S, V] logits: repetition, then frequency, then presence."""
    vocab_size = logits.shape[-1]
    output_counts = token_counts(tensors.output_tokens, vocab_size)
    seen = (output_counts > 0) | (token_counts(tensors.prompt_tokens, vocab_size) > 0)
    rep = jnp.where(seen, tensors.repetition_penalty[:, None], 1.0)
    logits = jnp.where(logits > 0, logits / rep, logits * rep)
    logits -= tensors.frequency_penalty[:, None] * output_counts
    return logits - tensors.presence_penalty[:, None] * (output_counts > 0)


def apply_logit_bias(logits: jax.Array, tensors: SamplingTensors) -> jax.Array:
    """Adds each row's biases at its biased ids (OpenAI's logit_bias)."""
    vocab_size = logits.shape[-1]
    ids = tensors.logit_bias_ids
    ids = jnp.where((ids >= 0) & (ids < vocab_size), ids, vocab_size)  # padding: out of bounds, dropped
    rows = jnp.arange(logits.shape[0])[:, None]
    return logits.at[rows, ids].add(tensors.logit_bias_values, mode="drop")


def apply_token_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """-inf where a row's packed bitmask ([S, ceil(V/32)] int32, bit t % 32 of word t // 32) is 0."""
    vocab_size = logits.shape[-1]
    bits = jnp.arange(32, dtype=jnp.int32)
    allowed = ((bitmask[:, :, None] >> bits) & 1).reshape(bitmask.shape[0], -1)[:, :vocab_size]
    return jnp.where(allowed != 0, logits, -jnp.inf)


def apply_min_tokens(logits: jax.Array, tensors: SamplingTensors) -> jax.Array:
    """-inf at each row's barred ids while the row has fewer than min_tokens outputs."""
    vocab_size = logits.shape[-1]
    active = (tensors.output_position < tensors.min_tokens)[:, None]
    ids = tensors.barred_ids
    ids = jnp.where(active & (ids >= 0), ids, vocab_size)  # inactive and padding: out of bounds, dropped
    rows = jnp.arange(logits.shape[0])[:, None]
    return logits.at[rows, ids].set(-jnp.inf, mode="drop")


def apply_min_p(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """Drops tokens whose probability is below min_p times the row's highest probability."""
    probs = jax.nn.softmax(logits, axis=-1)
    keep = probs >= min_p[:, None] * probs.max(axis=-1, keepdims=True)
    return jnp.where(keep, logits, -jnp.inf)


def apply_top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Keeps each row's top_k tokens, then the smallest set of those whose mass reaches top_p.

    Both cut-offs become one logit threshold per row from one descending sort (tokens tied with the last
    kept token are kept too).
    """
    vocab_size = logits.shape[-1]
    ordered = -jnp.sort(-logits, axis=-1)                                      # [S, V] descending
    rank = jnp.arange(vocab_size)[None, :]
    ordered = jnp.where(rank < top_k[:, None], ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = ((mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)) & (rank < top_k[:, None])
    keep = keep.at[:, 0].set(True)
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def raw_logprob_outputs(logits: jax.Array, tokens: jax.Array, num_top_logprobs: int):
    """Logprob and rank of `tokens` and the top `num_top_logprobs` under log_softmax(raw logits)."""
    logprobs = jax.nn.log_softmax(logits, axis=-1)                               # [S, V]
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    ranks = jnp.sum(logprobs >= chosen[:, None], axis=-1).astype(jnp.int32)
    top_logprobs, top_ids = jax.lax.top_k(logprobs, num_top_logprobs)
    return chosen, ranks, top_ids.astype(jnp.int32), top_logprobs


@jax.jit(static_argnames=("num_top_logprobs",))
def sample(logits: jax.Array, tensors: SamplingTensors, key: jax.Array, *,
           num_top_logprobs: int = 0) -> SamplerOutput:
    """Samples one token per row.

    Args:
      logits: [S, V] float32 raw model logits.
      tensors: the rows' settings (SamplingTensors.from_params), S rows.
      key: PRNG key (raw `PRNGKey` or typed `key`) for rows without a seed; a fresh one every step.
      num_top_logprobs: K, how many top raw logprobs to return per row (0 to 20).

    Returns:
      SamplerOutput with tokens [S], the raw logprob and rank of each token, and the top K.
    """
    if logits.ndim != 2 or logits.shape[0] != tensors.num_rows:
        raise ValueError(f"logits must be [S={tensors.num_rows}, V], got shape {logits.shape}")
    if not 0 <= num_top_logprobs <= SamplingParams.MAX_LOGPROBS:
        raise ValueError(f"num_top_logprobs must be in [0, {SamplingParams.MAX_LOGPROBS}], got {num_top_logprobs}")
    raw = logits.astype(jnp.float32)
    processed = apply_logit_bias(raw, tensors) if tensors.use_logit_bias else raw
    if tensors.use_bitmask:
        processed = apply_token_bitmask(processed, tensors.token_bitmask)
    if tensors.use_penalties:
        processed = apply_penalties(processed, tensors)
    if tensors.use_min_tokens:
        processed = apply_min_tokens(processed, tensors)
    greedy_tokens = jnp.argmax(processed, axis=-1)
    greedy = tensors.temperature == 0.0
    scaled = processed / jnp.where(greedy, 1.0, tensors.temperature)[:, None]
    if tensors.use_min_p:
        scaled = apply_min_p(scaled, tensors.min_p)
    if tensors.use_top_k_top_p:
        scaled = apply_top_k_top_p(scaled, tensors.top_k, tensors.top_p)
    gumbel = jax.vmap(lambda k: jax.random.gumbel(k, raw.shape[-1:], jnp.float32))(row_keys(tensors, key))
    drawn = jnp.argmax(scaled + gumbel, axis=-1)
    tokens = jnp.where(greedy, greedy_tokens, drawn).astype(jnp.int32)
    logprobs, ranks, top_ids, top_logprobs = raw_logprob_outputs(raw, tokens, num_top_logprobs)
    return SamplerOutput(tokens=tokens, logprobs=logprobs, ranks=ranks, top_ids=top_ids,
                         top_logprobs=top_logprobs)
