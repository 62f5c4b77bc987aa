"""The gateway's SplitClients: ``concurrency`` slots, each one server session and one conversation's
KV, lent to one request at a time (bounded wait, then 429), and generation on a held slot."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing

from splitllm import Bundle, GenerationStats, SplitClient, errors
from splitllm_gateway.api import GenRequest, RequestError
from splitllm_gateway.metrics import GatewayMetrics

log = logging.getLogger("splitllm_gateway")

DEFAULT_QUEUE_TIMEOUT_S = 30.0
DEFAULT_KEEPALIVE_S = 10.0


class Slot:
    """One SplitClient (one server session, one conversation's KV), used by one request at a time."""

    def __init__(self) -> None:
        self.client: SplitClient | None = None

    def shared_prefix(self, ids: list[int]) -> int:
        """How many leading positions of ``ids`` this slot's client already holds the KV of."""
        if self.client is None:
            return 0
        return len(os.path.commonprefix([self.client.tokens, ids]))  # element-wise on any sequences


class Gateway:
    """The app's state: its options and ``concurrency`` SplitClients, each built on first use and
    dropped when broken. A request takes the idle client holding the longest prefix of its
    prompt (a conversation's next turn finds its KV), or waits up to ``queue_timeout_s`` for one."""

    def __init__(self, bundle: Bundle, server_url: str, token: str | None, split: int | None, codec: str,
                 model_name: str, api_key: str | None, concurrency: int = 1,
                 queue_timeout_s: float = DEFAULT_QUEUE_TIMEOUT_S, keepalive_s: float = DEFAULT_KEEPALIVE_S) -> None:
        self.bundle, self.server_url, self.token, self.split, self.codec = bundle, server_url, token, split, codec
        self.model_name, self.api_key = model_name, api_key
        self.queue_timeout_s, self.keepalive_s = queue_timeout_s, keepalive_s
        self.fingerprint = f"splitllm-{bundle.bundle_id[:12]}"
        self.slots = [Slot() for _ in range(concurrency)]
        self._idle = list(self.slots)
        self._changed = asyncio.Condition()
        self.metrics = GatewayMetrics(lambda: len(self.slots) - len(self._idle))

    @contextlib.asynccontextmanager
    async def slot(self, ids: list[int]) -> AsyncIterator[Slot]:
        """Hold the idle slot whose client shares the longest prefix with ``ids``; after
        ``queue_timeout_s`` without one, a 429 with ``Retry-After``."""
        began = time.perf_counter()
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: bool(self._idle)), self.queue_timeout_s)
            except asyncio.TimeoutError:
                retry = max(1, math.ceil(self.queue_timeout_s / 4))
                raise RequestError(429, f"all {len(self.slots)} of this gateway's clients stayed busy for "
                                   f"{self.queue_timeout_s:g} s; retry later", code="rate_limit_exceeded",
                                   type_="rate_limit_error", headers={"Retry-After": str(retry)}) from None
            chosen = max(self._idle, key=lambda slot: slot.shared_prefix(ids))
            self._idle.remove(chosen)
        self.metrics.slot_wait_seconds.observe(time.perf_counter() - began)
        try:
            yield chosen
        finally:
            async with self._changed:
                self._idle.append(chosen)
                self._changed.notify()

    async def client(self, slot: Slot) -> SplitClient:
        """The slot's connected client (hold the slot); raises ServerUnavailable if unreachable."""
        if slot.client is None:
            # A gateway answers 503 rather than quietly running the whole model itself, and it
            # gives a lost server only a short grace period before saying so.
            client = SplitClient(self.bundle, self.server_url, token=self.token, split=self.split,
                                 codec=self.codec, client_name="splitllm-gateway",
                                 fallback_local=False, failover_timeout_s=2.0)
            try:
                await client.connect()
            except BaseException:
                await client.close()
                raise
            slot.client = client
        return slot.client

    @staticmethod
    async def discard(slot: Slot) -> None:
        """Drop the slot's client so its next request reconnects with empty caches on both sides."""
        client, slot.client = slot.client, None
        if client is not None:
            await client.close()

    async def close(self) -> None:
        for slot in self.slots:
            await self.discard(slot)


async def generate(gateway: Gateway, slot: Slot, ids: list[int], req: GenRequest,
                    stats_out: list[GenerationStats]) -> AsyncGenerator[str, None]:
    """Stream the reply's text on the held ``slot``; appends the stats when done.

    A reused connection found lost before any text was yielded is retried once on a fresh client.
    Any failure that is not the request's own fault drops the client, since a half-finished
    exchange may leave the WebSocket or the server session out of step with the client.
    """
    for attempt in range(2):
        sent, reused = False, slot.client is not None
        try:
            client = await gateway.client(slot)
            max_new = req.max_tokens if req.max_tokens is not None else max(client.max_context - len(ids), 1)
            pieces = client.generate_ids(ids, max_new_tokens=max_new, temperature=req.temperature,
                                         top_p=req.top_p, top_k=req.top_k, seed=req.seed, stop=req.stop)
            async with aclosing(pieces):
                async for piece in pieces:
                    if piece.text:
                        sent = True
                        yield piece.text
            stats_out.append(client.last_stats)
            return
        except (errors.ConfigError, errors.GenerationError, GeneratorExit):
            raise  # the request's own fault, or its reader left: the client is still in step
        except errors.ServerUnavailable:
            await gateway.discard(slot)
            if sent or attempt or not reused:
                raise
            log.info("lost the split server connection; retrying on a fresh one")
        except BaseException:
            await gateway.discard(slot)
            raise


