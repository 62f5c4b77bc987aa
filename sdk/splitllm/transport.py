"""The client's end of the WebSocket: connect, handshake, one request at a time, errors mapped.

Client-only (the server never imports it), so it lives beside the client rather than in
``splitllm.protocol``, which holds what both sides share (``wire``, ``plan``, ``payload``).

A reader task receives every frame as it arrives and hands each reply to the request waiting
for its ``seq``. Because a receive is always pending, aiohttp answers the server's heartbeat
pings (and sees the answers to its own) while the client is idle between turns, so a user who
reads for minutes keeps the session instead of paying a reconnect and a replay.

Foreign errors (aiohttp, OSError, timeouts) become ServerUnavailable / AuthError naming the URL;
Error frames become the splitllm.errors class the server named.
"""

from __future__ import annotations

import asyncio
import json
import ssl as ssl_module
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np

from splitllm import codec as codecs
from splitllm.errors import AuthError, FrameError, ServerUnavailable, SplitLLMError, error_from_code
from splitllm.model.sampling import SamplingParams
from splitllm.protocol import wire
from splitllm.protocol.payload import encode_run_input
from splitllm.protocol.plan import PlanRequest, PlanResponse


@dataclass
class LinkStats:
    """What the client measured of its link, from its own frames (EWMA estimates).

    Each request's network time is its wall time minus the server's compute and queue time.
    The smallest network time seen recently is the round trip of an almost empty frame; what a
    large frame takes beyond that is its transfer time, which gives the uplink bandwidth.
    """

    bytes_up: int = 0
    bytes_down: int = 0
    requests: int = 0
    server_ms: float = 0.0
    round_trip_ms: float = 0.0  # wall time of requests, server compute included
    rtt_ms_ewma: float | None = None
    uplink_bps_ewma: float | None = None
    _recent_network_ms: deque = field(default_factory=lambda: deque(maxlen=64))

    @property
    def rtt_floor_ms(self) -> float:
        return min(self._recent_network_ms) if self._recent_network_ms else 0.0

    def record(self, up: int, down: int, wall_ms: float, server_ms: float, queue_ms: float) -> None:
        self.bytes_up += up
        self.bytes_down += down
        self.requests += 1
        self.server_ms += server_ms
        self.round_trip_ms += wall_ms
        network_ms = max(wall_ms - server_ms - queue_ms, 0.0)
        self._recent_network_ms.append(network_ms)
        self.rtt_ms_ewma = network_ms if self.rtt_ms_ewma is None else 0.8 * self.rtt_ms_ewma + 0.2 * network_ms
        transfer_ms = network_ms - self.rtt_floor_ms
        if up >= 8192 and transfer_ms > 0.2:
            self.observe_uplink(up * 8 / (transfer_ms / 1e3))

    def observe_uplink(self, bps: float) -> None:
        """Average seconds per bit, not bits per second: one jittery sample that looks
        instantaneous must not drag the estimate to an absurd bandwidth."""
        if not bps > 0:
            return
        if self.uplink_bps_ewma is None:
            self.uplink_bps_ewma = bps
        else:
            self.uplink_bps_ewma = 1.0 / (0.7 / self.uplink_bps_ewma + 0.3 / bps)


