"""Sequence: one generation stream's host-side state (tokens, progress, pages, status).

Where it sits: the engine creates a `Sequence` per request (and the scheduler forks more for n > 1);
the `Scheduler` moves it between its queues and the `BlockManager` fills `block_table`. Nothing here
touches JAX.

Progress is `num_computed_tokens`: the tokens whose K/V are in the cache. A sequence with
`num_tokens - num_computed_tokens == 1` is decoding (its last token is the one sampled last step);
more than one left means a prompt (or a recompute after preemption) still being prefilled.

Status and where the K/V live:
  WAITING   no pages (never admitted, or preempted by recompute)
  RUNNING   device pages in `block_table`
  SWAPPED   host pages in `host_block_table` (preempted by swap)
  FETCHING  admitted with prefix pages on the host tier: device pages held, their data on its way
  FINISHED  no pages; `finish_reason` says why
"""
from __future__ import annotations

import dataclasses
import enum
import time

from jpaged.sampling_params import SamplingParams


# The token a launched but not yet finished step will sample (async scheduling): it stands in
# token_ids until the step's output is read, and the next step takes its value on the device.
PLACEHOLDER = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FETCHING = "fetching"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)  # identity equality: sequences go in sets and dicts
class Sequence:
    seq_id: int
    request_id: str
    token_ids: list[int]  # prompt + output
    sampling_params: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    priority: int = 0  # lower runs first under scheduling_policy="priority"
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    adapter_id: int = 0  # LoRA adapter (0: the base model); part of every prefix-cache key
    num_prompt_tokens: int = -1  # -1: len(token_ids) at construction
    num_computed_tokens: int = 0
    block_table: list[int] = dataclasses.field(default_factory=list)  # logical -> device page; -1 released
    host_block_table: list[int] = dataclasses.field(default_factory=list)  # while SWAPPED; -1 released
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    # Prefix-cache bookkeeping, kept by the BlockManager: the chain key of each full page of
    # token_ids computed so far (a pure function of the tokens), and how many leading pages of
    # block_table have been offered to the cache.
    page_keys: list[int] = dataclasses.field(default_factory=list)
    num_registered_pages: int = 0
    # Prompt logprobs not all scored yet (jpaged/engine/prompt_logprobs.py): the scheduler caps its prompt
    # chunks at the step's scoring rows and gives it no prefix-cache hit.
    scores_pending: bool = False

    def __post_init__(self):
        if not self.token_ids:
            raise ValueError(f"token_ids must be a non-empty list of token ids (seq_id={self.seq_id})")
        if self.num_prompt_tokens == -1:
            self.num_prompt_tokens = len(self.token_ids)
        if not 1 <= self.num_prompt_tokens <= len(self.token_ids):
            raise ValueError(f"num_prompt_tokens must be in [1, {len(self.token_ids)}], "
                             f"got {self.num_prompt_tokens}")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def has_pending_token(self) -> bool:
        """The last token is a PLACEHOLDER: sampled by a step whose output has not been read yet."""
        return self.token_ids[-1] == PLACEHOLDER

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def clone(self, seq_id: int) -> Sequence:
        """A copy with its own lists and no pages (the block manager decides what it shares)."""
        return dataclasses.replace(
            self, seq_id=seq_id, token_ids=list(self.token_ids), block_table=[], host_block_table=[],
            page_keys=list(self.page_keys), num_computed_tokens=0, num_registered_pages=0,
            status=SequenceStatus.WAITING, finish_reason=None)
