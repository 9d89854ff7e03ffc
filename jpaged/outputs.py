"""What the engine hands back for a request (names follow vLLM's RequestOutput / CompletionOutput)."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    # One dict per generated token: token id -> Logprob (the sampled token and the top-k).
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    # Timestamps (time.monotonic()) for serving metrics.
    arrival_time: float | None = None
    first_token_time: float | None = None
    # Speculative decoding's figures for the request (proposed, accepted, verify_steps,
    # mean_accepted_length, acceptance_rate); None without speculation.
    spec_decode: dict | None = None