class Remote:
    """One WebSocket session with a SplitLLM server."""

    def __init__(self, url: str, token: str | None, timeout_s: float, client_name: str,
                 ssl: ssl_module.SSLContext | bool | None = None) -> None:
        self.url = url.rstrip("/")
        self.ssl = True if ssl is None else ssl  # True: verify with the system CAs
        self.token = token
        self.timeout_s = timeout_s
        self.client_name = client_name
        self.http: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.welcome: wire.Welcome | None = None
        self.stats = LinkStats()
        self.heartbeat_s = 30.0  # WebSocket ping interval; the server pings on its own schedule too
        self._seq = 0
        self._lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        # Requests sent and not answered yet, oldest first: the server answers in order.
        self._waiters: deque[tuple[int | None, asyncio.Future[tuple[wire.Message, int]]]] = deque()
        self._closed_reason: str | None = None  # why the server ended the session while no request waited
        self._plan_over_http = False  # the server answered a Plan frame as unknown: use POST /v1/plan

    def _ws_url(self) -> str:
        if self.url.startswith("https://"):
            return "wss://" + self.url[len("https://"):] + "/v1/session"
        if self.url.startswith("http://"):
            return "ws://" + self.url[len("http://"):] + "/v1/session"
        return self.url + "/v1/session"

    async def connect(self, bundle_id: str, codec: str) -> wire.Welcome:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        if self.http is None:
            self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=self.timeout_s))
        try:
            # compress=0: no permessage-deflate (payloads are already quantised; docs/protocol.md).
            self.ws = await self.http.ws_connect(self._ws_url(), headers=headers, max_msg_size=0,
                                                heartbeat=self.heartbeat_s, ssl=self.ssl, compress=0)
        except aiohttp.WSServerHandshakeError as exc:
            await self.close()
            if exc.status == 401:
                raise AuthError(f"the server at {self.url} refused the token (HTTP 401)") from exc
            raise ServerUnavailable(f"SplitLLM server at {self.url} refused the session: HTTP {exc.status}") from exc
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            await self.close()
            raise ServerUnavailable(f"cannot reach the SplitLLM server at {self.url}: {exc or type(exc).__name__}") from exc
        self._closed_reason = None
        self._reader = asyncio.create_task(self._read(self.ws), name=f"splitllm-reader {self.url}")
        hello = wire.Hello(bundle_id=bundle_id, codec=codec, client_name=self.client_name, session_id="",
                           token=self.token or "")
        try:
            reply = await self._exchange(hello)
        except SplitLLMError:
            await self.close()
            raise
        if not isinstance(reply, wire.Welcome):
            await self.close()
            raise FrameError(f"expected Welcome from {self.url}, got {type(reply).__name__}")
        self.welcome = reply
        return reply

    def next_seq(self) -> int:
        self._seq = (self._seq + 1) % 2**31
        return self._seq

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Receive frames until the connection ends; each reply goes to the request awaiting it."""
        ended = ServerUnavailable(f"the server at {self.url} closed the session")
        try:
            while True:
                frame = await ws.receive()
                if frame.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
                                  aiohttp.WSMsgType.ERROR):
                    if frame.extra:
                        ended = ServerUnavailable(f"the server at {self.url} closed the session ({frame.extra})")
                    break
                if frame.type != aiohttp.WSMsgType.BINARY:
                    continue  # text frames are not part of the protocol; pings are answered by aiohttp
                try:
                    reply = wire.unpack(frame.data)
                except SplitLLMError as exc:  # a malformed frame fails the request it was meant for
                    self._resolve(None, exc, 0)
                    continue
                if isinstance(reply, wire.Close) and not self._waiters:
                    self._closed_reason = reply.reason
                self._resolve(reply, None, len(frame.data))
        except (aiohttp.ClientError, OSError, ConnectionError) as exc:
            ended = ServerUnavailable(f"lost the connection to {self.url}: {exc}")
        finally:
            self._resolve(None, ended, 0)

    def _resolve(self, reply: wire.Message | None, error: Exception | None, size: int) -> None:
        """Complete the oldest waiting request with ``reply`` (if it answers it) or ``error``.

        A ServerUnavailable (the connection ended) fails every waiting request; any other error
        (a malformed frame) fails only the oldest."""
        while self._waiters and self._waiters[0][1].done():
            self._waiters.popleft()  # timed out or cancelled
        if not self._waiters:
            return  # a stale reply to a request that timed out or was cancelled, or nobody waits
        if error is not None:
            ended = isinstance(error, ServerUnavailable)
            while self._waiters:
                _, future = self._waiters.popleft()
                if not future.done():
                    future.set_exception(error)
                if not ended:
                    break  # a malformed frame fails only the request it was meant for
            return
        expected, future = self._waiters[0]
        if expected is None or getattr(reply, "seq", None) in (None, -1, expected):
            self._waiters.popleft()
            future.set_result((reply, size))  # type: ignore[arg-type]

    async def _exchange(self, msg: wire.Message) -> wire.Message:
        return (await self._exchange_many([msg]))[0]

    async def _exchange_many(self, msgs: Sequence[wire.Message]) -> list[wire.Message]:
        """Send every frame, then collect the replies in order: one round trip for all of them.

        The link statistics get one sample for the batch (its bytes and wall time), as for one
        large frame. After every reply has arrived, the first error among them is raised.
        """
        ws = self.ws
        if ws is None or not self.connected:
            reason = f": {self._closed_reason}" if self._closed_reason else ""
            raise ServerUnavailable(f"the connection to {self.url} is closed{reason}")
        frames = [wire.pack(msg) for msg in msgs]
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[tuple[wire.Message, int]]] = []
        try:
            for msg, data in zip(msgs, frames, strict=True):
                future: asyncio.Future[tuple[wire.Message, int]] = loop.create_future()
                self._waiters.append((getattr(msg, "seq", None), future))
                futures.append(future)
                await ws.send_bytes(data)
            answered = await asyncio.wait_for(asyncio.gather(*futures), self.timeout_s)
        except (aiohttp.ClientError, OSError, ConnectionError) as exc:
            await self._broken()
            raise ServerUnavailable(f"lost the connection to {self.url}: {exc}") from exc
        except asyncio.TimeoutError as exc:
            await self._broken()
            raise ServerUnavailable(f"the server at {self.url} did not answer within {self.timeout_s} s") from exc
        except ServerUnavailable:
            await self._broken()
            raise
        finally:
            for future in futures:
                if not future.done():
                    future.cancel()
                elif not future.cancelled():
                    future.exception()  # mark it retrieved: the first error is raised, the rest are the same loss
            self._waiters = deque(w for w in self._waiters if not w[1].done())
        wall_ms = (time.perf_counter() - started) * 1e3
        replies = [reply for reply, _ in answered]
        self.stats.record(sum(map(len, frames)), sum(size for _, size in answered), wall_ms,
                          sum(getattr(r, "server_ms", 0.0) for r in replies),
                          sum(getattr(r, "queue_ms", 0.0) for r in replies))
        for reply in replies:
            if isinstance(reply, wire.Error):
                if reply.fatal:
                    await self._broken()
                wire.raise_for_error(reply)
            if isinstance(reply, wire.Close):
                await self._broken()
                raise ServerUnavailable(f"the server at {self.url} closed the session: {reply.reason}")
        return replies

    async def _broken(self) -> None:
        """Forget a connection that can no longer be trusted (the next request reconnects)."""
        ws, self.ws = self.ws, None
        reader, self._reader = self._reader, None
        if ws is not None and not ws.closed:
            await ws.close()
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()

    @property
    def closed_reason(self) -> str | None:
        """The reason the server gave when it ended the session between requests, else None."""
        return self._closed_reason

    @property
    def connected(self) -> bool:
        return (self.ws is not None and not self.ws.closed and self._reader is not None
                and not self._reader.done() and self._closed_reason is None)

    async def request(self, msg: wire.Message) -> wire.Message:
        async with self._lock:
            return await self._exchange(msg)

    async def request_many(self, msgs: Sequence[wire.Message]) -> list[wire.Message]:
        """Pipeline ``msgs``: every frame goes out before the first reply is awaited, so N
        requests cost one round trip plus their transfer, not N round trips. The replies come
        back in order; the first error among them is raised once all have arrived."""
        if not msgs:
            return []
        async with self._lock:
            return await self._exchange_many(msgs)

    # ------------------------------------------------------------------ typed requests

    async def run(self, start: int, end: int, past_len: int, x: np.ndarray, want: str, params: SamplingParams,
                  codec: str, *, trim_to: int | None = None) -> wire.Result:
        """Run units [start, end) of this session on the server over ``x`` (ids (1, T) from unit 0,
        else hidden (1, T, H)) after ``past_len`` cached positions; ``want`` "token", "tokens",
        "hidden" or "logits" (the last two come back encoded with ``codec``).

        ``trim_to``: first cut the server's KV of every unit to that many positions, in the same
        round trip (a Truncate pipelined before the Run), e.g. after rejected drafts.
        """
        n_tokens = int(x.shape[1])
        msg = wire.Run(seq=self.next_seq(), start=start, end=end, past_len=past_len, n_tokens=n_tokens,
                       payload=encode_run_input(x, start, codec), want=want, temperature=params.temperature,
                       top_p=params.top_p, top_k=params.top_k, seed=params.seed, codec=codec)
        if trim_to is None:
            reply = await self.request(msg)
        else:
            trim = wire.Truncate(seq=self.next_seq(), start=0, end=self.welcome.num_units if self.welcome else end,
                                 length=trim_to)
            reply = (await self.request_many([trim, msg]))[1]
        if not isinstance(reply, wire.Result):
            raise FrameError(f"expected a Result, got {type(reply).__name__}")
        return reply

    async def truncate(self, length: int, start: int, end: int) -> None:
        """Keep the first ``length`` positions of the server's KV for units [start, end)."""
        await self.request(wire.Truncate(seq=self.next_seq(), start=start, end=end, length=length))

    async def move_kv(self, up: Mapping[int, tuple[np.ndarray, np.ndarray]], down: Sequence[int],
                      length: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Hand the server the KV of the layers in ``up`` and take back those in ``down`` (each
        holding ``length`` positions), exact (fp32), in one pipelined round trip. Returns the
        (key, value) of every unit in ``down``; the server forgets them."""
        requests: list[wire.Message] = [
            wire.KVPut(seq=self.next_seq(), unit=unit, length=length, key=codecs.encode(key, "fp32"),
                       value=codecs.encode(value, "fp32"))
            for unit, (key, value) in up.items()
        ]
        requests += [wire.KVGet(seq=self.next_seq(), unit=unit) for unit in down]
        replies = await self.request_many(requests)
        received: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for unit, reply in zip(down, replies[len(up):], strict=True):
            if not isinstance(reply, wire.KVData) or reply.length != length or reply.unit != unit:
                raise FrameError(f"expected the KV of unit {unit} with {length} positions, got {reply!r:.80}")
            received[unit] = (codecs.decode(reply.key), codecs.decode(reply.value))
        return received

    async def plan(self, request: PlanRequest) -> PlanResponse:
        """Ask the server for placement policies, on the session (a Plan frame), so the replica
        holding this session plans with its own load whatever a balancer does with other requests.
        A server that does not know Plan frames is asked with ``POST /v1/plan`` instead."""
        body = request.to_json()
        if not self._plan_over_http and self.connected:
            frame = wire.Plan(seq=self.next_seq(), request=json.dumps(body).encode())
            try:
                reply = await self.request(frame)
            except FrameError as exc:
                if "plan" not in str(exc).lower():
                    raise
                self._plan_over_http = True  # an older server: unknown message type
            else:
                if not isinstance(reply, wire.PlanResult):
                    raise FrameError(f"expected a PlanResult, got {type(reply).__name__}")
                try:
                    data = json.loads(reply.policy)
                except (ValueError, UnicodeDecodeError) as exc:
                    raise FrameError(f"the server's plan answer is not JSON: {exc}") from exc
                return PlanResponse.from_json(data)
        return PlanResponse.from_json(await self.post_json("/v1/plan", body))

    async def probe(self, pad_bytes: int = 32768) -> tuple[float, float]:
        """Measure (rtt_ms, uplink_bps) with an empty Ping and a padded one."""
        times = []
        for pad in (0, pad_bytes, 0, pad_bytes):
            started = time.perf_counter()
            reply = await self.request(wire.Ping(seq=self.next_seq(), sent_ms=0.0, pad=b"\0" * pad))
            if not isinstance(reply, wire.Pong):
                raise FrameError(f"expected Pong, got {type(reply).__name__}")
            times.append((time.perf_counter() - started) * 1e3)
        rtt_ms = min(times[0], times[2])
        jitter_ms = abs(times[0] - times[2])
        transfer_ms = min(times[1], times[3]) - rtt_ms
        if transfer_ms <= max(jitter_ms, 0.05):
            # The padded pings were not measurably slower: the link is faster than this probe can
            # tell. Use the bound the jitter allows instead of dividing by noise.
            bound = pad_bytes * 8 / (max(jitter_ms, 0.05) / 1e3)
            self.stats.observe_uplink(bound)
            return rtt_ms, bound
        uplink = pad_bytes * 8 / (transfer_ms / 1e3)
        self.stats.observe_uplink(uplink)
        return rtt_ms, uplink

    async def post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST a JSON body to the server; 4xx answers raise the error the server named."""
        if self.http is None:
            raise ServerUnavailable(f"not connected to {self.url}")
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            async with self.http.post(self.url + path, json=body, headers=headers, ssl=self.ssl,
                                      timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
                data = await resp.json(content_type=None)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as exc:
            raise ServerUnavailable(f"POST {self.url}{path} failed: {exc or type(exc).__name__}") from exc
        if resp.status == 401:
            raise AuthError(f"the server at {self.url} refused the token (HTTP 401)")
        if resp.status >= 400 or not isinstance(data, dict):
            err = data.get("error", {}) if isinstance(data, dict) else {}
            raise error_from_code(str(err.get("code", "remote")), str(err.get("message", f"HTTP {resp.status}")))
        return data

    async def close(self) -> None:
        if self.ws is not None and not self.ws.closed:
            try:
                await self.ws.send_bytes(wire.pack(wire.Close(reason="client done")))
                await self.ws.close()
            except (aiohttp.ClientError, OSError, ConnectionError):
                pass
        if self._reader is not None:
            self._reader.cancel()
        if self.http is not None:
            await self.http.close()
        self.ws = None
        self._reader = None
        self.http = None
