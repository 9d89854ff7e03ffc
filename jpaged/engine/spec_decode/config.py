"""SpeculativeConfig: which proposer drafts tokens for speculative decoding, and how many per step.

The keys follow vLLM's `speculative_config`: `method` ("ngram" or "draft_model"),
`num_speculative_tokens` (k), `prompt_lookup_max` / `prompt_lookup_min` (n-gram sizes) and `model`
(the draft). `draft_num_layers` keeps only the draft's first N decoder layers (a cheap draft made
from any model, the target itself included). Unknown keys are refused by name.
"""
from __future__ import annotations

import dataclasses
import json

METHODS = ("ngram", "draft_model")
MAX_SPECULATIVE_TOKENS = 16


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    model: str | None = None
    draft_num_layers: int | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative_config method must be one of {', '.join(METHODS)}, got {self.method!r}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_config num_speculative_tokens must be an int in "
                             f"[1, {MAX_SPECULATIVE_TOKENS}], got {k!r}")
        if self.method == "ngram":
            if not (isinstance(self.prompt_lookup_min, int) and isinstance(self.prompt_lookup_max, int)
                    and 1 <= self.prompt_lookup_min <= self.prompt_lookup_max):
                raise ValueError("speculative_config needs 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                                 f"{self.prompt_lookup_min!r} and {self.prompt_lookup_max!r}")
            for name in ("model", "draft_num_layers"):
                if getattr(self, name) is not None:
                    raise ValueError(f"speculative_config {name!r} applies to method 'draft_model', not 'ngram'")
        else:
            if not isinstance(self.model, str) or not self.model:
                raise ValueError("speculative_config method 'draft_model' needs 'model': the draft's path or name")
            n = self.draft_num_layers
            if n is not None and (not isinstance(n, int) or n < 1):
                raise ValueError(f"speculative_config draft_num_layers must be an int >= 1, got {n!r}")

    @classmethod
    def parse(cls, value) -> SpeculativeConfig | None:
        """A SpeculativeConfig from itself, a dict or a JSON object string (None stays None)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config must be a JSON object, got {value!r} ({e.msg})") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a dict or a JSON object, got {type(value).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config keys {unknown} are not supported (known: {sorted(known)})")
        for name in ("method", "num_speculative_tokens"):
            if name not in value:
                raise ValueError(f"speculative_config needs {name!r}")
        return cls(**value)
