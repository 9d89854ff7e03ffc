"""SamplingParams: how one request is decoded, validated at the API boundary (names follow vLLM)."""
from __future__ import annotations

import dataclasses

from jpaged.structured.params import StructuredOutputsParams


@dataclasses.dataclass
class SamplingParams:
    n: int = 1
    best_of: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    use_beam_search: bool = False
    beam_width: int | None = None
    length_penalty: float = 1.0
    skip_special_tokens: bool = True
    # "cumulative": Engine.step reports the request after every token (streaming); "final_only": only
    # once it has finished (what LLM.generate asks for), which also lets the engine detokenize once at
    # the end instead of token by token when there are no stop strings.
    output_kind: str = "cumulative"
    # Structured outputs, logit_bias and priority (docs/structured_outputs.md).
    structured_outputs: StructuredOutputsParams | None = None  # constrains the output to a grammar
    logit_bias: dict[int, float] | None = None  # token id -> bias added to its logit, in [-100, 100]
    priority: int = 0  # lower runs first under scheduling_policy="priority" (Engine.add_request's default)

    MAX_LOGPROBS = 20
    MAX_LOGIT_BIAS = 100.0
    MAX_STOP_TOKEN_IDS = 64  # the sampler's barred-id table is of a fixed width (jpaged/engine/step_variants.py)
    OUTPUT_KINDS = ("cumulative", "final_only")

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.best_of is None:
            self.best_of = self.n
        if self.use_beam_search and self.beam_width is None:
            self.beam_width = max(self.n, 2)
        self._validate()

    def _validate(self) -> None:
        def check(ok: bool, msg: str):
            if not ok:
                raise ValueError(msg)

        check(isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        check(isinstance(self.best_of, int) and self.best_of >= self.n,
              f"best_of must be an integer >= n ({self.n}), got {self.best_of!r}")
        check(self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}")
        check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        check(isinstance(self.top_k, int) and (self.top_k == -1 or self.top_k >= 1),
              f"top_k must be -1 (off) or >= 1, got {self.top_k!r}")
        check(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}")
        check(-2.0 <= self.presence_penalty <= 2.0,
              f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        check(-2.0 <= self.frequency_penalty <= 2.0,
              f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        check(0.0 < self.repetition_penalty <= 2.0,
              f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
              f"max_tokens must be an integer >= 1 or None, got {self.max_tokens!r}")
        check(isinstance(self.min_tokens, int) and self.min_tokens >= 0
              and (self.max_tokens is None or self.min_tokens <= self.max_tokens),
              f"min_tokens must be in [0, max_tokens], got {self.min_tokens!r}")
        check(all(isinstance(s, str) and s for s in self.stop), f"stop must be non-empty strings, got {self.stop!r}")
        check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
              f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        check(len(self.stop_token_ids) <= self.MAX_STOP_TOKEN_IDS,
              f"stop_token_ids must hold at most {self.MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}")
        check(self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            check(value is None or (isinstance(value, int) and 0 <= value <= self.MAX_LOGPROBS),
                  f"{name} must be an integer in [0, {self.MAX_LOGPROBS}] or None, got {value!r}")
        check(self.output_kind in self.OUTPUT_KINDS,
              f"output_kind must be one of {self.OUTPUT_KINDS}, got {self.output_kind!r}")
        check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
              f"structured_outputs must be a StructuredOutputsParams, got {type(self.structured_outputs).__name__}")
        check(self.structured_outputs is None or not self.use_beam_search,
              "structured_outputs is not supported with beam search")
        check(self.logit_bias is None or (isinstance(self.logit_bias, dict) and all(
            isinstance(t, int) and t >= 0 and isinstance(b, (int, float)) and abs(b) <= self.MAX_LOGIT_BIAS
            for t, b in self.logit_bias.items())),
            f"logit_bias must map token ids (integers >= 0) to biases in [-{self.MAX_LOGIT_BIAS:g}, "
            f"{self.MAX_LOGIT_BIAS:g}], got {self.logit_bias!r}")
        check(isinstance(self.priority, int), f"priority must be an integer, got {self.priority!r}")
        if self.use_beam_search:
            check(self.n <= self.beam_width <= self.MAX_LOGPROBS // 2,
                  f"beam_width must be in [n ({self.n}), {self.MAX_LOGPROBS // 2}], got {self.beam_width}")
            check(self.temperature == 0.0, "beam search needs temperature 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
