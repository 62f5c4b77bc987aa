"""SplitClient: generate text with the first layers here and the rest on a SplitLLM server.

    async with SplitClient(bundle="bundles/smollm2", server="http://127.0.0.1:8765") as client:
        async for piece in client.generate("Hello!", max_new_tokens=32):
            print(piece.text, end="", flush=True)

A *placement* says, for every unit (0 = embeddings, 1..L = decoder layers, L+1 = head), whether
it runs on the client or the server. Split k is the placement "units [0, k] here, the rest
there". The client is the API; one :class:`~splitllm.conversation.Conversation` holds the state
across both sides (tokens, caches, placement, failover), a :class:`~splitllm.device.LocalDevice`
runs the local ranges, and a :class:`~splitllm.transport.Remote` talks to the server.
"""

from __future__ import annotations

import dataclasses
import os
import ssl as ssl_module
import time
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path

from splitllm import codec as codecs
from splitllm.adaptive import PolicyFollower
from splitllm.conversation import Conversation
from splitllm.device import LocalDevice
from splitllm.errors import ConfigError, ContextTooLong
from splitllm.model.bundle import DEFAULT_VARIANT, Bundle
from splitllm.model.runtime import KVCache, RuntimeOptions
from splitllm.model.sampling import SamplingParams
from splitllm.placement import SERVER, Placement
from splitllm.planner import Policy
from splitllm.planner.costs import PhaseSLA
from splitllm.planner.profile import Profile, load_or_measure
from splitllm.protocol.plan import DEFAULT_CODEC
from splitllm.speculate import DraftModelLoader, GammaController, NgramDrafter, parse_speculate
from splitllm.stream import GenerationStats, StopText, TokenPiece
from splitllm.transport import LinkStats, Remote

__all__ = ["ChatSession", "GenerationStats", "Placement", "SplitClient", "TokenPiece"]


