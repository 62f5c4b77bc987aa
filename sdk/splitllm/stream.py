"""What a generation yields and reports, and the stop-string filter it streams through."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["GenerationStats", "StopText", "TokenPiece", "common_prefix"]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share (the KV a new prompt can reuse)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True)
class TokenPiece:
    """One generated token and the text it added (may be "" mid-character)."""

    token_id: int
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_tokens: int = 0
    seconds: float = 0.0
    first_token_s: float = 0.0
    stop_reason: str = ""
    split: int | None = None
    codec: str = ""
    new_ids: list[int] = field(default_factory=list)
    server_units: int = 0  # units on the server in the placement the generation ended with
    steps: int = 0  # passes through the model (round trips when a server takes part), prompt included
    drafted: int = 0  # speculative drafts sent for verification
    accepted: int = 0  # drafts the model agreed with

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens per pass through the model (above 1 only when speculation pays)."""
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class StopText:
    """Holds back text that might begin a stop string; reports when one appears."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str, final: bool = False) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.pending += text
        for s in self.stops:
            at = self.pending.find(s)
            if at >= 0:
                out, self.pending = self.pending[:at], ""
                return out, True
        if final:
            out, self.pending = self.pending, ""
            return out, False
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out, False
