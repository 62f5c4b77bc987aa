"""Emulate a slower network and a slower device on one machine, for tests, benchmarks and demos.

``tc netem`` delay has no effect on the machines we run on, and shaping needs root, so the link
is an asyncio TCP proxy instead::

    async with ShapedLink("127.0.0.1", server_port, uplink_bps=2e6, downlink_bps=10e6, rtt_ms=40) as link:
        async with SplitClient(bundle, link.url) as client:
            ...
            link.set(uplink_bps=300e3)  # takes effect within ~50 ms, on open connections too

Each direction of each connection is one emulated link: a token bucket paces the bytes at the
set rate and a bounded delay line holds them for ``rtt_ms / 2`` after they "left". The bucket
holds one packet's worth (``burst_bytes``, 1,500 by default), so a 32 KB bandwidth probe sees
the rate, not a burst; bytes are read in chunks of about 5 ms at the rate, and a chunk moves on
once all of it has been paced out. Bytes keep their order, and nothing buffers without bound:
when the delay line is full (twice the bandwidth-delay product, at least 256 KiB) or the
receiver stops reading, the proxy stops reading from the sender and TCP pushes back on it.

:class:`SlowDevice` is the device-side counterpart: a :class:`~splitllm.client.SplitClient`
(on a :class:`SlowLocalDevice`) whose local runs last as long as on a device ``device_factor`` times slower than this machine
(the extra time is slept, so the emulation costs no CPU), and :func:`scaled_profile` is the
profile to plan with for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from splitllm.client import SplitClient
from splitllm.device import LocalDevice
from splitllm.errors import ConfigError
from splitllm.model.runtime import KVCache, RuntimeOptions
from splitllm.planner.profile import Profile

__all__ = ["LinkCounters", "PhantomDevice", "ShapedLink", "SlowDevice", "SlowLocalDevice", "scaled_profile"]

_MAX_WAIT_S = 0.05  # pacing sleeps are cut into slices this long, so set() acts on a waiting chunk
_CHUNK_S = 0.005  # read chunks of about this much traffic at the set rate
_MIN_CHUNK = 1024
_MAX_CHUNK = 64 * 1024
_MIN_LINE_BYTES = 256 * 1024
_UNSHAPED_LINE_BYTES = 4 * 1024 * 1024


def _check_rate(name: str, value: float | None) -> float | None:
    """A rate in bit/s, or None for an unshaped direction (``None`` or ``math.inf`` given)."""
    if value is None or value == math.inf:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConfigError(f"{name} must be a number of bit/s > 0 (math.inf or None: unshaped), got {value!r}")
    return float(value)


def _check_rtt(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ConfigError(f"rtt_ms must be a number of milliseconds >= 0, got {value!r}")
    return float(value)


class _Direction:
    """The settings of one direction, shared by every connection through the link."""

    def __init__(self, rate_bps: float | None, delay_s: float, burst_bytes: int) -> None:
        self.rate_bps = rate_bps
        self.delay_s = delay_s
        self.burst_bytes = burst_bytes

    @property
    def chunk_bytes(self) -> int:
        """Read size: about one burst, so a slow link releases bytes smoothly, not in big lumps."""
        if self.rate_bps is None:
            return _MAX_CHUNK
        return int(min(max(self.rate_bps / 8 * _CHUNK_S, _MIN_CHUNK), _MAX_CHUNK))

    @property
    def line_bytes(self) -> int:
        """Delay-line capacity: twice the bandwidth-delay product, so the delay never limits the rate."""
        if self.rate_bps is None:
            return _UNSHAPED_LINE_BYTES
        return int(max(2 * self.rate_bps / 8 * self.delay_s, _MIN_LINE_BYTES))


class _Bucket:
    """Token bucket in bytes that may go into debt: ``take(n)`` returns when n bytes have "left".

    While it pays off a backlog, a late wake-up of the event loop is credited in full (a real
    link keeps sending while the pacer oversleeps), so a busy machine adds jitter, not a lower
    rate; an idle link refills only to ``burst_bytes`` (or to that last late credit).
    """

    def __init__(self, direction: _Direction) -> None:
        self.direction = direction
        self.tokens = float(direction.burst_bytes)
        self.last = time.perf_counter()

    def _refill(self, cap: float) -> None:
        now = time.perf_counter()
        rate = self.direction.rate_bps
        if rate is None:
            self.tokens = float(self.direction.burst_bytes)
        else:
            self.tokens = min(cap, self.tokens + (now - self.last) * rate / 8)
        self.last = now

    async def take(self, size_bytes: int) -> None:
        self._refill(max(float(self.direction.burst_bytes), self.tokens))
        self.tokens -= size_bytes
        while self.tokens < 0:
            rate = self.direction.rate_bps
            if rate is None:
                self.tokens = 0.0
                break
            await asyncio.sleep(min(-self.tokens * 8 / rate, _MAX_WAIT_S))
            self._refill(math.inf)


class _DelayLine:
    """FIFO of (deliver_at, bytes) bounded in bytes; ``put`` waits while it is full."""

    def __init__(self, direction: _Direction) -> None:
        self.direction = direction
        self.items: deque[tuple[float, bytes]] = deque()
        self.size_bytes = 0
        self.changed = asyncio.Event()

    async def put(self, data: bytes) -> None:
        # One chunk may always enter an empty line, so a capacity below the chunk cannot deadlock.
        while self.items and self.size_bytes + len(data) > self.direction.line_bytes:
            self.changed.clear()
            await self.changed.wait()
        self.items.append((time.perf_counter() + self.direction.delay_s, data))
        self.size_bytes += len(data)
        self.changed.set()

    async def get(self) -> tuple[float, bytes] | None:
        """The oldest chunk (None marks the end of the stream)."""
        while not self.items:
            self.changed.clear()
            await self.changed.wait()
        deliver_at, data = self.items.popleft()
        self.size_bytes -= len(data)
        self.changed.set()
        return (deliver_at, data) if data else None


@dataclass
class LinkCounters:
    """What went through the link since it opened (all connections)."""

    connections: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


class ShapedLink:
    """A TCP proxy on 127.0.0.1 (ephemeral port) in front of ``target_host:target_port``.

    ``uplink_bps`` shapes client -> target, ``downlink_bps`` target -> client (None: unshaped);
    ``rtt_ms`` is split evenly between the two directions. All three can change at run time
    with :meth:`set`. ``burst_bytes`` is the token bucket's depth (bytes that may pass at once
    after an idle period). Use ``async with`` (or :meth:`start` / :meth:`close`); :attr:`url` is
    ``http://127.0.0.1:PORT``. A target that cannot be reached closes the client's connection.
    """

    def __init__(self, target_host: str, target_port: int, *, uplink_bps: float | None = None,
                 downlink_bps: float | None = None, rtt_ms: float = 0.0, burst_bytes: int = 1500,
                 listen_host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = int(target_port)
        self.listen_host = listen_host
        rtt = _check_rtt(rtt_ms)
        if isinstance(burst_bytes, bool) or not isinstance(burst_bytes, int) or burst_bytes < 1:
            raise ConfigError(f"burst_bytes must be an int >= 1, got {burst_bytes!r}")
        self._up = _Direction(_check_rate("uplink_bps", uplink_bps), rtt / 2e3, burst_bytes)
        self._down = _Direction(_check_rate("downlink_bps", downlink_bps), rtt / 2e3, burst_bytes)
        self._rtt_ms = rtt
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._lines: list[_DelayLine] = []
        self.counters = LinkCounters()
        self.port = 0

    # ------------------------------------------------------------------ settings

    @property
    def uplink_bps(self) -> float | None:
        return self._up.rate_bps

    @property
    def downlink_bps(self) -> float | None:
        return self._down.rate_bps

    @property
    def rtt_ms(self) -> float:
        return self._rtt_ms

    def set(self, *, uplink_bps: float | None = None, downlink_bps: float | None = None,
            rtt_ms: float | None = None) -> None:
        """Change what is given (None: unchanged; a rate of ``math.inf``: unshaped), for open connections too.

        Bytes already in a delay line keep their delivery time; later ones never overtake them.
        """
        up = self._up.rate_bps if uplink_bps is None else _check_rate("uplink_bps", uplink_bps)
        down = self._down.rate_bps if downlink_bps is None else _check_rate("downlink_bps", downlink_bps)
        rtt = self._rtt_ms if rtt_ms is None else _check_rtt(rtt_ms)
        self._up.rate_bps, self._down.rate_bps = up, down
        self._up.delay_s = self._down.delay_s = rtt / 2e3
        self._rtt_ms = rtt
        for line in self._lines:
            line.changed.set()  # a larger capacity may let a waiting put in

    @property
    def url(self) -> str:
        if not self.port:
            raise ConfigError("the link is not started; use 'async with ShapedLink(...)' or await start()")
        return f"http://{self.listen_host}:{self.port}"

    @property
    def buffered_bytes(self) -> int:
        """Bytes held in the delay lines right now (bounded; see the module docstring)."""
        return sum(line.size_bytes for line in self._lines)

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> ShapedLink:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._accept, self.listen_host, 0)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {self.listen_host}: {exc}") from exc
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop accepting, drop every open connection, and wait for the proxy's tasks to end."""
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # ------------------------------------------------------------------ proxying

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._spawn(self._connection(reader, writer))

    async def _connection(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            target_r, target_w = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            client_w.close()
            return
        self.counters.connections += 1
        up_line, down_line = _DelayLine(self._up), _DelayLine(self._down)
        self._lines += [up_line, down_line]
        tasks = [
            asyncio.ensure_future(self._pace(client_r, self._up, up_line, "bytes_up")),
            asyncio.ensure_future(self._deliver(up_line, target_w)),
            asyncio.ensure_future(self._pace(target_r, self._down, down_line, "bytes_down")),
            asyncio.ensure_future(self._deliver(down_line, client_w)),
        ]
        clean = False
        try:
            # The connection ends when both deliverers have passed on an end of stream, or as
            # soon as any side fails (reset, closed mid-write): then everything is dropped.
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if any(t.exception() is not None for t in done if not t.cancelled()):
                    break
                if tasks[1] in done and tasks[3] in done:
                    clean = True
                    break
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._lines = [line for line in self._lines if line not in (up_line, down_line)]
            for w in (client_w, target_w):
                # Closing flushes what the socket still holds, which a stalled peer never reads:
                # a failed or cancelled connection is aborted instead.
                if clean:
                    w.close()
                else:
                    w.transport.abort()
            with contextlib.suppress(OSError, ConnectionError, asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(client_w.wait_closed(), target_w.wait_closed()), 1.0)
            for w in (client_w, target_w):
                w.transport.abort()  # no-op once closed

    async def _pace(self, reader: asyncio.StreamReader, direction: _Direction, line: _DelayLine,
                    counter: str) -> None:
        """Read chunks, hold each until the bucket lets it leave, then put it on the delay line."""
        bucket = _Bucket(direction)
        while True:
            data = await reader.read(direction.chunk_bytes)
            if not data:
                await line.put(b"")  # end of stream, in order behind the data
                return
            await bucket.take(len(data))
            setattr(self.counters, counter, getattr(self.counters, counter) + len(data))
            await line.put(data)

    @staticmethod
    async def _deliver(line: _DelayLine, writer: asyncio.StreamWriter) -> None:
        """Write each chunk at its delivery time; ``drain`` pushes back when the receiver is slow."""
        while True:
            item = await line.get()
            if item is None:
                if writer.can_write_eof():
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                return
            deliver_at, data = item
            wait_s = deliver_at - time.perf_counter()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            writer.write(data)
            await writer.drain()


def scaled_profile(profile: Profile, factor: float) -> Profile:
    """``profile`` with every unit ``factor`` times slower: what to plan with for a :class:`SlowDevice`."""
    if not factor >= 1.0:
        raise ConfigError(f"a device-speed factor must be >= 1 (1 = this machine), got {factor!r}")
    return Profile(profile.bundle_id, profile.threads, profile.prefill_tokens, profile.context,
                   tuple(ms * factor for ms in profile.prefill_ms), tuple(ms * factor for ms in profile.decode_ms))


def _profiled_s(profile: Profile, start: int, end: int, tokens: int) -> float:
    """Seconds ``profile`` gives units [start, end) for a run of ``tokens`` positions."""
    per_unit = profile.decode_ms if tokens == 1 else profile.scaled_prefill_ms(tokens)
    return sum(per_unit[start:end]) / 1e3


def _check_factor(device_factor: float) -> None:
    if not device_factor >= 1.0:
        raise ConfigError(f"device_factor must be >= 1 (1 = this machine), got {device_factor!r}")


class SlowLocalDevice(LocalDevice):
    """A :class:`~splitllm.device.LocalDevice` whose runs last as long as on a device
    ``device_factor`` times slower than this machine (see :class:`SlowDevice`)."""

    def __init__(self, *args: Any, device_factor: float = 1.0, base_profile: Profile | None = None,
                 **kwargs: Any) -> None:
        _check_factor(device_factor)
        super().__init__(*args, **kwargs)
        if base_profile is not None and len(base_profile.decode_ms) != self.bundle.num_units:
            raise ConfigError(f"base_profile covers {len(base_profile.decode_ms)} units; the bundle has "
                              f"{self.bundle.num_units}")
        self.device_factor = float(device_factor)
        self.base_profile = base_profile
        self.slept_s = 0.0  # extra device time emulated so far

    def run_sync(self, start: int, end: int, x: np.ndarray, cache: KVCache, past_len: int,
                 all_logits: bool = False) -> np.ndarray:
        started = time.perf_counter()
        out = super().run_sync(start, end, x, cache, past_len, all_logits)
        if self.device_factor == 1.0 and self.base_profile is None:
            return out
        took_s = time.perf_counter() - started
        if self.base_profile is None:
            target_s = self.device_factor * took_s
        else:
            target_s = self.device_factor * _profiled_s(self.base_profile, start, end, x.shape[1])
        extra_s = max(target_s - took_s, 0.0)
        time.sleep(extra_s)  # on the device's worker thread: the event loop keeps running
        self.slept_s += extra_s
        return out


class PhantomDevice(LocalDevice):
    """A device that takes its profiled time asleep and hands on zeros instead of computing.

    For load tests about the *server*: many emulated devices in one process would otherwise
    compute on the cores the server needs. The server's work does not depend on the values it
    is sent, so its time is measured faithfully; the tokens are meaningless (token correctness
    is tested with real devices). The KV cache still grows by the positions "run" (zeros, in
    preallocated buffers), so KV moves at placement switches send what the protocol expects.
    """

    def __init__(self, bundle: Any, profile: Profile) -> None:
        super().__init__(bundle, RuntimeOptions(intra_op_threads=1, allow_spinning=False))
        if len(profile.decode_ms) != self.bundle.num_units:
            raise ConfigError(f"the profile covers {len(profile.decode_ms)} units; the bundle has "
                              f"{self.bundle.num_units}")
        self.profile = profile
        self.slept_s = 0.0

    async def load(self, start: int, end: int) -> None:
        return None  # nothing to load: no session is ever built

    def run_sync(self, start: int, end: int, x: np.ndarray, cache: KVCache, past_len: int,
                 all_logits: bool = False) -> np.ndarray:
        tokens = int(x.shape[1])
        for unit in range(max(start, 1), min(end, self.bundle.num_layers + 1)):
            cache.buffers(unit, past_len + tokens)
            cache._grown(unit, past_len + tokens)  # noqa: SLF001 - the positions it stands in for
        delay_s = _profiled_s(self.profile, start, end, tokens)
        time.sleep(delay_s)  # on the device's worker thread: the event loop keeps running
        self.slept_s += delay_s
        shapes = self.bundle.shapes
        if end == self.bundle.num_units:
            return np.zeros((1, tokens if all_logits else 1, shapes.vocab_size), dtype=np.float32)
        return np.zeros((1, tokens, shapes.hidden_size), dtype=np.float32)


class SlowDevice(SplitClient):
    """A SplitClient on an emulated device ``device_factor`` times slower than this machine.

    With ``base_profile`` (this machine's profile, e.g. ``load_or_measure(bundle)``) every local
    run lasts ``device_factor`` times its profiled time — exactly what a plan made with
    ``scaled_profile(base_profile, device_factor)`` assumes — or longer if this machine is so
    busy that the real compute takes longer. Without it, a run lasts ``device_factor`` times
    what it really took here (busy-machine slowdowns are multiplied too). The extra time is
    slept on the device thread. Other arguments as for SplitClient.
    """

    def __init__(self, *args: Any, device_factor: float = 1.0, base_profile: Profile | None = None,
                 **kwargs: Any) -> None:
        _check_factor(device_factor)  # before the bundle is opened
        super().__init__(*args, **kwargs)
        # The same device with the same runtime options, slowed down (built before any segment loads).
        self.slow_device = SlowLocalDevice(self.bundle, self.options, self.weights, device_factor=device_factor,
                                           base_profile=base_profile)
        self.conversation.device.close()
        self.conversation.device = self.slow_device

    @property
    def device_factor(self) -> float:
        return self.slow_device.device_factor

    @property
    def base_profile(self) -> Profile | None:
        return self.slow_device.base_profile

    @property
    def slept_s(self) -> float:
        return self.slow_device.slept_s
