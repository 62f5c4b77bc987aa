"""One conversation's state across both sides, and the rules that keep it consistent.

``tokens`` lists the positions whose KV both sides hold, for every layer, wherever the placement
puts it. Everything else follows from keeping that true:

- a new request reuses the longest common prefix with ``tokens`` and cuts both sides back to it
  first (one Truncate), so a chat's next turn only runs its new tokens;
- a step that fails half-way may have extended some caches on either side: the conversation is
  marked inconsistent and the next request cuts both sides back before it runs anything;
- a placement change moves the KV of every layer that changes sides (fp32, exact) before the
  next step, in one pipelined batch; a move that fails forgets the caches on both sides and the
  next request re-runs its prompt;
- a lost server is reconnected with jittered exponential backoff and the conversation replayed
  to rebuild its KV (an overloaded server is retried the same way); when none comes back in
  time, every layer moves to the device (``fallback_local``) or ServerUnavailable is raised.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence

import numpy as np

from splitllm import codec as codecs
from splitllm.device import LocalDevice
from splitllm.errors import ConfigError, FrameError, ServerUnavailable, TooManySessions
from splitllm.model.bundle import Bundle
from splitllm.model.runtime import KVCache
from splitllm.model.sampling import SamplingParams, sample
from splitllm.placement import CLIENT, SERVER, Placement
from splitllm.stream import common_prefix
from splitllm.transport import Remote

__all__ = ["Conversation", "backoff_delays"]

_FIRST_DELAY_S = 0.1
_MAX_DELAY_S = 2.0
_STEP_RETRIES = 3  # lost servers survived within one step before it gives up


def backoff_delays(first_s: float = _FIRST_DELAY_S, cap_s: float = _MAX_DELAY_S,
                   rng: random.Random | None = None):  # noqa: ANN201 - an endless iterator of floats
    """Endless reconnect delays: exponential up to ``cap_s`` with "full jitter" (uniform in
    [0, bound]), so the clients of a server that went away do not all come back at once."""
    rng = rng or random.Random()
    bound = first_s
    while True:
        yield rng.uniform(0.0, bound)
        bound = min(bound * 2, cap_s)


class Conversation:
    """The tokens, the device's KV cache, the server session and the placement of one conversation.

    ``remote`` is None for a device-only conversation (or after falling back to the device).
    """

    def __init__(self, bundle: Bundle, device: LocalDevice, remote: Remote | None, placement: Placement,
                 codec: str, *, failover_timeout_s: float = 30.0, fallback_local: bool = True) -> None:
        self.bundle = bundle
        self.device = device
        self.remote = remote
        self.placement = placement
        self.codec = codec
        self.failover_timeout_s = failover_timeout_s
        self.fallback_local = fallback_local
        self.cache = KVCache(bundle.shapes)
        self.tokens: list[int] = []
        self.failovers = 0
        self.placements_used = 0
        self._consistent = True  # False: some cache may hold more positions than ``tokens``
        self._pending: Placement | None = None  # placement to switch to before the next step
        # After rejected drafts the server holds more positions than ``tokens``: the next server
        # request first cuts them (pipelined, no extra round trip).
        self._trim_to: int | None = None

    @property
    def local(self) -> bool:
        return self.remote is None

    # ------------------------------------------------------------------ consistency

    def _invalidate(self) -> None:
        """A step failed half-way: cut the device's cache back now, the server's before the next request."""
        self.cache.truncate(len(self.tokens))
        self._consistent = False

    def _forget(self) -> None:
        """Nothing cached can be trusted: start the conversation's KV afresh on both sides."""
        self.cache = KVCache(self.bundle.shapes)
        self.tokens = []
        self._consistent = False

    async def _rewind(self, length: int) -> None:
        """Keep the first ``length`` cached positions on both sides (all units, whatever the placement)."""
        self.cache.truncate(length)
        if self.remote is not None:
            await self.remote.truncate(length, 0, self.bundle.num_units)
        del self.tokens[length:]
        self._consistent = True
        self._trim_to = None

    # ------------------------------------------------------------------ placement

    def request_placement(self, new: Placement) -> None:
        """Run units where ``new`` says from the next step on (None pending if it is the current one)."""
        if len(new.sides) != self.bundle.num_units:
            raise ConfigError(f"a placement needs {self.bundle.num_units} sides (one per unit), got {len(new.sides)}")
        if self.remote is None and not new.is_local:
            raise ConfigError("this client has no server: every unit must run on the client")
        self._pending = None if new == self.placement else new

    async def apply_pending(self) -> None:
        """Switch to the requested placement now, moving the KV of the layers that change sides."""
        new, self._pending = self._pending, None
        if new is None or new == self.placement:
            return
        try:
            if self._trim_to is not None and self.remote is not None:
                await self.remote.truncate(self._trim_to, 0, self.bundle.num_units)  # moves send exact lengths
                self._trim_to = None
            await self._move_kv(new)
        except BaseException:
            self._forget()  # half-moved KV cannot be trusted; the next request re-runs its prompt
            raise
        finally:
            self.placement = new
        self.placements_used += 1

    async def _move_kv(self, new: Placement) -> None:
        length = len(self.tokens)
        if length == 0 or self.remote is None:
            return
        changed = [u for u in range(1, self.bundle.num_layers + 1) if self.placement.sides[u] != new.sides[u]]
        up = {u: self.cache.get(u) for u in changed if new.sides[u] == SERVER}
        down = [u for u in changed if new.sides[u] == CLIENT]
        received = await self.remote.move_kv(up, down, length)
        for unit in up:
            self.cache.drop(range(unit, unit + 1))
        for unit, (key, value) in received.items():
            self.cache.set(unit, key, value)

    # ------------------------------------------------------------------ steps

    async def prepare(self, prompt_ids: Sequence[int], params: SamplingParams) -> list[int]:
        """Make both sides hold a prefix of ``prompt_ids``; return the positions still to run.

        At least one position is left to run, since the next token needs its logits.
        """
        common = min(common_prefix(self.tokens, prompt_ids), len(prompt_ids) - 1)
        if self.remote is not None and not self.remote.connected:
            await self._failover(params)
        if common < len(self.tokens) or not self._consistent:
            try:
                await self._rewind(common)
            except ServerUnavailable:
                await self._failover(params)
                await self._rewind(common)
        await self.apply_pending()
        return list(prompt_ids[common:])

    async def prepare_empty(self) -> None:
        """Cut both sides back to no cached position."""
        await self.connect()
        await self._rewind(0)

    async def step(self, feed: list[int], params: SamplingParams) -> int:
        """Run ``feed`` after the cached positions, sample one token, and record ``feed`` as cached.

        A lost server is reconnected (or replaced by the device) and the step retried.
        """
        return (await self._retrying(feed, params, verify=False))[0]

    async def verify(self, last: int, drafts: list[int]) -> list[int]:
        """Speculative step (greedy): run ``last`` and ``drafts`` after the cached positions in one
        pass and return the new tokens: the drafts the model agrees with, then its own next token.

        ``last`` and the accepted drafts become cached; the KV of rejected drafts is cut here now
        and on the server with its next request. Failover as for :meth:`step`.
        """
        feed = [last, *drafts]
        chosen = await self._retrying(feed, SamplingParams(), verify=True)
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == chosen[accepted]:
            accepted += 1
        keep = len(self.tokens) + 1 + accepted  # ``tokens`` does not include ``feed`` yet
        if accepted < len(drafts):
            self.cache.truncate(keep)
            if self.remote is not None and any(side == SERVER for side in self.placement.sides):
                self._trim_to = keep
        self.tokens.extend(feed[:1 + accepted])
        return [*drafts[:accepted], chosen[accepted]]

    async def _retrying(self, feed: list[int], params: SamplingParams, verify: bool) -> list[int]:
        attempts = 0
        while True:
            try:
                if self._pending is not None:
                    await self.apply_pending()
                chosen = await self._run(feed, len(self.tokens), params, verify)
                if not verify:
                    self.tokens.extend(feed)
                return chosen
            except ServerUnavailable:
                self._invalidate()
                attempts += 1
                if self.remote is None or self.failover_timeout_s <= 0 or attempts > _STEP_RETRIES:
                    raise
            except BaseException:
                self._invalidate()
                raise
            await self._failover(params)

    async def _run(self, ids: Sequence[int], past: int, params: SamplingParams, verify: bool) -> list[int]:
        """Run new positions ``ids`` after ``past`` cached ones through the placement: one sampled
        token, or with ``verify`` the greedy token after every position."""
        num_units = self.bundle.num_units
        x: np.ndarray = np.asarray([ids], dtype=np.int64)
        for side, start, end in self.placement.runs:
            has_head = end == num_units
            if side == CLIENT:
                x = await self.device.run(start, end, x, self.cache, past, all_logits=verify)
                if not has_head:
                    continue
                if verify:
                    return [int(t) for t in x[0].argmax(axis=-1)]
                return [sample(x[0, -1], params, position=past + len(ids))]
            if self.remote is None:
                raise ConfigError("the placement puts units on a server, but this conversation has none")
            want = ("tokens" if verify else "token") if has_head else "hidden"
            trim, self._trim_to = self._trim_to, None
            result = await self.remote.run(start, end, past, x, want, params, self.codec, trim_to=trim)
            if not has_head:
                x = codecs.decode(result.payload)
            elif verify:
                chosen = np.frombuffer(result.payload, dtype="<i4")
                if chosen.size != len(ids):
                    raise FrameError(f"expected {len(ids)} verified tokens, got {chosen.size}")
                return [int(t) for t in chosen]
            else:
                return [result.token]
        raise FrameError("a placement must end with the head")  # unreachable for a valid Placement

    # ------------------------------------------------------------------ failover

    async def _with_backoff(self, attempt: Callable[[], Awaitable[None]],
                            retry_on: tuple[type[BaseException], ...]) -> BaseException | None:
        """Run ``attempt`` until it succeeds (None) or, retrying ``retry_on`` errors with jittered
        backoff, ``failover_timeout_s`` has passed (the last error)."""
        deadline = time.monotonic() + self.failover_timeout_s
        delays = backoff_delays()
        while True:
            try:
                await attempt()
                return None
            except retry_on as exc:
                delay_s = next(delays)
                if time.monotonic() + delay_s > deadline:
                    return exc
                await asyncio.sleep(delay_s)

    async def connect(self) -> None:
        """Open the server session; a server refusing for load (TooManySessions) is asked again
        with jittered backoff for up to ``failover_timeout_s``."""
        remote = self.remote
        if remote is None or remote.connected:
            return

        async def attempt() -> None:
            await remote.connect(self.bundle.bundle_id, self.codec)

        error = await self._with_backoff(attempt, (TooManySessions,))
        if error is not None:
            raise error

    async def _failover(self, params: SamplingParams) -> None:
        """Reconnect with jittered backoff and rebuild the server's KV by replaying the conversation.

        The replay recomputes every cached position under the current placement (the device's KV
        too, so both sides agree), which gives the same caches as the lost ones. A server that
        refuses for load (TooManySessions) is retried the same way, within the same deadline.
        """
        remote = self.remote
        if remote is None:
            return

        async def attempt() -> None:
            await remote.connect(self.bundle.bundle_id, self.codec)
            await self._replay(params)

        error = await self._with_backoff(attempt, (ServerUnavailable, TooManySessions))
        if error is not None:
            if not self.fallback_local:
                self._consistent = False
                raise ServerUnavailable(
                    f"the server at {remote.url} did not come back within {self.failover_timeout_s} s"
                ) from error
            await self._go_local(params)
        self.failovers += 1

    async def _replay(self, params: SamplingParams) -> None:
        self.cache = KVCache(self.bundle.shapes)
        self._pending = None
        self._trim_to = None  # a new server session holds nothing to cut
        if self.tokens:
            await self._run(self.tokens, 0, params, verify=False)
        self._consistent = True

    async def _go_local(self, params: SamplingParams) -> None:
        """Carry on without a server: every unit here, the conversation's KV recomputed."""
        if self.remote is not None:
            await self.remote.close()
        self.remote = None
        self.placement = Placement.for_split(self.bundle.num_layers, self.bundle.num_units, local=True)
        await self._replay(params)
