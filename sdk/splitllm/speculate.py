"""Speculative decoding across the split: drafts made on the device, verified in one round trip.

Every token of a split generation crosses the network, so the round trip caps its speed. The
device already holds the whole model and the conversation, so it can guess the next few tokens
(the *drafts*); the split model then runs over the last token and all drafts at once, one round
trip, and keeps the longest prefix of drafts that equals its own greedy choices, plus its own
next token. The output is the one greedy decoding gives, token for token (the split model decides
every token); only the number of round trips changes.

Drafters:

- :class:`NgramDrafter` (prompt lookup): the tokens that followed the latest earlier occurrence
  of the context's last n-gram. Free; good when the answer repeats its context (code, quotes).
- :class:`ModelDrafter`: the whole model on the device, in its smallest weights variant (int4
  when the bundle has it), greedy, with a KV cache of its own kept in step with the conversation.

:class:`GammaController` picks how many drafts to make from the measured acceptance rate, the
link's round trip and what drafting and verifying cost here, and turns speculation off where it
does not pay (fast links, low acceptance). Sampling (temperature > 0) is not speculated: exact
speculative sampling needs the drafter's distribution at every position, and the greedy check
would change the sampled distribution; generation then runs one token per round trip.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from splitllm.errors import ConfigError
from splitllm.model.bundle import Bundle
from splitllm.model.runtime import KVCache, RuntimeOptions, Segment

__all__ = ["DraftModelLoader", "GammaController", "ModelDrafter", "NgramDrafter", "SpeculationStats",
           "parse_speculate"]

MAX_GAMMA = 8
_MIN_RTT_MS = 10.0  # below this, before anything was measured, a round trip costs less than drafting
_REPROBE_ROUNDS = 16
_NGRAM_SIZES = (4, 3, 2)


def parse_speculate(value: str | int | None) -> int | None:
    """``"off"`` / 0 -> 0, ``"auto"`` / None -> None (adaptive), N -> N drafts per round trip."""
    if value is None or value == "auto":
        return None
    if value == "off":
        return 0
    try:
        n = int(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"speculate must be 'auto', 'off' or a number of drafts, got {value!r}") from exc
    if not 0 <= n <= MAX_GAMMA:
        raise ConfigError(f"speculate must be between 0 and {MAX_GAMMA} drafts, got {n}")
    return n


@dataclass
class SpeculationStats:
    """What speculation did in one generation."""

    rounds: int = 0  # verification round trips
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class NgramDrafter:
    """Prompt lookup: continue the context's last n-gram as it continued the last time it appeared.

    Tries the longest n-grams first, down to ``min_n`` tokens."""

    def __init__(self, min_n: int = 2) -> None:
        self.min_n = min_n

    def propose(self, context: Sequence[int], gamma: int) -> list[int]:
        if gamma <= 0:
            return []
        seq = list(context)
        for n in (n for n in _NGRAM_SIZES if n >= self.min_n):
            if len(seq) <= n:
                continue
            tail = seq[-n:]
            for start in range(len(seq) - n - 1, -1, -1):  # latest earlier occurrence first
                if seq[start:start + n] == tail:
                    follow = seq[start + n:start + n + gamma]
                    if follow:
                        return follow
        return []


class ModelDrafter:
    """The whole model on the device (``variant`` weights), greedy, with its own KV cache.

    Its cache follows the conversation: :meth:`propose` first runs whatever context positions it
    has not seen, and :meth:`keep` cuts it back to the positions the verification accepted.
    """

    def __init__(self, bundle: Bundle, variant: str, options: RuntimeOptions) -> None:
        self.segment = Segment(bundle, 0, bundle.num_units, last_logits_only=True, options=options, variant=variant)
        self.cache = KVCache(bundle.shapes)
        self.seen: list[int] = []  # positions whose KV the draft cache holds
        self.step_ms: float | None = None  # one incremental draft step (catching up is not drafting)

    def _sync(self, context: Sequence[int]) -> np.ndarray:
        """Bring the cache to ``context`` minus its last token; run the last one; its logits."""
        common = 0
        for a, b in zip(self.seen, context, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(context) - 1)
        if common < len(self.seen):
            self.cache.truncate(common)
            del self.seen[common:]
        feed = list(context[common:])
        logits = self.segment.run(np.asarray([feed], dtype=np.int64), self.cache, common)
        self.seen.extend(feed)
        return logits[0, -1]

    def propose(self, context: Sequence[int], gamma: int) -> list[int]:
        """``gamma`` greedy tokens after ``context`` (blocking: call it on the device thread)."""
        if gamma <= 0:
            return []
        began = time.perf_counter()
        caught_up = len(context) - len(self.seen) <= 1  # only the last token was new to the cache
        drafts = [int(np.argmax(self._sync(context)))]
        if caught_up:
            self._time_step(began, 1)
        began = time.perf_counter()
        while len(drafts) < gamma:
            logits = self.segment.run(np.asarray([[drafts[-1]]], dtype=np.int64), self.cache, len(self.seen))
            self.seen.append(drafts[-1])
            drafts.append(int(np.argmax(logits[0, -1])))
        if len(drafts) > 1:
            self._time_step(began, len(drafts) - 1)
        return drafts

    def _time_step(self, began: float, steps: int) -> None:
        per = (time.perf_counter() - began) * 1e3 / steps
        self.step_ms = per if self.step_ms is None else 0.8 * self.step_ms + 0.2 * per

    def keep(self, length: int) -> None:
        """Only the first ``length`` positions of the conversation are still valid."""
        if length < len(self.seen):
            self.cache.truncate(length)
            del self.seen[length:]


def _expected_tokens(p: float, gamma: int) -> float:
    """Tokens a round with ``gamma`` drafts yields when each draft is kept with probability ``p``
    (< 1): the kept prefix plus the model's own next token."""
    return (1 - p ** (gamma + 1)) / (1 - p)


