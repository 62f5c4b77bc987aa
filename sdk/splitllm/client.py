"""SplitClient: generate text with the first layers here and the rest on a SplitLLM server.

    async with SplitClient(bundle="bundles/smollm2", server="http://127.0.0.1:8765") as client:
        async for piece in client.generate("Hello!", max_new_tokens=32):
            print(piece.text, end="", flush=True)

A *placement* says, for every unit (0 = embeddings, 1..L = decoder layers, L+1 = head), whether
it runs on the client or the server. Split k is the placement "units [0, k] here, the rest
there". The client walks the placement's runs of same-side units once per step: local runs go
through ONNX Runtime in a worker thread (the event loop keeps streaming), remote runs are one
request each. Sampling happens on the side that runs the head.
"""

from __future__ import annotations

import asyncio
import os
import ssl as ssl_module
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from splitllm import codec as codecs
from splitllm.adaptive import PolicyFollower
from splitllm.errors import ConfigError, ContextTooLong, FrameError, ServerUnavailable
from splitllm.model.bundle import DEFAULT_VARIANT, Bundle
from splitllm.model.runtime import KVCache, RuntimeOptions, Segment
from splitllm.model.sampling import SamplingParams, sample
from splitllm.placement import CLIENT, SERVER, Placement
from splitllm.planner import Policy
from splitllm.planner.costs import PhaseSLA
from splitllm.planner.profile import Profile, load_or_measure
from splitllm.protocol import wire
from splitllm.protocol.connection import LinkStats, Remote
from splitllm.stream import GenerationStats, StopText, TokenPiece, common_prefix

__all__ = ["ChatSession", "GenerationStats", "Placement", "SplitClient", "TokenPiece"]


