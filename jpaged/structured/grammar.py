"""Per-request grammar matchers and the packed token bitmask the sampler applies (llguidance).

`Constraints` is owned by one engine replica: `check(params)` compiles a request's constraint at
admission (a bad one is a ValueError before any page is taken), and `bitmask(rows, ...)` builds the
step's `[S, ceil(V/32)]` int32 mask on the host (bit t of word t // 32 set: token t allowed; rows without
a constraint are all ones). Each sequence gets its own matcher the first time it is sampled under a
constraint; before every mask it consumes the sequence's output tokens it has not seen, so matchers
follow preemption, n > 1 forks and async scheduling (a pending token is read from the previous step)
without hooks elsewhere. A matcher whose grammar is complete allows only EOS, so the sequence ends.
"""
from __future__ import annotations

import logging
import os
import weakref
from typing import Callable, Sequence

import numpy as np

from jpaged.structured.params import StructuredOutputsParams, import_llguidance

log = logging.getLogger("jpaged.structured")

PLACEHOLDER = -1  # jpaged.engine.sequence.PLACEHOLDER: a token of a step not read back yet


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def ll_tokenizer(tokenizer, vocab_size: int, eos_token_ids: Sequence[int]):
    """llguidance's view of a jpaged Tokenizer (its `tokenizers.Tokenizer` serialised to JSON)."""
    llguidance = import_llguidance()
    inner = getattr(tokenizer, "_tok", None)
    if inner is None or not hasattr(inner, "to_str"):
        raise ValueError("structured outputs need a tokenizer built on a `tokenizers.Tokenizer` (tokenizer.json)")
    return llguidance.LLTokenizer(inner.to_str(), n_vocab=vocab_size, eos_token=list(eos_token_ids))


class _Matcher:
    """One sequence's matcher and how many of its output tokens it has consumed."""

    __slots__ = ("matcher", "consumed", "__weakref__")

    def __init__(self, matcher):
        self.matcher, self.consumed = matcher, 0


class Constraints:
    """Compiled grammars (cached by constraint) and per-sequence matchers of one engine replica.

    Args:
      tokenizer: the engine's Tokenizer; llguidance's tokenizer is built from it on first use.
      vocab_size: V of the model's logits (the mask has ceil(V/32) words).
      eos_token_ids: what a finished grammar allows.
    """

    MAX_CACHED_GRAMMARS = 256

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Sequence[int]):
        self._tokenizer, self.vocab_size, self.eos_token_ids = tokenizer, vocab_size, tuple(eos_token_ids)
        self._ll = None  # llguidance.LLTokenizer, built on first use
        self._grammars: dict[tuple, str] = {}
        self._matchers: "weakref.WeakKeyDictionary[object, _Matcher]" = weakref.WeakKeyDictionary()
        self._executor = None  # llguidance.LLExecutor, its thread pool
        self.words = bitmask_words(vocab_size)

    @property
    def ll(self):
        if self._ll is None:
            self._ll = ll_tokenizer(self._tokenizer, self.vocab_size, self.eos_token_ids)
        return self._ll

    def grammar(self, params: StructuredOutputsParams) -> str:
        """The constraint's llguidance grammar, checked against the tokenizer; ValueError naming the
        kind when it does not compile."""
        key = params.key
        grammar = self._grammars.get(key)
        if grammar is None:
            try:
                grammar = params.to_grammar()
            except ValueError as e:
                raise ValueError(f"structured_outputs.{params.kind}: {e}") from None
            is_error, messages = import_llguidance().LLMatcher.validate_grammar_with_warnings(grammar, self.ll)
            if is_error:
                raise ValueError(f"structured_outputs.{params.kind} does not compile: {messages[0].strip()}")
            if len(self._grammars) >= self.MAX_CACHED_GRAMMARS:  # oldest first
                self._grammars.pop(next(iter(self._grammars)))
            self._grammars[key] = grammar
        return grammar

    def check(self, params: StructuredOutputsParams) -> None:
        """Admission check: compiles (and caches) the constraint, or raises ValueError."""
        self.grammar(params)

    def _matcher_of(self, seq) -> _Matcher:
        key = getattr(seq, "parent", seq)  # an n > 1 sample not forked yet shares its parent's state
        m = self._matchers.get(key)
        if m is None:
            grammar = self.grammar(key.sampling_params.structured_outputs)
            m = self._matchers[key] = _Matcher(import_llguidance().LLMatcher(self.ll, grammar, log_level=0))
        return m

    def _sync(self, seq, m: _Matcher, pending_token: Callable[[object], int | None]) -> None:
        """Feeds the matcher the sequence's output tokens it has not consumed yet."""
        outputs = seq.token_ids[seq.num_prompt_tokens:]
        if m.consumed >= len(outputs):
            return
        new = outputs[m.consumed:]
        if new[-1] == PLACEHOLDER:
            token = pending_token(seq)
            if token is None:
                raise RuntimeError(f"seq_id {seq.seq_id}: a constrained sequence's pending token is unknown")
            new = [*new[:-1], token]
        m.consumed = len(outputs)
        if not m.matcher.is_error() and not m.matcher.consume_tokens([int(t) for t in new]):
            # Only a token the mask did not allow gets here (an EOS dropped after the stop, or a
            # min_tokens bar that left no allowed token): the row is then held to EOS.
            log.debug("seq_id %s left its grammar: %s", seq.seq_id, m.matcher.get_error())

    def bitmask(self, rows: Sequence, num_rows: int,
                pending_token: Callable[[object], int | None] = lambda seq: None) -> np.ndarray | None:
        """[num_rows, ceil(V/32)] int32 for the sampler rows `rows` (Sequence or n > 1 samples), or None
        when no row is constrained. `pending_token(seq)` is the sampled value of a PLACEHOLDER."""
        constrained = [(r, row) for r, row in enumerate(rows)
                       if row.sampling_params.structured_outputs is not None]
        if not constrained:
            return None
        llguidance = import_llguidance()
        mask = np.full((num_rows, self.words), -1, np.int32)
        work: list[tuple[object, int]] = []  # (llguidance.LLMatcher, row)
        first_row: dict[int, int] = {}  # id(matcher) -> its row; n > 1 samples of one parent share it
        copies: list[tuple[int, int]] = []
        for r, row in constrained:
            m = self._matcher_of(row)
            self._sync(getattr(row, "parent", row), m, pending_token)
            if m.matcher.is_error():
                mask[r] = self._eos_only()
            elif id(m) in first_row:
                copies.append((r, first_row[id(m)]))
            else:
                first_row[id(m)] = r
                work.append((m.matcher, r))
        if work:
            if self._executor is None:
                self._executor = llguidance.LLExecutor(num_threads=min(8, os.cpu_count() or 1))
            llguidance.numpy.fill_next_token_bitmask_par(self._executor, work, mask)
        for r, src in copies:
            mask[r] = mask[src]
        return mask

    def _eos_only(self) -> np.ndarray:
        row = np.zeros(self.words, np.uint32)
        for t in self.eos_token_ids:
            row[t // 32] |= np.uint32(1 << (t % 32))
        return row.view(np.int32)
