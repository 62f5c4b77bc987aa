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
    """What one generation did and how long it took (``SplitClient.last_stats``).

    Two figures describe its speed, because they measure different things: :attr:`ttft_ms`, the
    wait for the first token (the prompt's pass, plus whatever a first request pays: connecting,
    loading the local layers, warming up ONNX Runtime), and :attr:`decode_tokens_per_s`, the
    rate of the tokens after it. :attr:`tokens_per_s` mixes both (all tokens over all the time),
    so a short first reply looks slow by it; displays show the two figures instead. Loading the
    speculative draft model, which happens once per client at its first draft (after a first
    token), is :attr:`draft_load_s` and not decoding either.
    """

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_tokens: int = 0
    seconds: float = 0.0  # the request to its last token, prompt included
    first_token_s: float = 0.0  # the request to its first token
    stop_reason: str = ""
    split: int | None = None
    codec: str = ""
    new_ids: list[int] = field(default_factory=list)
    server_units: int = 0  # units on the server in the placement the generation ended with
    steps: int = 0  # passes through the model (round trips when a server takes part), prompt included
    drafted: int = 0  # speculative drafts sent for verification
    accepted: int = 0  # drafts the model agreed with
    draft_load_s: float = 0.0  # loading the draft model during this generation (its client's first draft)

    @property
    def tokens_per_s(self) -> float:
        """All new tokens over the whole request, prompt and first-request costs included."""
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def ttft_ms(self) -> float:
        """Milliseconds from the request to its first token."""
        return self.first_token_s * 1e3

    @property
    def decode_seconds(self) -> float:
        """Seconds from the first token to the last, less loading the draft model."""
        return max(self.seconds - self.first_token_s - self.draft_load_s, 0.0)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first over the time after the first (0.0 with fewer than two tokens)."""
        decoded = self.new_tokens - 1
        return decoded / self.decode_seconds if decoded > 0 and self.decode_seconds > 0 else 0.0

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
