"""Acceptance figures of speculative decoding, per request and for the engine."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class AcceptanceStats:
    """`verify_steps` verifications proposed `proposed` tokens and accepted `accepted` of them; each
    also yields one token of the target's own, so a step emits accepted / verify_steps + 1 on average."""

    proposed: int = 0
    accepted: int = 0
    verify_steps: int = 0

    def add(self, proposed: int, accepted: int) -> None:
        self.proposed += proposed
        self.accepted += accepted
        self.verify_steps += 1

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verifying step: accepted proposals plus the target's token (0 before any)."""
        return 1.0 + self.accepted / self.verify_steps if self.verify_steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def as_dict(self) -> dict:
        return dict(proposed=self.proposed, accepted=self.accepted, verify_steps=self.verify_steps,
                    mean_accepted_length=self.mean_accepted_length, acceptance_rate=self.acceptance_rate)