class DraftModelLoader:
    """The draft model, loaded when drafting first needs it.

    Loading the whole model takes seconds on a phone-class device (1.3-4.5 s for SmolLM2 here),
    and a reply that waited for it in the middle of its decoding looked many times slower than
    it is. So adaptive speculation asks without waiting (``get(wait=False)``): the load runs on
    a thread of its own and the reply goes on one token per round trip until the model is
    ready. A client that asked for a fixed number of drafts (``speculate=N``) waits instead, and
    :attr:`waited_s` says how long, for its generation's stats.
    """

    def __init__(self, bundle: Bundle, variant: str, options: RuntimeOptions) -> None:
        self.bundle, self.variant, self.options = bundle, variant, options
        self.waited_s = 0.0  # loading time a caller waited for, not yet charged to a generation
        self._drafter: ModelDrafter | None = None
        self._loading: Future[ModelDrafter] | None = None
        self._pool: ThreadPoolExecutor | None = None

    @property
    def step_ms(self) -> float | None:
        """One incremental draft step of the loaded model (None before it has one)."""
        return None if self._drafter is None else self._drafter.step_ms

    def get(self, wait: bool) -> ModelDrafter | None:
        """The draft model, or None while it is still loading and ``wait`` is False. Raises what
        loading raised (once, to the caller that finds it failed)."""
        if self._drafter is not None:
            return self._drafter
        if wait and self._loading is None:
            began = time.perf_counter()
            self._drafter = ModelDrafter(self.bundle, self.variant, self.options)
            self.waited_s += time.perf_counter() - began
            return self._drafter
        if self._loading is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splitllm-draft-loader")
            self._loading = self._pool.submit(ModelDrafter, self.bundle, self.variant, self.options)
        if not (wait or self._loading.done()):
            return None
        began = time.perf_counter()
        loading, self._loading = self._loading, None
        self._drafter = loading.result()
        self.waited_s += time.perf_counter() - began
        self.close()
        return self._drafter

    def close(self) -> None:
        """Stop the loader thread (a load under way finishes on it and is dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class GammaController:
    """How many drafts pay off at the measured acceptance rate, round trip and costs.

    With per-token acceptance p, a round with g drafts yields E(g) = (1 - p^(g+1)) / (1 - p)
    tokens and takes about rtt + g * draft_ms + verify_ms (verifying a few more positions in one
    run costs little next to a round trip); the controller picks the g in 0..max_gamma with the
    most tokens per millisecond (0: one token per round trip, no drafts). ``fixed`` pins g.
    Estimates are moving averages of what the generation measured.
    """

    def __init__(self, fixed: int | None = None, max_gamma: int = MAX_GAMMA) -> None:
        self.fixed = fixed
        self.max_gamma = max_gamma
        self.acceptance = 0.7  # optimistic start, so that speculation gets measured at all
        self.draft_ms: float | None = None  # device time per draft token
        self.verify_ms: float | None = None  # one verification besides the round trip
        self._idle_rounds = 0  # rounds since drafting was last judged not to pay

    def gamma(self, rtt_ms: float) -> int:
        if self.fixed is not None:
            return self.fixed
        if self.draft_ms is None or self.verify_ms is None:
            # Nothing measured yet: try a few drafts where a round trip is worth saving.
            return min(4, self.max_gamma) if rtt_ms >= _MIN_RTT_MS else 0
        best = self._best(rtt_ms)
        if best == 0 and rtt_ms >= _MIN_RTT_MS:
            # Off for now; every so often draft a little again, so that one slow spell (a busy
            # device, a burst of rejections) does not turn speculation off for good.
            self._idle_rounds += 1
            if self._idle_rounds % _REPROBE_ROUNDS == 0:
                return 2
        return best

    def _best(self, rtt_ms: float) -> int:
        if self.draft_ms is None or self.verify_ms is None:
            return 0
        p = min(max(self.acceptance, 0.0), 0.99)
        best_g, best_rate = 0, 1.0 / (rtt_ms + self.verify_ms)
        for g in range(1, self.max_gamma + 1):
            rate = _expected_tokens(p, g) / (rtt_ms + g * self.draft_ms + self.verify_ms)
            if rate > best_rate * 1.02:  # a draft must pay a little more than it costs
                best_g, best_rate = g, rate
        return best_g

    def tokens_per_round(self, rtt_ms: float) -> float:
        """Tokens a round trip is expected to yield at the gamma :meth:`gamma` would pick."""
        g = self.fixed if self.fixed is not None else self._best(rtt_ms)
        return _expected_tokens(min(max(self.acceptance, 0.0), 0.99), g)

    def observe(self, drafted: int, accepted: int, draft_ms: float, verify_ms: float) -> None:
        """One round: ``drafted`` drafts, ``accepted`` kept, what drafting and verifying took here
        (verifying without the round trip)."""
        self.verify_ms = verify_ms if self.verify_ms is None else 0.8 * self.verify_ms + 0.2 * verify_ms
        if drafted:
            self.acceptance = 0.8 * self.acceptance + 0.2 * (accepted / drafted)
            per = draft_ms / drafted
            self.draft_ms = per if self.draft_ms is None else 0.8 * self.draft_ms + 0.2 * per