class SplitClient:
    """A device-side client: owns the local segments, the local KV cache and the server session.

    ``server=None`` (or ``local=True``) runs everything on the device. ``split`` defaults to a
    third of the layers on the device. ``codec`` compresses activations sent to the server.
    ``weights`` picks the device weights of the local segments ("fp32", or a variant the bundle
    carries such as "int4"; ConfigError names the available ones). The server always runs fp32.
    """

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike[str],
        server: str | None = None,
        *,
        token: str | None = None,
        split: int | None = None,
        codec: str = "int8-block64",
        local: bool = False,
        threads: int = 0,
        allow_spinning: bool | None = None,
        timeout_s: float = 60.0,
        client_name: str = "splitllm-python",
        failover_timeout_s: float = 30.0,
        fallback_local: bool = True,
        ssl: ssl_module.SSLContext | bool | None = None,
        weights: str = DEFAULT_VARIANT,
    ) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(Path(bundle))
        self.weights = self.bundle.check_variant(weights)
        self.text = self.bundle.text
        codecs.get_codec(codec)
        self.codec = codec
        self.local = local or server is None
        num_layers = self.bundle.num_layers
        self.placement = Placement.for_split(num_layers // 3 if split is None else split,
                                             self.bundle.num_units, local=self.local)
        # ORT threads spin only while a run is under way (force_spinning_stop): fastest on a
        # quiet device, split or not; pass allow_spinning=False on a machine busy with other work.
        spinning = True if allow_spinning is None else allow_spinning
        self.options = RuntimeOptions(intra_op_threads=threads, allow_spinning=spinning)
        self.remote = None if self.local else Remote(server, token, timeout_s, client_name, ssl=ssl)
        # Failover: how long to keep reconnecting after the server is lost, and whether to go
        # on with every layer here when it does not come back.
        self.failover_timeout_s = failover_timeout_s
        self.fallback_local = fallback_local
        self.failovers = 0
        self._segments: dict[tuple[int, int, bool], Segment] = {}
        self.max_segments = 4  # composed local sessions kept loaded (each holds its layers' weights)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splitllm-device")
        self.cache = KVCache(self.bundle.shapes)
        self.tokens: list[int] = []  # positions whose KV both sides hold
        self._dirty = False  # a failed step may have left caches longer than ``tokens``
        self._pending: Placement | None = None  # placement to switch to before the next step
        self.placements_used = 0
        self.profile: Profile | None = None  # this device's unit timings, measured by plan()
        self.follower: PolicyFollower | None = None  # adaptive mode, after plan()
        self.last_stats = GenerationStats()

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> SplitClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        if self.remote is not None and not self.remote.connected:
            await self.remote.connect(self.bundle.bundle_id, self.codec)
        await self._warm_up()

    async def close(self) -> None:
        if self.remote is not None:
            await self.remote.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def link(self) -> LinkStats | None:
        return None if self.remote is None else self.remote.stats

    @property
    def max_context(self) -> int:
        limit = self.bundle.shapes.max_context
        if self.remote is not None and self.remote.welcome is not None:
            limit = min(limit, self.remote.welcome.max_context)
        return limit

    def set_split(self, split: int) -> None:
        """Move to split k from the next step on (see :meth:`set_placement`)."""
        self.set_placement(Placement.for_split(split, self.bundle.num_units, local=self.local))

    def set_placement(self, placement: Placement | Sequence[str]) -> None:
        """Run units where ``placement`` says from the next step on, even mid-generation.

        The KV of every layer that changes sides moves with it (KVPut / KVGet, fp32, exact), so
        the tokens are the same as if the placement had never changed.
        """
        new = placement if isinstance(placement, Placement) else Placement(tuple(placement))
        if len(new.sides) != self.bundle.num_units:
            raise ConfigError(f"a placement needs {self.bundle.num_units} sides (one per unit), got {len(new.sides)}")
        if self.remote is None and not new.is_local:
            raise ConfigError("this client has no server: every unit must run on the client")
        self._pending = None if new == self.placement else new

    # ------------------------------------------------------------------ adaptive placement

    async def plan(self, *, ttft_ms: float, token_ms: float, prompt_tokens: int = 64,
                   profile: Profile | None = None) -> dict[str, Policy]:
        """Follow the server's placement policy from now on, for this SLA.

        Measures (once, cached) how long each unit takes here, probes the link, and asks the
        server (POST /v1/plan) for the DP's placements per uplink range, for prefill and decode.
        Each request then picks the placement for the measured uplink; the client asks again when
        its bandwidth leaves the table or the policy is older than the server said it stays valid.
        """
        if self.remote is None:
            raise ConfigError("plan() needs a server; this client runs everything locally")
        sla = PhaseSLA(ttft_ms, token_ms)
        if profile is not None:
            self.profile = profile
        elif self.profile is None:
            threads = self.options.intra_op_threads
            self.profile = await asyncio.get_running_loop().run_in_executor(
                self._executor, lambda: load_or_measure(self.bundle, threads=threads, variant=self.weights))
        await self.remote.probe()
        self.follower = PolicyFollower(sla, self.profile)
        await self.follower.refresh(self.remote, self.codec, prompt_tokens)
        return self.policies or {}

    @property
    def policies(self) -> dict[str, Policy] | None:
        return None if self.follower is None else self.follower.policies

    async def _adapt(self, phase: str, tokens: int) -> None:
        if self.follower is not None and self.remote is not None:
            sides = await self.follower.placement_for(self.remote, self.codec, phase, tokens)
            if sides is not None:
                self.set_placement(sides)

    async def _apply_pending(self) -> None:
        new, self._pending = self._pending, None
        if new is None or new == self.placement:
            return
        try:
            await self._move_kv(new)
        except BaseException:
            # Half-moved KV cannot be trusted: forget the conversation's cache on both sides;
            # the next request re-runs its prompt under the new placement.
            self.cache = KVCache(self.bundle.shapes)
            self.tokens = []
            self._dirty = True
            raise
        finally:
            self.placement = new
        self.placements_used += 1

    async def _move_kv(self, new: Placement) -> None:
        """Move the KV of every layer that changes sides, exact (fp32), in one pipelined batch."""
        length = len(self.tokens)
        if length == 0 or self.remote is None:
            return
        moves: list[tuple[int, str]] = []
        requests: list[wire.Message] = []
        for unit in range(1, self.bundle.num_layers + 1):
            new_side = new.sides[unit]
            if self.placement.sides[unit] == new_side:
                continue
            moves.append((unit, new_side))
            if new_side == SERVER:
                key, value = self.cache.get(unit)
                requests.append(wire.KVPut(seq=self.remote.next_seq(), unit=unit, length=length,
                                           key=codecs.encode(key, "fp32"), value=codecs.encode(value, "fp32")))
            else:
                requests.append(wire.KVGet(seq=self.remote.next_seq(), unit=unit))
        replies = await self.remote.request_many(requests)
        for (unit, new_side), reply in zip(moves, replies, strict=True):
            if new_side == SERVER:
                self.cache.drop(range(unit, unit + 1))
                continue
            if not isinstance(reply, wire.KVData) or reply.length != length:
                raise FrameError(f"expected the KV of unit {unit} with {length} positions, got {reply!r:.80}")
            self.cache.set(unit, codecs.decode(reply.key), codecs.decode(reply.value))

    async def _warm_up(self) -> None:
        for side, start, end in self.placement.runs:
            if side == CLIENT:
                await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._segment, start, end, end == self.bundle.num_units)

    def _segment(self, start: int, end: int, last_only: bool) -> Segment:
        key = (start, end, last_only)
        seg = self._segments.pop(key, None)
        if seg is None:
            seg = Segment(self.bundle, start, end, last_logits_only=last_only, options=self.options,
                          variant=self.weights)
        self._segments[key] = seg  # most recently used last
        while len(self._segments) > self.max_segments:
            self._segments.pop(next(iter(self._segments)))
        return seg

    # ------------------------------------------------------------------ one forward step

    async def _forward(self, ids: Sequence[int], past: int, params: SamplingParams) -> int:
        """Run new positions ``ids`` after ``past`` cached ones through the placement; sample one token."""
        num_units = self.bundle.num_units
        loop = asyncio.get_running_loop()
        x: np.ndarray = np.asarray([ids], dtype=np.int64)
        for side, start, end in self.placement.runs:
            has_head = end == num_units
            if side == CLIENT:
                seg = await loop.run_in_executor(self._executor, self._segment, start, end, has_head)
                x = await loop.run_in_executor(self._executor, seg.run, x, self.cache, past)
                if has_head:
                    return sample(x[0, -1], params, position=past + len(ids))
                continue
            payload = x.astype("<i4").tobytes() if start == 0 else codecs.encode(x, self.codec)
            msg = wire.Run(
                seq=self.remote.next_seq(), start=start, end=end, past_len=past, n_tokens=len(ids),
                payload=payload, want="token" if has_head else "hidden", temperature=params.temperature,
                top_p=params.top_p, top_k=params.top_k, seed=params.seed, codec=self.codec,
            )
            reply = await self.remote.request(msg)
            if not isinstance(reply, wire.Result):
                raise FrameError(f"expected a Result, got {type(reply).__name__}")
            if has_head:
                return reply.token
            x = codecs.decode(reply.payload)
        raise ConfigError("a placement must end with the head")  # unreachable for a valid Placement

    async def _rewind(self, length: int) -> None:
        """Keep the first ``length`` cached positions on both sides (all units, whatever the placement)."""
        self.cache.truncate(length)
        if self.remote is not None:
            await self.remote.request(wire.Truncate(seq=self.remote.next_seq(), start=0,
                                                    end=self.bundle.num_units, length=length))
        del self.tokens[length:]

    # ------------------------------------------------------------------ failover

    async def _step(self, feed: list[int], params: SamplingParams) -> int:
        """One forward step; when the server is lost, reconnect (or go local), replay, retry."""
        attempts = 0
        while True:
            try:
                if self._pending is not None:
                    await self._apply_pending()
                return await self._forward(feed, len(self.tokens), params)
            except ServerUnavailable:
                self.cache.truncate(len(self.tokens))
                attempts += 1
                if self.remote is None or self.failover_timeout_s <= 0 or attempts > 3:
                    self._dirty = True
                    raise
            except BaseException:
                # A step that failed half-way may have extended some caches on either side; the
                # next request cuts both back to what ``tokens`` says before it runs anything.
                self.cache.truncate(len(self.tokens))
                self._dirty = True
                raise
            await self._failover(params)

    async def _failover(self, params: SamplingParams) -> None:
        """Reconnect with backoff and rebuild the server's KV by replaying the conversation.

        The replay recomputes every cached position under the current placement (the device's
        KV too, so both sides agree), which gives the same caches as the lost ones. When no
        server answers within ``failover_timeout_s``: with ``fallback_local`` every layer moves
        here and generation goes on; otherwise ServerUnavailable.
        """
        deadline = time.monotonic() + self.failover_timeout_s
        delay_s = 0.1
        while True:
            try:
                await self.remote.connect(self.bundle.bundle_id, self.codec)
                await self._replay(params)
                break
            except ServerUnavailable as exc:
                if time.monotonic() + delay_s > deadline:
                    if not self.fallback_local:
                        self._dirty = True
                        raise ServerUnavailable(
                            f"the server at {self.remote.url} did not come back within {self.failover_timeout_s} s"
                        ) from exc
                    await self._go_local(params)
                    break
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 2.0)
        self.failovers += 1

    async def _replay(self, params: SamplingParams) -> None:
        self.cache = KVCache(self.bundle.shapes)
        self._pending = None
        if self.tokens:
            await self._forward(self.tokens, 0, params)
        self._dirty = False

    async def _go_local(self, params: SamplingParams) -> None:
        """Carry on without a server: every unit here, the conversation's KV recomputed."""
        if self.remote is not None:
            await self.remote.close()
        self.remote = None
        self.local = True
        self.follower = None
        self.placement = Placement.for_split(self.bundle.num_layers, self.bundle.num_units, local=True)
        await self._replay(params)

    # ------------------------------------------------------------------ generation

    def _prompt_ids(self, prompt: str | Sequence[dict[str, str]]) -> list[int]:
        if isinstance(prompt, str):
            return self.text.encode_chat([{"role": "user", "content": prompt}])
        return self.text.encode_chat(list(prompt))

    async def generate(
        self,
        prompt: str | Sequence[dict[str, str]],
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
    ) -> AsyncIterator[TokenPiece]:
        """Stream the reply to one user message (a str) or to a whole conversation (messages)."""
        async for piece in self.generate_ids(self._prompt_ids(prompt), max_new_tokens=max_new_tokens,
                                             temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                             stop=stop, ignore_eos=ignore_eos):
            yield piece

    async def generate_ids(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
    ) -> AsyncIterator[TokenPiece]:
        """Stream tokens after ``prompt_ids``, reusing the KV of any prefix already processed.

        Stops at an end-of-turn token (unless ``ignore_eos``), at a ``stop`` string (the text
        before it is yielded, the rest is not) or after ``max_new_tokens``. Raises ContextTooLong
        before any work when the prompt plus ``max_new_tokens`` does not fit the context.
        """
        params = SamplingParams(temperature, top_p, top_k, seed)
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        prompt_ids = self.text.check_ids(list(prompt_ids))
        if not prompt_ids:
            raise ConfigError("the prompt is empty")
        if len(prompt_ids) + max_new_tokens > self.max_context:
            raise ContextTooLong(
                f"prompt of {len(prompt_ids)} tokens + max_new_tokens {max_new_tokens} exceeds the context of "
                f"{self.max_context} tokens"
            )
        stats = GenerationStats(prompt_tokens=len(prompt_ids), split=self.placement.split, codec=self.codec)
        self.last_stats = stats
        started = time.perf_counter()
        # At least one position must run to get logits.
        common = min(common_prefix(self.tokens, prompt_ids), len(prompt_ids) - 1)
        if self.remote is not None and not self.remote.connected:
            await self._failover(params)
        if common < len(self.tokens) or self._dirty:
            try:
                await self._rewind(common)
            except ServerUnavailable:
                await self._failover(params)
                await self._rewind(common)
            self._dirty = False
        await self._apply_pending()
        feed = list(prompt_ids[common:])
        stats.prefill_tokens = len(feed)
        await self._adapt("prefill", len(feed))
        decoder = self.text.incremental(skip_special_tokens=True)
        stopper = StopText(stop)
        for _ in range(max_new_tokens):
            token = await self._step(feed, params)
            self.tokens.extend(feed)
            stats.new_tokens += 1
            stats.new_ids.append(token)
            if stats.new_tokens == 1:
                stats.first_token_s = time.perf_counter() - started
            if stats.new_tokens == 1 or stats.new_tokens % 16 == 0:
                await self._adapt("decode", 1)
            stats.seconds = time.perf_counter() - started
            if token in self.text.eos_ids and not ignore_eos:
                stats.stop_reason = "eos"
                break
            text, hit = stopper.push(decoder.push(token))
            if text or not hit:
                yield TokenPiece(token, text)
            if hit:
                stats.stop_reason = "stop"
                break
            feed = [token]
        else:
            stats.stop_reason = "length"
        stats.split = self.placement.split
        stats.server_units = sum(1 for side in self.placement.sides if side == SERVER)
        tail, _ = stopper.push(decoder.flush(), final=True)
        if tail and stats.stop_reason != "stop":
            yield TokenPiece(-1, tail)
        stats.seconds = time.perf_counter() - started

    def chat(self, system: str | None = None) -> ChatSession:
        return ChatSession(self, system)


class ChatSession:
    """A multi-turn conversation whose KV cache stays on both sides between turns."""

    def __init__(self, client: SplitClient, system: str | None = None) -> None:
        self.client = client
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []

    async def send(self, text: str, **kwargs: object) -> AsyncIterator[TokenPiece]:
        """Add a user message and stream the assistant's reply (kwargs as in generate)."""
        self.messages.append({"role": "user", "content": text})
        reply: list[str] = []
        async for piece in self.client.generate(self.messages, **kwargs):  # type: ignore[arg-type]
            reply.append(piece.text)
            yield piece
        self.messages.append({"role": "assistant", "content": "".join(reply)})

    def reset(self) -> None:
        self.messages = [m for m in self.messages if m["role"] == "system"]
