"""Token ids -> streamed text: incremental detokenization and stop strings, on the host after sampling.

The scheduler's postprocess feeds each sequence's new token ids to its `IncrementalDetokenizer`
(text that is safe to show) and that text to its `StopStringChecker` (text that is safe to emit,
and whether a stop string ended the sequence). Both work with any tokenizer that has
`decode(ids, skip_special_tokens=...)` (HF tokenizers, `tokenizers.Tokenizer`).
"""
from __future__ import annotations

from typing import Sequence

REPLACEMENT_CHAR = "\ufffd"
# Tokens of the prompt decoded as context, so the first output token's leading space (SentencePiece
# and byte-level BPE encode it inside the token) decodes as it does mid-sentence.
CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Decodes a growing token list, emitting only complete characters (vLLM's prefix/read offsets).

    A window `ids[prefix_offset:]` is decoded and compared with `ids[prefix_offset:read_offset]`, the
    part already emitted; the difference is new text unless it ends in U+FFFD, which means the last
    token stopped in the middle of a UTF-8 character: then nothing is emitted until a later token
    completes it (or `flush` at the end).
    """

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int] = (), *, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids = list(prompt_token_ids)
        self.read_offset = len(self._ids)
        self.prefix_offset = max(self.read_offset - CONTEXT_TOKENS, 0)
        self.text = ""

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=self._skip_special_tokens)

    def _pending_text(self) -> str:
        prefix = self._decode(self._ids[self.prefix_offset:self.read_offset])
        window = self._decode(self._ids[self.prefix_offset:])
        return window[len(prefix):] if len(window) > len(prefix) else ""

    def add_tokens(self, token_ids: Sequence[int]) -> str:
        """Appends generated ids; returns the text that became complete (possibly "")."""
        self._ids.extend(token_ids)
        new_text = self._pending_text()
        if not new_text or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self._ids)
        self.text += new_text
        return new_text

    def flush(self) -> str:
        """At the end of the sequence: whatever is still held back, even an incomplete character."""
        new_text = self._pending_text()
        self.prefix_offset = self.read_offset = len(self._ids)
        self.text += new_text
        return new_text


class StopStringChecker:
    """Cuts the output at the first stop string and never emits any part of one.

    Text that could be the start of a stop string completed by later tokens (the last
    `len(longest stop) - 1` characters) is held back until it cannot be.
    """

    def __init__(self, stop: Sequence[str] = ()):
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop must be non-empty strings, got {list(stop)!r}")
        self.stop = list(stop)
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self._text = ""        # everything received, until the stop string
        self._emitted = 0      # characters of _text already returned
        self.matched: str | None = None

    def feed(self, new_text: str) -> tuple[str, str | None]:
        """Adds detokenized text; returns (text safe to emit now, the stop string that matched or None)."""
        if self.matched is not None:
            return "", self.matched
        search_from = max(len(self._text) - self._hold, 0)
        self._text += new_text
        hits = [(i, n, s) for n, s in enumerate(self.stop) if (i := self._text.find(s, search_from)) >= 0]
        if hits:
            cut, _, self.matched = min(hits)
            self._text = self._text[:cut]
            return self._emit(len(self._text)), self.matched
        return self._emit(len(self._text) - self._hold), None

    def flush(self) -> str:
        """At the end of the sequence (no stop string matched): the held-back tail."""
        return self._emit(len(self._text))

    @property
    def text(self) -> str:
        """The output text so far, without the stop string."""
        return self._text

    def _emit(self, end: int) -> str:
        end = max(end, self._emitted)
        out = self._text[self._emitted:end]
        self._emitted = end
        return out
