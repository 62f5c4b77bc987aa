"""Failover, limits, lifecycle and TLS, against real servers and sockets."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import sys
import time

import aiohttp
import pytest
from helpers import chat_ids, free_port, until

from splitllm import errors
from splitllm.client import SplitClient
from splitllm.model.bundle import Bundle
from splitllm.protocol import wire
from splitllm.testing.netem import ShapedLink
from splitllm_export.validate.splits import reference_run

TOKENS = 32



def _ids(source, text: str = "Tell me about rivers.") -> list[int]:
    return chat_ids(source, text)



def _spawn(path, port: int, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "splitllm_server.cli", "--bundle", str(path), "--port", str(port),
         "--no-spinning", *extra],
        stdout=subprocess.PIPE, text=True,
    )
    line = proc.stdout.readline()
    assert line.startswith("listening on "), line
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=30)


async def test_server_killed_mid_stream_is_replaced_and_the_text_is_identical(tiny_export):
    path, source = tiny_export("llama", layers=3)
    ids = _ids(source)
    ref = reference_run(source.model, ids, TOKENS - 1).tokens
    port = free_port()
    proc = _spawn(path, port)
    replacement = None
    try:
        async with SplitClient(path, f"http://127.0.0.1:{port}", split=1, codec="fp32",
                               failover_timeout_s=60, fallback_local=False) as client:
            got = 0
            async for _ in client.generate_ids(ids, max_new_tokens=TOKENS, ignore_eos=True):
                got += 1
                if got == 10:
                    _kill(proc)
                    replacement = await asyncio.to_thread(_spawn, path, port)
            assert client.last_stats.new_ids == ref
            assert client.failovers == 1
            assert not client.local
    finally:
        _kill(proc)
        if replacement is not None:
            _kill(replacement)


async def test_no_server_comes_back_then_the_device_carries_on_or_raises(tiny_export):
    path, source = tiny_export("llama", layers=3)
    ids = _ids(source)
    ref = reference_run(source.model, ids, TOKENS - 1).tokens
    for fallback in (True, False):
        port = free_port()
        proc = _spawn(path, port)
        try:
            async with SplitClient(path, f"http://127.0.0.1:{port}", split=2, codec="fp32",
                                   failover_timeout_s=1.0, fallback_local=fallback) as client:
                got = 0
                if fallback:
                    async for _ in client.generate_ids(ids, max_new_tokens=TOKENS, ignore_eos=True):
                        got += 1
                        if got == 5:
                            _kill(proc)
                    assert client.last_stats.new_ids == ref
                    assert client.local
                else:
                    with pytest.raises(errors.ServerUnavailable, match="did not come back"):
                        async for _ in client.generate_ids(ids, max_new_tokens=TOKENS, ignore_eos=True):
                            got += 1
                            if got == 5:
                                _kill(proc)
        finally:
            _kill(proc)


async def _hello(http, url, bundle: Bundle):
    ws = await http.ws_connect(url.replace("http", "ws", 1) + "/v1/session")
    await ws.send_bytes(wire.pack(wire.Hello(bundle_id=bundle.bundle_id, codec="fp32", client_name="t",
                                             session_id="", token="")))
    return ws, wire.unpack((await ws.receive(timeout=30)).data)


async def test_limits_answer_with_their_own_codes(tiny_export, start_server):
    path, source = tiny_export("llama", layers=3)
    bundle = Bundle.open(path)
    server = await start_server(path, max_frame_bytes=8192, max_sessions=2, max_new_tokens=5,
                                max_steps_per_s=50)
    async with aiohttp.ClientSession() as http:
        ws, welcome = await _hello(http, server.url, bundle)
        assert isinstance(welcome, wire.Welcome)
        await ws.send_bytes(wire.pack(wire.Ping(seq=1, sent_ms=0.0, pad=b"x" * 10_000)))
        reply = wire.unpack((await ws.receive(timeout=30)).data)
        assert (reply.code, reply.fatal) == ("frame_too_large", False)
        codes = set()
        for i in range(120):  # > 50 per second in a burst
            await ws.send_bytes(wire.pack(wire.Ping(seq=i, sent_ms=0.0, pad=b"")))
            reply = wire.unpack((await ws.receive(timeout=30)).data)
            if isinstance(reply, wire.Error):
                codes.add(reply.code)
        assert codes == {"rate_limited"}
        ws2, _ = await _hello(http, server.url, bundle)
        ws3, refused = await _hello(http, server.url, bundle)
        assert isinstance(refused, wire.Error) and refused.code == "too_many_sessions"
        for w in (ws, ws2, ws3):
            await w.close()
    # max_sessions=2: the client below needs the closed connections' sessions gone (each new
    # connection has its own full rate bucket).
    await until(lambda: len(server.state.sessions) == 0)
    async with SplitClient(path, server.url, split=1, codec="fp32") as client:
        with pytest.raises(errors.TooManyTokens):
            async for _ in client.generate_ids(_ids(source), max_new_tokens=20, ignore_eos=True):
                await asyncio.sleep(0.03)


async def test_idle_sessions_are_closed_with_a_reason_and_freed(tiny_export, start_server):
    path, source = tiny_export("llama", layers=3)
    server = await start_server(path, idle_ttl_s=0.3)
    async with SplitClient(path, server.url, split=1, codec="fp32", failover_timeout_s=0) as client:
        async for _ in client.generate_ids(_ids(source), max_new_tokens=3):
            pass
        assert server.state.sessions.kv_bytes() > 0
        # The reaper closes the connection, counts the eviction, then drops what is left, all in one turn.
        await until(lambda: server.state.sessions.evicted_total >= 1 and len(server.state.sessions) == 0)
        assert len(server.state.sessions) == 0
        assert server.state.sessions.kv_bytes() == 0
        assert server.state.sessions.evicted_total == 1
        await until(lambda: not client.remote.connected)
        assert "idle" in client.remote.closed_reason


async def test_an_idle_client_keeps_its_connection_through_heartbeats(tiny_export, start_server):
    """The client answers pings while idle between turns: no reconnect, no replay, same tokens."""
    path, source = tiny_export("llama", layers=3)
    server = await start_server(path, heartbeat_s=0.4)
    ids = _ids(source)
    async with SplitClient(path, local=True) as local:
        async for _ in local.generate_ids(ids, max_new_tokens=6, ignore_eos=True):
            pass
        reference = local.last_stats.new_ids
    # Through a plain (unshaped) proxy that counts bytes: while the client is idle, only
    # heartbeats cross it (a masked client frame is 6 bytes, a server frame 2), so the counters
    # say when several pings and pongs have passed.
    async with ShapedLink("127.0.0.1", int(server.url.rsplit(":", 1)[1])) as link:
        client = SplitClient(path, link.url, split=1, codec="fp32", failover_timeout_s=0)
        client.remote.heartbeat_s = 0.4
        async with client:
            async for _ in client.generate_ids(ids, max_new_tokens=3, ignore_eos=True):
                pass
            first = client.last_stats.new_ids
            ws = client.remote.ws
            up, down = link.counters.bytes_up, link.counters.bytes_down
            await until(lambda: link.counters.bytes_up >= up + 3 * 6 and link.counters.bytes_down >= down + 3 * 2,
                        what="three heartbeat exchanges while idle")
            assert client.remote.connected and client.remote.ws is ws
            async for _ in client.generate_ids(ids + first, max_new_tokens=3, ignore_eos=True):
                pass
            assert client.remote.ws is ws  # the same connection served the second turn
            assert first + client.last_stats.new_ids == reference
    assert server.state.sessions.opened_total == 1


async def test_a_thousand_open_close_cycles_leak_nothing(tiny_export, start_server):
    path, _ = tiny_export("llama", layers=3)
    bundle = Bundle.open(path)
    server = await start_server(path)
    async with aiohttp.ClientSession() as http:
        for _ in range(1000):
            ws, welcome = await _hello(http, server.url, bundle)
            assert isinstance(welcome, wire.Welcome)
            await ws.send_bytes(wire.pack(wire.Close(reason="bye")))
            await ws.close()
        await until(lambda: len(server.state.sessions) == 0)
        async with http.get(server.url + "/metrics") as r:
            text = await r.text()
    assert "splitllm_sessions_active 0" in text
    assert "splitllm_sessions_opened_total 1000" in text
    assert len(server.state.sessions) == 0


async def test_disconnect_frees_kv_and_shutdown_says_why(tiny_export, start_server):
    path, source = tiny_export("llama", layers=3)
    server = await start_server(path)
    async with SplitClient(path, server.url, split=1, codec="fp32") as client:
        async for _ in client.generate_ids(_ids(source), max_new_tokens=3):
            pass
        assert server.state.sessions.kv_bytes() > 0
    await until(lambda: server.state.sessions.kv_bytes() == 0)
    assert server.state.sessions.kv_bytes() == 0
    client = SplitClient(path, server.url, split=1, codec="fp32")
    await client.connect()
    await server.stop()
    await until(lambda: not client.remote.connected)
    assert client.remote.closed_reason == "server shutting down"
    await client.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
async def test_tls_with_a_self_signed_certificate(tiny_export, tmp_path):
    path, source = tiny_export("llama", layers=3)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    port = free_port()
    proc = _spawn(path, port, "--certfile", str(cert), "--keyfile", str(key), "--token", "t0k")
    try:
        url = f"https://127.0.0.1:{port}"
        trusted = ssl.create_default_context(cafile=str(cert))
        async with SplitClient(path, url, split=1, codec="fp32", token="t0k", ssl=trusted) as client:
            async for _ in client.generate_ids(_ids(source), max_new_tokens=4):
                pass
            assert client.last_stats.new_tokens >= 1
        started = time.monotonic()
        with pytest.raises(errors.ServerUnavailable):  # the system CAs do not trust a self-signed cert
            async with SplitClient(path, url, split=1, token="t0k", failover_timeout_s=0):
                pass
        assert time.monotonic() - started < 30
    finally:
        _kill(proc)


async def test_a_full_server_is_asked_again_with_backoff_until_a_session_frees(tiny_export, start_server):
    path, source = tiny_export("llama", layers=3)
    server = await start_server(path, max_sessions=1)
    first = SplitClient(path, server.url, split=1, codec="fp32")
    await first.connect()
    try:
        hasty = SplitClient(path, server.url, split=1, codec="fp32", failover_timeout_s=0.3)
        with pytest.raises(errors.TooManySessions):
            await hasty.connect()  # retried for 0.3 s, then the server's own refusal
        await hasty.close()
        patient = SplitClient(path, server.url, split=1, codec="fp32", failover_timeout_s=30)
        refused = server.state.metrics.errors.get("too_many_sessions", 0)
        waiting = asyncio.create_task(patient.connect())
        # Refused twice more by the full server, and still asking.
        await until(lambda: server.state.metrics.errors.get("too_many_sessions", 0) >= refused + 2,
                    what="two more refusals")
        assert not waiting.done()
        await first.close()
        await asyncio.wait_for(waiting, 30)
        assert await _generate_tokens(patient, _ids(source), 4) == reference_run(source.model, _ids(source), 3).tokens
        await patient.close()
    finally:
        await first.close()


async def _generate_tokens(client: SplitClient, ids, n: int) -> list[int]:
    async for _ in client.generate_ids(ids, max_new_tokens=n, ignore_eos=True):
        pass
    return client.last_stats.new_ids
