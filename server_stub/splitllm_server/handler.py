"""The WebSocket conversation with one client: handshake, then requests until close.

Every frame is validated before use; any SplitLLMError a request raises becomes an Error frame
for that request and the connection (and its session state) carries on. Only a failed
handshake is fatal. The handler only checks and translates protocol messages: payloads are
decoded and encoded by the engine's executor (Run, KVPut, KVGet), on the engine's thread.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time

from aiohttp import WSCloseCode, WSMsgType, web

from splitllm import codec as codecs
from splitllm.errors import (
    AuthError,
    BundleMismatch,
    FrameError,
    FrameTooLarge,
    RateLimited,
    SessionStateError,
    SplitLLMError,
    TooManyTokens,
)
from splitllm.model.sampling import SamplingParams
from splitllm.protocol import wire
from splitllm_server.planning import plan_frame
from splitllm_server.sessions import ServerSession
from splitllm_server.state import ServerState

log = logging.getLogger("splitllm.server")

# What a draining server tells each client; the SDK treats any Close as a lost server and
# reconnects (through the balancer: to another replica), replaying its conversation.
DRAIN_REASON = "server draining; reconnect"
DRAIN_CLOSE_CODE = WSCloseCode.SERVICE_RESTART  # 1012
HANDSHAKE_CLOSE_CODE = WSCloseCode.POLICY_VIOLATION  # 1008


class Connection:
    def __init__(self, state: ServerState, ws: web.WebSocketResponse, header_token_ok: bool) -> None:
        self.state = state
        self.ws = ws
        self.header_token_ok = header_token_ok
        self.session: ServerSession | None = None
        self.decode_steps = 0  # one-token Runs since the last prompt (multi-token Run) or Truncate
        rate = state.config.max_steps_per_s
        self._bucket = rate  # token bucket: up to one second's worth of requests in a burst
        self._bucket_at = time.monotonic()
        self.busy = False  # inside on_frame: a drain waits for it before sending the Close
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._expiry: asyncio.Future[None] | None = None
        self._prompt_at: dict[int, float] = {}  # seq of a prompt Run -> arrival, for the TTFT histogram

    def take_step(self) -> None:
        rate = self.state.config.max_steps_per_s
        now = time.monotonic()
        self._bucket = min(rate, self._bucket + (now - self._bucket_at) * rate)
        self._bucket_at = now
        if self._bucket < 1:
            raise RateLimited(f"more than {rate:g} requests per second on this connection")
        self._bucket -= 1

    async def close(self, reason: str, code: int = WSCloseCode.GOING_AWAY) -> None:
        """Say why (a Close frame, then the WebSocket close ``code`` with the reason), then close:
        shutdown and idle eviction 1001, drain 1012, handshake deadline 1008."""
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        if not self.ws.closed:
            try:
                await self.send(wire.Close(reason=reason))
                await self.ws.close(code=code, message=reason.encode()[:120])
            except (ConnectionError, RuntimeError):
                pass
        if self.session is not None:
            self.state.sessions.close(self.session.session_id)
            self.session = None

    async def send(self, msg: wire.Message) -> None:
        data = wire.pack(msg)
        metrics = self.state.metrics
        metrics.bytes_out += len(data)
        if isinstance(msg, wire.Result):
            metrics.observe_step(msg.server_ms / 1e3, msg.queue_ms / 1e3)
            arrived = self._prompt_at.pop(msg.seq, None)
            if arrived is not None and msg.token >= 0:
                metrics.observe_ttft(time.perf_counter() - arrived)
        elif isinstance(msg, wire.Error):
            self._prompt_at.pop(msg.seq, None)
        try:
            await self.ws.send_bytes(data)
        except ConnectionResetError:  # the client left while its request ran: nobody to answer
            log.info("client gone before its %s could be sent", type(msg).__name__)

    def _handshake_expired(self) -> None:
        """The handshake deadline passed: a connection still without a session is closed."""
        if self.session is None and not self.busy and not self.ws.closed:
            timeout = self.state.config.handshake_timeout_s
            self.state.metrics.count_error("handshake_timeout")
            log.info("closing a WebSocket without a valid Hello after %g s", timeout)
            # Kept on the connection: the loop holds tasks only weakly.
            self._expiry = asyncio.ensure_future(self.close(f"no valid Hello within {timeout:g} s",
                                                            HANDSHAKE_CLOSE_CODE))

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._handshake_timer = loop.call_later(self.state.config.handshake_timeout_s, self._handshake_expired)
        try:
            async for frame in self.ws:
                if frame.type == WSMsgType.BINARY:
                    self.state.metrics.bytes_in += len(frame.data)
                    self.busy = True
                    try:
                        keep = await self.on_frame(frame.data)
                    finally:
                        self.busy = False
                    if not keep:
                        break
                    if self.state.closing:  # draining and the step is done: now tell the client to move
                        await self.close(DRAIN_REASON, DRAIN_CLOSE_CODE)
                        break
                elif frame.type == WSMsgType.TEXT:
                    await self.report(FrameError("text frames are not part of the protocol; send binary msgpack"))
                elif frame.type == WSMsgType.ERROR:
                    break
        finally:
            self._handshake_timer.cancel()
            if self.session is not None:
                self.state.sessions.close(self.session.session_id)
                self.session = None

    async def report(self, exc: SplitLLMError, seq: int = -1, fatal: bool = False) -> None:
        self.state.metrics.count_error(exc.code)
        if not self.ws.closed:
            await self.send(wire.error_frame(exc, seq=seq, fatal=fatal))

    async def on_frame(self, data: bytes) -> bool:
        """Handle one frame; False ends the connection."""
        seq = -1
        try:
            limit = self.state.config.max_frame_bytes
            if len(data) > limit:
                raise FrameTooLarge(f"frame of {len(data)} bytes exceeds the server's limit of {limit}")
            msg = wire.unpack(data, max_frame_bytes=limit)
            seq = getattr(msg, "seq", -1)
            if isinstance(msg, wire.Run) and msg.n_tokens > 1 and msg.want == "token":
                self._prompt_at[msg.seq] = time.perf_counter()  # its Result observes the TTFT
            if self.session is None:
                if not isinstance(msg, wire.Hello):
                    raise FrameError(f"the first frame must be Hello, got {type(msg).__name__}")
                await self.handshake(msg)
                return True
            self.session.touch()
            if not isinstance(msg, wire.Close):
                self.take_step()
            if isinstance(msg, wire.Run):
                await self.on_run(msg)
            elif isinstance(msg, wire.Truncate):
                self.check_units(msg.start, msg.end)
                await self.state.engine.call(self.session.cache.truncate, msg.length, range(msg.start, msg.end))
                self.decode_steps = 0
                await self.send(wire.Ack(seq=msg.seq))
            elif isinstance(msg, wire.KVPut):
                self.check_layer_unit(msg.unit)
                engine = self.state.engine
                await engine.call(engine.executor.kv_put, self.session.cache, msg)
                await self.send(wire.Ack(seq=msg.seq))
            elif isinstance(msg, wire.KVGet):
                self.check_layer_unit(msg.unit)
                engine = self.state.engine
                await self.send(await engine.call(engine.executor.kv_get, self.session.cache, msg))
            elif isinstance(msg, wire.Plan):  # planned by the replica holding this session
                slot = self.session.slot if self.session is not None else None
                await self.send(await plan_frame(self.state, msg, slot))
            elif isinstance(msg, wire.Ping):
                await self.send(wire.Pong(seq=msg.seq, sent_ms=msg.sent_ms, pad_len=len(msg.pad)))
            elif isinstance(msg, wire.Close):
                return False
            else:
                raise FrameError(f"{type(msg).__name__} is not a client request")
        except (AuthError, BundleMismatch) as exc:
            await self.report(exc, seq=seq, fatal=True)
            return False
        except SplitLLMError as exc:
            await self.report(exc, seq=seq, fatal=self.session is None)
            return self.session is not None
        except Exception as exc:  # a bug of ours: say so, drop this connection, keep serving the rest
            log.exception("internal error while handling a frame")
            await self.report(SplitLLMError(f"internal server error: {type(exc).__name__}"), seq=seq, fatal=True)
            return False
        return True

    async def handshake(self, hello: wire.Hello) -> None:
        state = self.state
        token = state.config.token
        if token is not None and not self.header_token_ok and not hmac.compare_digest(
            hello.token.encode(), token.encode()
        ):
            raise AuthError("missing or wrong bearer token")
        if hello.bundle_id != state.bundle.bundle_id:
            raise BundleMismatch(
                f"client bundle {hello.bundle_id[:16]} differs from the server's {state.bundle.bundle_id[:16]} "
                f"({state.bundle.model_id}); export and load the same bundle on both sides"
            )
        codecs.get_codec(hello.codec)
        state.sessions.check_room()
        slot, cache = await state.engine.open_session()
        session = self.session = state.sessions.open(slot, cache, hello.codec, hello.client_name)
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        await self.send(wire.Welcome(
            session_id=session.session_id,
            server_name=state.config.server_name,
            num_units=state.bundle.num_units,
            max_context=state.max_context,
            codecs=list(codecs.codec_names()),
            max_frame_bytes=state.config.max_frame_bytes,
            kv_lens=[0] * state.bundle.num_units,
        ))

    @property
    def live(self) -> ServerSession:
        """The session this connection opened (requests before the handshake never get here)."""
        if self.session is None:
            raise SessionStateError("no session: the first frame must be Hello")
        return self.session

    def check_units(self, start: int, end: int) -> None:
        if end > self.state.bundle.num_units:
            raise FrameError(f"unit range [{start}, {end}) exceeds the model's {self.state.bundle.num_units} units")

    def check_layer_unit(self, unit: int) -> None:
        if not 1 <= unit <= self.state.bundle.num_layers:
            raise FrameError(f"unit {unit} is not a decoder layer (1..{self.state.bundle.num_layers}); only layers hold KV")

    async def on_run(self, msg: wire.Run) -> None:
        """Check the request against the protocol; the engine does the rest (the context check
        included) and builds the Result."""
        state = self.state
        session = self.live
        self.check_units(msg.start, msg.end)
        num_units = state.bundle.num_units
        ends_with_head = msg.end == num_units
        if msg.want in ("token", "logits", "tokens") and not ends_with_head:
            raise FrameError(f"want={msg.want!r} needs the head (unit {num_units - 1}) in the range")
        if msg.want == "hidden" and ends_with_head:
            raise FrameError("want='hidden' cannot include the head; ask for 'token' or 'logits'")
        if msg.n_tokens > 1:
            self.decode_steps = 0
        elif ends_with_head:
            self.decode_steps += 1
            if self.decode_steps > state.config.max_new_tokens:
                raise TooManyTokens(f"more than {state.config.max_new_tokens} decode steps in a row")
        SamplingParams(msg.temperature, msg.top_p, msg.top_k, msg.seed)  # ConfigError names a bad one
        if msg.want != "token":
            codecs.get_codec(msg.codec)
        reply, _ = await state.engine.run(session.slot, session.cache, msg)
        state.metrics.tokens_in += msg.n_tokens
        if msg.want == "token":
            session.tokens += 1
            state.metrics.tokens_out += 1
        await self.send(reply)
