"""The draft-model proposer: a second, small model with its own paged KV cache in the same engine.

The draft's pool has as many pages as the target's and is indexed by the same block tables, so the
block manager's allocations, copy-on-write copies and rollbacks serve both; only the page contents
differ. Each sequence's draft KV is computed lazily: when it speculates, the draft first catches up
on the tokens it has not seen (the prompt, the last accepted proposal), then proposes k tokens in k
batched one-token steps that take each other's tokens on the device and are read back together.
The draft proposes its argmax (q one-hot, verify.py says why that keeps sampling exact).
"""
from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from jpaged.engine.model_runner import ModelRunner, SampleRow, serving_spec
from jpaged.engine.sequence import PLACEHOLDER
from jpaged.sampling_params import SamplingParams
from pallas_kernels import select_backend

_GREEDY = SamplingParams(temperature=0.0)
_PROBE = "The quick brown fox jumps over the lazy dog. 0123456789 <|im_start|> naïve café 東京"


def truncated(model, num_layers: int):
    """A model of `model`'s first num_layers decoder layers and its embedding, norm and head, sharing
    their arrays (no copy), fused or not as `model` is."""
    from models.llama import LlamaForCausalLM

    cfg = model.config
    if not 1 <= num_layers <= cfg.num_layers:
        raise ValueError(f"speculative_config draft_num_layers must be in [1, {cfg.num_layers}] for this "
                         f"model, got {num_layers}")
    fused = getattr(model.layers[0].self_attn, "q_proj", None) is None  # fused in place by a runner

    def build():
        small = LlamaForCausalLM(dataclasses.replace(cfg, num_layers=num_layers), dtype=model.dtype)
        if fused:
            small.fuse_projections()
        return small

    small = nnx.eval_shape(build)
    source = nnx.to_pure_dict(nnx.state(model))
    source["layers"] = {i: source["layers"][i] for i in range(num_layers)}
    state = nnx.state(small)
    nnx.replace_by_pure_dict(state, source)
    nnx.update(small, state)
    return small


def check_tokenizers(target, draft, target_vocab: int, draft_vocab: int) -> None:
    """ValueError unless the draft tokenizes as the target does (its tokens are verified by id)."""
    if target_vocab != draft_vocab:
        raise ValueError(f"the draft model's vocabulary ({draft_vocab}) differs from the target's ({target_vocab}); "
                         "speculative decoding needs a draft with the target's tokenizer")
    if target is None or draft is None:
        return
    if (target.encode(_PROBE) != draft.encode(_PROBE)
            or tuple(getattr(target, "eos_token_ids", ())) != tuple(getattr(draft, "eos_token_ids", ()))):
        raise ValueError("the draft model's tokenizer differs from the target's (ids or EOS); speculative "
                         "decoding needs a draft with the target's tokenizer")


class _DraftSeq:
    """A sequence as the draft runner sees it: its tokens up to the last accepted one, then slots for
    the proposals (their values come from the previous draft step on the device)."""

    sampling_params = _GREEDY

    def __init__(self, seq, start: int, k: int):
        self.seq_id = seq.seq_id
        self.block_table = seq.block_table
        self.num_prompt_tokens = seq.num_prompt_tokens
        self.token_ids = seq.token_ids[:start + 1] + [PLACEHOLDER] * k
        self.num_output_tokens = len(self.token_ids) - self.num_prompt_tokens
        self.output_token_ids = self.token_ids[self.num_prompt_tokens:]


@dataclasses.dataclass
class _Chunk:  # the runner's view of a scheduled entry
    seq: _DraftSeq
    start: int
    num_tokens: int


@dataclasses.dataclass
class _DraftState:
    block_table: list  # the target's table the draft KV was written through (a new list: pages moved)
    num_computed: int


class DraftProposer:
    def __init__(self, config, model, *, num_pages: int, max_model_len: int):
        if model.config.sliding_window is not None:
            raise ValueError("speculative_config method 'draft_model' is not supported with a sliding-window draft")
        config = dataclasses.replace(config, num_host_kv_blocks=0, preemption_mode="recompute")
        spec = serving_spec(model, config)
        backend = select_backend(jax.devices()[0], spec, config.backend)
        self.runner = ModelRunner(config, model, spec=spec, backend=backend, num_pages=num_pages,
                                  max_model_len=max_model_len)
        self.max_tokens = config.max_num_batched_tokens
        self.max_chunks = config.max_num_prefill_seqs
        self._states: dict[int, _DraftState] = {}
        self._num_steps = 0

    def copy_pages(self, pairs) -> None:
        """The target's copy-on-write copies, done on the draft's pages too."""
        self.runner.copy_pages(pairs)

    def forget(self, live_seq_ids) -> None:
        """Drops the state of sequences no longer running."""
        for seq_id in set(self._states) - set(live_seq_ids):
            del self._states[seq_id]

    def propose(self, entries) -> None:
        """Writes k draft tokens into each entry's proposal slots (seq.token_ids[start+1 : start+1+k])."""
        views = {e.seq.seq_id: _DraftSeq(e.seq, e.start, e.num_proposed) for e in entries}
        self._catch_up(entries, views)
        launched, prev, prev_rows = [], None, {}
        for i in range(max(e.num_proposed for e in entries)):
            active = [e for e in entries if e.num_proposed > i]
            chunks = [_Chunk(views[e.seq.seq_id], e.start + i, 1) for e in active]
            rows = [SampleRow(j, c.seq) for j, c in enumerate(chunks)]
            pending = {e.seq.seq_id: (e.start + i, prev_rows[e.seq.seq_id]) for e in active} if i else None
            prev = self.runner.launch(chunks, rows, self._next_step(), pending=pending, prev=prev)
            prev_rows = {e.seq.seq_id: j for j, e in enumerate(active)}
            launched.append((active, prev))
        for i, (active, handle) in enumerate(launched):
            tokens = self.runner.fetch(handle).tokens.tolist()
            for e, token in zip(active, tokens):
                e.seq.token_ids[e.start + 1 + i] = token
        for e in entries:
            self._states[e.seq.seq_id] = _DraftState(e.seq.block_table, e.start + e.num_proposed)

    def _catch_up(self, entries, views) -> None:
        """Computes the draft KV of every token before each entry's start that the draft lacks, in
        steps under the token budget and the prefill-chunk cap."""
        todo = []
        for e in entries:
            state = self._states.get(e.seq.seq_id)
            done = min(state.num_computed, e.start) if state and state.block_table is e.seq.block_table else 0
            if done < e.start:
                todo.append([e, done])
        while todo:
            budget, multi, chunks = self.max_tokens, 0, []
            for item in todo:
                e, done = item
                n = min(e.start - done, budget)
                if n == 0:
                    break
                if n > 1 and self.max_chunks is not None and multi >= self.max_chunks:
                    continue
                chunks.append(_Chunk(views[e.seq.seq_id], done, n))
                item[1] += n
                budget -= n
                multi += n > 1
            self.runner.launch(chunks, [], self._next_step())
            todo = [item for item in todo if item[1] < item[0].start]

    def _next_step(self) -> int:
        self._num_steps += 1
        return self._num_steps
