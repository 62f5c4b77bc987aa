"""ShapedLink: rate, delay, run-time changes, backpressure, and a real SplitClient session through it.

Rates are checked loosely (±25%) on transfers of about a second: the proxy paces with asyncio
sleeps on a shared machine. Delays are lower bounds only (timed assertions above a bound would
be flaky).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from splitllm.client import SplitClient
from splitllm.errors import ConfigError
from splitllm.model.bundle import Bundle
from splitllm.planner.profile import Profile, measure
from splitllm.testing.netem import ShapedLink, SlowDevice, scaled_profile
from splitllm_export.validate.splits import reference_run


class Peer:
    """A loopback TCP server: ``sink`` counts what it gets, ``echo`` answers each read, ``source`` sends."""

    def __init__(self, mode: str, payload: bytes = b"") -> None:
        self.mode = mode
        self.payload = payload
        self.received = bytearray()
        self.enough = asyncio.Event()
        self.expect = 0
        self.server: asyncio.base_events.Server | None = None
        self.stop = asyncio.Event()

    async def __aenter__(self) -> Peer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        self.server.close()

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.mode == "source":
                writer.write(self.payload)
                await writer.drain()
            elif self.mode == "stall":
                await self.stop.wait()
                return
            while data := await reader.read(65536):
                if self.mode == "echo":
                    writer.write(data)
                    await writer.drain()
                self.received += data
                if len(self.received) >= self.expect:
                    self.enough.set()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.transport.abort()


def _pattern(size: int) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[:size]


async def _upload_rate(port: int, peer: Peer, size: int) -> float:
    """bit/s of one upload of ``size`` bytes through the link at ``port``, first write to last byte."""
    peer.received.clear()
    peer.enough.clear()
    peer.expect = size
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.perf_counter()
    writer.write(_pattern(size))
    await writer.drain()
    await asyncio.wait_for(peer.enough.wait(), 20)
    elapsed = time.perf_counter() - started
    writer.close()
    return size * 8 / elapsed


async def _echo_ms(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
    started = time.perf_counter()
    writer.write(b"ping")
    await writer.drain()
    await asyncio.wait_for(reader.readexactly(4), 10)
    return (time.perf_counter() - started) * 1e3


async def test_bulk_transfers_run_at_the_set_rate_in_order():
    size = 250_000  # 1 s at 2 Mbit/s
    async with Peer("sink") as sink:
        async with ShapedLink("127.0.0.1", sink.port, uplink_bps=2e6, rtt_ms=10) as link:
            rate = await _upload_rate(link.port, sink, size)
            assert bytes(sink.received) == _pattern(size)
            assert link.counters.bytes_up == size
    assert 1.5e6 <= rate <= 2.5e6, rate

    payload = _pattern(size)
    async with Peer("source", payload) as source:
        async with ShapedLink("127.0.0.1", source.port, downlink_bps=4e6) as link:
            reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
            started = time.perf_counter()
            got = await asyncio.wait_for(reader.readexactly(size), 20)
            rate = size * 8 / (time.perf_counter() - started)
            writer.close()
    assert got == payload
    assert 3e6 <= rate <= 5e6, rate


async def test_delay_adds_the_rtt_and_changes_at_run_time():
    async with Peer("echo") as echo, ShapedLink("127.0.0.1", echo.port, rtt_ms=60) as link:
        reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
        assert min([await _echo_ms(reader, writer) for _ in range(3)]) >= 60
        link.set(rtt_ms=150)  # the open connection sees the new delay
        assert await _echo_ms(reader, writer) >= 150
        link.set(rtt_ms=0)
        assert link.rtt_ms == 0 and await _echo_ms(reader, writer) < 150
        writer.close()


async def test_rate_changes_at_run_time():
    async with Peer("sink") as sink, ShapedLink("127.0.0.1", sink.port, uplink_bps=1e6) as link:
        slow = await _upload_rate(link.port, sink, 100_000)
        link.set(uplink_bps=8e6)
        fast = await _upload_rate(link.port, sink, 800_000)
        assert link.uplink_bps == 8e6 and link.downlink_bps is None
    assert 0.75e6 <= slow <= 1.25e6, slow
    assert 6e6 <= fast <= 10e6, fast


async def test_a_stalled_receiver_pushes_back_and_the_link_closes_cleanly():
    async with Peer("stall") as stall:
        link = ShapedLink("127.0.0.1", stall.port, uplink_bps=50e6, rtt_ms=2)
        await link.start()
        _, writer = await asyncio.open_connection("127.0.0.1", link.port)
        writer.write(b"\0" * (64 << 20))  # far more than every buffer on the way can hold
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(writer.drain(), 1.0)
        assert 0 < link.buffered_bytes <= 512 * 1024  # the delay line's bound (+ one chunk)
        started = time.perf_counter()
        await link.close()
        assert time.perf_counter() - started < 2.0
        writer.close()


async def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="uplink_bps"):
        ShapedLink("127.0.0.1", 1, uplink_bps=0)
    with pytest.raises(ConfigError, match="rtt_ms"):
        ShapedLink("127.0.0.1", 1, rtt_ms=-1)
    link = ShapedLink("127.0.0.1", 1)
    with pytest.raises(ConfigError, match="downlink_bps"):
        link.set(downlink_bps=-5)
    with pytest.raises(ConfigError, match="not started"):
        _ = link.url
    with pytest.raises(ConfigError, match="factor"):
        SlowDevice("unused", device_factor=0.5)


async def test_a_split_client_plans_and_generates_through_a_shaped_link(tiny_export, start_server, monkeypatch,
                                                                          tmp_path):
    monkeypatch.setenv("SPLITLLM_CACHE", str(tmp_path))  # the server's profile is cached here
    path, source = tiny_export("llama", layers=4)
    bundle = Bundle.open(path)
    ids = source.tokenizer.apply_chat_template([{"role": "user", "content": "Explain the tides."}],
                                               tokenize=True, add_generation_prompt=True)
    ref = reference_run(source.model, ids, 11).tokens  # the prompt's next token + 11
    server = await start_server(path)
    port = int(server.url.rsplit(":", 1)[1])
    here = measure(bundle, repeats=2)
    # A device on which the whole model takes 200 ms per token; with a 100 ms budget and a 10 ms
    # round trip the planner must send some layers through the link.
    slow = scaled_profile(here, 200.0 / sum(here.decode_ms))
    async with ShapedLink("127.0.0.1", port, uplink_bps=2e6, downlink_bps=8e6, rtt_ms=10) as link:
        async with SplitClient(path, link.url, codec="fp32") as client:
            await client.plan(ttft_ms=1e4, token_ms=100.0, prompt_tokens=len(ids), profile=slow)
            measured = client.link.uplink_bps_ewma
            assert measured is not None and 1e6 <= measured <= 4e6, measured
            assert client.link.rtt_floor_ms >= 10
            async for _ in client.generate_ids(ids, max_new_tokens=12, ignore_eos=True):
                pass
            assert client.last_stats.new_ids == ref
            assert client.last_stats.server_units > 0
        assert link.counters.connections >= 1 and link.counters.bytes_up > 65536


async def test_a_slow_device_lasts_as_long_as_its_profile_and_gives_the_same_tokens(tiny_export):
    path, source = tiny_export("llama", layers=4)
    bundle = Bundle.open(path)
    ids = source.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True,
                                               add_generation_prompt=True)
    ref = reference_run(source.model, ids, 5).tokens
    units = bundle.num_units
    base = Profile(bundle.bundle_id, 0, len(ids), 0, (2.0,) * units, (2.0,) * units)  # 2 ms per unit here
    async with SlowDevice(path, None, device_factor=3.0, base_profile=base) as client:
        async for _ in client.generate_ids(ids, max_new_tokens=6, ignore_eos=True):
            pass
        assert client.last_stats.new_ids == ref
        assert client.slept_s > 0
    # Sleeping guarantees a lower bound: six steps (the prefill and 5 decodes) of 3 x 2 ms per unit.
    assert client.last_stats.seconds >= 6 * units * 6.0 / 1e3


async def test_a_phantom_device_takes_its_profiled_time_and_only_the_shapes_of_a_run(tiny_export):
    """PhantomDevice (server load tests): no compute, its profile's time asleep, outputs of the
    right shape and a KV cache grown by the positions it stood in for."""
    import numpy as np

    from splitllm.model.runtime import KVCache
    from splitllm.testing import PhantomDevice

    path, _ = tiny_export("llama", layers=4)
    bundle = Bundle.open(path)
    units = bundle.num_units
    profile = Profile(bundle.bundle_id, 1, 8, 16, (1.0,) * units, (5.0,) * units)
    device = PhantomDevice(bundle, profile)
    cache = KVCache(bundle.shapes)
    began = time.perf_counter()
    hidden = device.run_sync(0, 3, np.zeros((1, 1), dtype=np.int64), cache, 0)
    assert time.perf_counter() - began >= 3 * 5.0 / 1e3  # three units x 5 ms (decode profile)
    assert hidden.shape == (1, 1, bundle.shapes.hidden_size) and not hidden.any()
    assert [cache.length(u) for u in (1, 2)] == [1, 1]
    logits = device.run_sync(3, units, np.zeros((1, 4, bundle.shapes.hidden_size), np.float32), cache, 1,
                             all_logits=True)
    assert logits.shape == (1, 4, bundle.shapes.vocab_size)
    assert device.slept_s == pytest.approx((3 * 5.0 + (units - 3) * profile.scaled_prefill_ms(4)[3]) / 1e3)
    with pytest.raises(ConfigError, match="units"):
        PhantomDevice(bundle, Profile(bundle.bundle_id, 1, 8, 16, (1.0,), (1.0,)))