class SplitClient:
    """A device-side client: the API over one conversation whose layers run here and on a server.

    ``server=None`` (or ``local=True``) runs everything on the device. ``split`` defaults to a
    third of the layers on the device. ``codec`` compresses activations sent to the server.
    ``weights`` picks the device weights of the local segments ("fp32", or a variant the bundle
    carries such as "int4"; ConfigError names the available ones). The server always runs fp32.
    ``device`` replaces the :class:`LocalDevice` that runs local ranges (emulators pass a slower
    one; see ``splitllm.testing``).

    ``speculate``: ``"auto"`` (default) drafts tokens on the device and verifies several per round
    trip where the measured link and acceptance make it pay, ``"off"``, or a fixed number of
    drafts per round trip (greedy decoding only; the tokens are those of plain greedy decoding).
    ``drafter``: ``"model"`` (the whole model here, in ``draft_weights``, by default the bundle's
    smallest variant), ``"ngram"`` (prompt lookup) or ``"auto"`` (a long n-gram match, else the
    model). See ``splitllm.speculate``.
    ``providers``: ONNX Runtime execution providers for the local segments, tried in order
    (e.g. ``["CoreML", "CPU"]``); an unavailable one is skipped with a logged warning and CPU
    always comes last. :attr:`providers_in_use` says what actually runs.
    """

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike[str],
        server: str | None = None,
        *,
        token: str | None = None,
        split: int | None = None,
        codec: str = DEFAULT_CODEC,
        local: bool = False,
        threads: int = 0,
        allow_spinning: bool | None = None,
        timeout_s: float = 60.0,
        client_name: str = "splitllm-python",
        failover_timeout_s: float = 30.0,
        fallback_local: bool = True,
        ssl: ssl_module.SSLContext | bool | None = None,
        weights: str = DEFAULT_VARIANT,
        device: LocalDevice | None = None,
        speculate: str | int = "auto",
        drafter: str = "auto",
        draft_weights: str | None = None,
        providers: Sequence[str] | None = None,
    ) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(Path(bundle))
        self.weights = self.bundle.check_variant(weights)
        self.text = self.bundle.text
        codecs.get_codec(codec)
        self.codec = codec
        local = local or server is None
        placement = Placement.for_split(self.bundle.num_layers // 3 if split is None else split,
                                        self.bundle.num_units, local=local)
        # ORT threads spin while a run is under way: fastest on a quiet device, split or not; a
        # local-only client keeps them spinning between its steps too (RuntimeOptions). Pass
        # allow_spinning=False on a machine busy with other work.
        spinning = True if allow_spinning is None else allow_spinning
        self.options = RuntimeOptions(intra_op_threads=threads, allow_spinning=spinning, spin_between_runs=local)
        if providers:
            self.options = dataclasses.replace(self.options, providers=tuple(providers))
        if device is None:
            device = LocalDevice(self.bundle, self.options, self.weights)
        elif device.bundle is not self.bundle and device.bundle.bundle_id != self.bundle.bundle_id:
            raise ConfigError("the device runs another bundle than this client")
        remote = None if local else Remote(server, token, timeout_s, client_name, ssl=ssl)  # type: ignore[arg-type]
        self.conversation = Conversation(self.bundle, device, remote, placement, codec,
                                         failover_timeout_s=failover_timeout_s, fallback_local=fallback_local)
        # Speculative decoding (splitllm.speculate): None when off.
        fixed = parse_speculate(speculate)
        self.speculation: GammaController | None = None if fixed == 0 else GammaController(fixed)
        if drafter not in ("auto", "model", "ngram"):
            raise ConfigError(f"drafter must be 'auto', 'model' or 'ngram', got {drafter!r}")
        self.drafter = drafter
        smallest = "int4" if "int4" in self.bundle.variants else self.weights
        self.draft_weights = self.bundle.check_variant(draft_weights or smallest)
        self._ngram = NgramDrafter(min_n=3 if drafter == "auto" else 2)
        self._draft_model = DraftModelLoader(self.bundle, self.draft_weights, self.options)
        self.profile: Profile | None = None  # this device's unit timings, measured by plan()
        self.follower: PolicyFollower | None = None  # adaptive mode, after plan()
        self.last_stats = GenerationStats()

    # ------------------------------------------------------------------ state (held by the conversation)

    @property
    def device(self) -> LocalDevice:
        return self.conversation.device

    @property
    def remote(self) -> Remote | None:
        """The server connection; None when everything runs here (from the start or after a fallback)."""
        return self.conversation.remote

    @property
    def local(self) -> bool:
        return self.conversation.local

    @property
    def placement(self) -> Placement:
        return self.conversation.placement

    @property
    def tokens(self) -> list[int]:
        """Positions whose KV both sides hold (a prefix the next request may reuse)."""
        return self.conversation.tokens

    @property
    def cache(self) -> KVCache:
        return self.conversation.cache

    @property
    def failovers(self) -> int:
        return self.conversation.failovers

    @property
    def placements_used(self) -> int:
        return self.conversation.placements_used

    @property
    def providers_in_use(self) -> list[str]:
        """The execution providers the loaded local segments run on (empty before any is loaded)."""
        for seg in self.device.segments():
            return list(seg.session.get_providers())
        return []

    @property
    def link(self) -> LinkStats | None:
        return None if self.remote is None else self.remote.stats

    @property
    def max_context(self) -> int:
        limit = self.bundle.shapes.max_context
        if self.remote is not None and self.remote.welcome is not None:
            limit = min(limit, self.remote.welcome.max_context)
        return limit

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> SplitClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the server session (if any) and load the local segments of the current placement."""
        await self.conversation.connect()
        for side, start, end in self.placement.runs:
            if side != SERVER:
                await self.device.load(start, end)

    async def close(self) -> None:
        if self.remote is not None:
            await self.remote.close()
        self._draft_model.close()
        self.device.close()

    # ------------------------------------------------------------------ placement

    def set_split(self, split: int) -> None:
        """Move to split k from the next step on (see :meth:`set_placement`)."""
        self.set_placement(Placement.for_split(split, self.bundle.num_units, local=self.local))

    def set_placement(self, placement: Placement | Sequence[str]) -> None:
        """Run units where ``placement`` says from the next step on, even mid-generation.

        The KV of every layer that changes sides moves with it (KVPut / KVGet, fp32, exact), so
        the tokens are the same as if the placement had never changed.
        """
        new = placement if isinstance(placement, Placement) else Placement(tuple(placement))
        self.conversation.request_placement(new)

    async def apply_placement(self) -> None:
        """Move to the placement given to :meth:`set_placement` now (KV included) rather than
        before the next step."""
        await self.conversation.apply_pending()

    async def reset(self) -> None:
        """Forget the conversation's KV on both sides (the next request runs its whole prompt)."""
        await self.conversation.prepare_empty()

    async def plan(self, *, ttft_ms: float, token_ms: float, prompt_tokens: int = 64,
                   profile: Profile | None = None, algorithm: str = "dp") -> dict[str, Policy]:
        """Follow the server's placement policy from now on, for this SLA.

        Measures (once, cached) how long each unit takes here, probes the link, and asks the
        server (POST /v1/plan) for the DP's placements per uplink range, for prefill and decode.
        Each request then picks the placement for the measured uplink; the client asks again when
        its bandwidth leaves the table or the policy is older than the server said it stays valid.
        ``algorithm`` asks for a baseline's placements instead of the DP's ("greedy", "all-server",
        "all-client"), planned from the same inputs, to compare policies.
        """
        remote = self.remote
        if remote is None:
            raise ConfigError("plan() needs a server; this client runs everything locally")
        sla = PhaseSLA(ttft_ms, token_ms)
        if profile is not None:
            self.profile = profile
        elif self.profile is None:
            threads = self.options.intra_op_threads
            self.profile = await self.device.call(
                lambda: load_or_measure(self.bundle, threads=threads, variant=self.weights))
        await remote.probe()
        self.follower = PolicyFollower(sla, self.profile, algorithm)
        await self.follower.refresh(remote, self.codec, prompt_tokens)
        return self.policies or {}

    @property
    def policies(self) -> dict[str, Policy] | None:
        return None if self.follower is None else self.follower.policies

    async def adapt(self, phase: str = "decode", tokens: int = 1) -> None:
        """Switch now to the placement the followed policy gives ``phase`` at the measured uplink
        (re-planning when the policy is stale); nothing without a policy (see :meth:`plan`)."""
        await self._adapt(phase, tokens)
        await self.conversation.apply_pending()

    async def _adapt(self, phase: str, tokens: int) -> None:
        if self.follower is not None and self.remote is not None:
            if self.speculation is not None:
                self.follower.tokens_per_round_trip = self.speculation.tokens_per_round(
                    self.remote.stats.rtt_ms_ewma or 0.0)
            sides = await self.follower.placement_for(self.remote, self.codec, phase, tokens)
            if sides is not None:
                self.set_placement(sides)

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
    ) -> AsyncGenerator[TokenPiece, None]:
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
    ) -> AsyncGenerator[TokenPiece, None]:
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
        feed = await self.conversation.prepare(prompt_ids, params)
        stats.prefill_tokens = len(feed)
        await self._adapt("prefill", len(feed))
        decoder = self.text.incremental(skip_special_tokens=True)
        stopper = StopText(stop)
        produced = [await self.conversation.step(feed, params)]  # the prompt's pass
        stats.steps = 1
        next_adapt = 1
        while True:
            for token in produced:
                stats.new_tokens += 1
                stats.new_ids.append(token)
                if stats.new_tokens == 1:
                    stats.first_token_s = time.perf_counter() - started
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
                if stats.new_tokens == max_new_tokens:
                    stats.stop_reason = "length"
                    break
            if stats.stop_reason:
                break
            if stats.new_tokens >= next_adapt:
                await self._adapt("decode", 1)
                next_adapt = (stats.new_tokens // 16 + 1) * 16
            produced = await self._next_tokens(produced[-1], params, max_new_tokens - stats.new_tokens, stats)
        stats.split = self.placement.split
        stats.server_units = sum(1 for side in self.placement.sides if side == SERVER)
        tail, _ = stopper.push(decoder.flush(), final=True)
        if tail and stats.stop_reason != "stop":
            yield TokenPiece(-1, tail)
        stats.seconds = time.perf_counter() - started

    async def _next_tokens(self, last: int, params: SamplingParams, remaining: int,
                           stats: GenerationStats) -> list[int]:
        """The next step: ``last`` alone (one token), or ``last`` plus drafts verified in one pass."""
        conv = self.conversation
        gamma = 0
        rtt_ms = (self.link.rtt_ms_ewma or 0.0) if self.link is not None else 0.0
        controller = self.speculation
        if not (params.temperature == 0 and self.remote is not None
                and any(side == SERVER for side in self.placement.sides)):
            controller = None  # sampling, or nothing to save: every unit runs here
        if controller is not None:
            room = self.max_context - len(conv.tokens) - 2  # positions for drafts after ``last``
            gamma = max(0, min(controller.gamma(rtt_ms), remaining - 1, room))
        stats.steps += 1
        drafts: list[int] = []
        began = time.perf_counter()
        if gamma > 0:
            context = [*conv.tokens, last]
            drafts = await self.device.call(self._draft, context, gamma)
            stats.draft_load_s, self._draft_model.waited_s = stats.draft_load_s + self._draft_model.waited_s, 0.0
        drafted = time.perf_counter()
        if drafts:
            new = await conv.verify(last, drafts)
            stats.drafted += len(drafts)
            stats.accepted += len(new) - 1
        else:
            new = [await conv.step([last], params)]
            if self.follower is not None:
                self.follower.observe_decode((time.perf_counter() - began) * 1e3)
        if controller is not None:
            verify_ms = max((time.perf_counter() - drafted) * 1e3 - rtt_ms, 0.0)
            draft_ms = (drafted - began) * 1e3
            step_ms = self._draft_model.step_ms
            if drafts and step_ms is not None:
                # What a draft costs in steady state: catching the draft model up on a new prompt
                # is paid once, not per draft.
                draft_ms = min(draft_ms, step_ms * len(drafts))
            controller.observe(len(drafts), len(new) - 1, draft_ms, verify_ms)
        return new

    def _draft(self, context: list[int], gamma: int) -> list[int]:
        """Draft tokens (on the device thread): a long enough n-gram match first, else the model
        (none while adaptive speculation's model is still loading: see DraftModelLoader)."""
        if self.drafter in ("auto", "ngram"):
            drafts = self._ngram.propose(context, gamma)
            if drafts or self.drafter == "ngram":
                return drafts
        fixed = self.speculation is not None and self.speculation.fixed is not None
        model = self._draft_model.get(wait=fixed)
        return [] if model is None else model.propose(context, gamma)

    def chat(self, system: str | None = None) -> ChatSession:
        return ChatSession(self, system)


class ChatSession:
    """A multi-turn conversation whose KV cache stays on both sides between turns."""

    def __init__(self, client: SplitClient, system: str | None = None) -> None:
        self.client = client
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []

    async def send(self, text: str, **kwargs: object) -> AsyncGenerator[TokenPiece, None]:
        """Add a user message and stream the assistant's reply (kwargs as in generate)."""
        self.messages.append({"role": "user", "content": text})
        reply: list[str] = []
        async for piece in self.client.generate(self.messages, **kwargs):  # type: ignore[arg-type]
            reply.append(piece.text)
            yield piece
        self.messages.append({"role": "assistant", "content": "".join(reply)})

    def reset(self) -> None:
        self.messages = [m for m in self.messages if m["role"] == "system"]
