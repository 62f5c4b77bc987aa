"""Bad input gets a clear error naming the problem; the server keeps serving everyone else."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import aiohttp
import numpy as np
import pytest
from helpers import chat_ids, free_port

from splitllm import codec as codecs
from splitllm import errors
from splitllm.client import SplitClient
from splitllm.model.bundle import Bundle
from splitllm.protocol import wire
from splitllm_export.validate.splits import reference_run


def _ids(source, text: str = "Tell me a story.") -> list[int]:
    return chat_ids(source, text)



async def test_server_down_names_the_url(tiny_export):
    path, _ = tiny_export("llama", layers=3)
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(errors.ServerUnavailable, match=url.replace(".", r"\.")):
        async with SplitClient(path, url, split=1):
            pass


async def test_token_is_required_and_checked(tiny_export, start_server):
    path, source = tiny_export("llama", layers=3)
    server = await start_server(path, token="s3cret")
    with pytest.raises(errors.AuthError):
        async with SplitClient(path, server.url, token="wrong", split=1):
            pass
    with pytest.raises(errors.AuthError):
        async with SplitClient(path, server.url, split=1):
            pass
    async with aiohttp.ClientSession() as http:
        async with http.get(server.url + "/metrics") as r:
            assert r.status == 401
        async with http.get(server.url + "/metrics", headers={"Authorization": "Bearer s3cret"}) as r:
            assert r.status == 200
    async with SplitClient(path, server.url, token="s3cret", split=1) as client:
        async for _ in client.generate_ids(_ids(source), max_new_tokens=3):
            pass
        assert client.last_stats.new_tokens >= 1


async def test_bundle_mismatch_fails_the_handshake_on_both_sides(tiny_export, start_server):
    server_path, _ = tiny_export("llama", layers=3, seed=0)
    client_path, _ = tiny_export("llama", layers=3, seed=1)
    server = await start_server(server_path)
    with pytest.raises(errors.BundleMismatch, match="differs"):
        async with SplitClient(client_path, server.url, split=1):
            pass
    assert server.state.metrics.errors["bundle_mismatch"] == 1


async def test_unknown_codec_lists_the_known_ones(tiny_export):
    path, _ = tiny_export("llama", layers=3)
    with pytest.raises(errors.UnknownCodec, match="int8-block64"):
        SplitClient(path, "http://127.0.0.1:1", codec="nope")


async def test_too_long_prompt_fails_before_any_work(tiny_export, start_server):
    path, _ = tiny_export("llama", layers=3)
    server = await start_server(path, max_context=64)
    async with SplitClient(path, server.url, split=1) as client:
        requests_before = client.link.requests
        with pytest.raises(errors.ContextTooLong, match="64"):
            async for _ in client.generate_ids(list(range(10, 70)), max_new_tokens=10):
                pass
        assert client.link.requests == requests_before
    assert server.state.engine.runs == 0


async def _raw_session(url: str, bundle: Bundle):
    http = aiohttp.ClientSession()
    ws = await http.ws_connect(url.replace("http", "ws") + "/v1/session")
    await ws.send_bytes(wire.pack(wire.Hello(bundle_id=bundle.bundle_id, codec="fp32", client_name="raw",
                                             session_id="", token="")))
    welcome = wire.unpack((await ws.receive()).data)
    assert isinstance(welcome, wire.Welcome)
    return http, ws


async def _ask(ws, data: bytes):
    await ws.send_bytes(data)
    return wire.unpack((await ws.receive(timeout=30)).data)


async def test_malformed_frames_get_error_frames_and_others_are_unaffected(tiny_export, start_server):
    path, source = tiny_export("llama", layers=3)
    bundle = Bundle.open(path)
    server = await start_server(path)
    ids = _ids(source)
    ref = reference_run(source.model, ids, 23).tokens

    async def good_client():
        async with SplitClient(path, server.url, split=1, codec="fp32") as client:
            async for _ in client.generate_ids(ids, max_new_tokens=24, ignore_eos=True):
                await asyncio.sleep(0.005)  # let the attacker's frames interleave
            return client.last_stats.new_ids

    async def attacker():
        http, ws = await _raw_session(server.url, bundle)
        hidden = codecs.encode(np.zeros((1, 2, bundle.shapes.hidden_size), np.float32), "fp32")
        run = dict(seq=7, start=2, end=bundle.num_units, past_len=0, n_tokens=2, payload=hidden, want="token",
                   temperature=0.0, top_p=1.0, top_k=0, seed=0, codec="fp32")
        cases = {
            b"\x00garbage": "bad_frame",
            wire.pack(wire.Ping(seq=1, sent_ms=0.0, pad=b""))[:-3]: "bad_frame",
            b"\x82\xa1v\x63\xa1t\xa3run": "version_mismatch",
            wire.pack(wire.Run(**{**run, "n_tokens": 3})): "bad_frame",  # shape (1,2,H) vs 3 tokens
            wire.pack(wire.Run(**{**run, "start": 0, "payload": np.array([1, 10**6], "<i4").tobytes()})):
                "invalid_token",
            wire.pack(wire.Run(**{**run, "past_len": 5})): "session_state",
            wire.pack(wire.Run(**{**run, "end": bundle.num_units + 3})): "bad_frame",
            wire.pack(wire.Run(**{**run, "payload": b"SLA1" + b"\x00" * 40})): "codec",
        }
        got = {}
        for data, code in cases.items():
            reply = await _ask(ws, data)
            assert isinstance(reply, wire.Error), reply
            assert not reply.fatal
            got[code] = reply.code
        # After all that the attacker's own session still works.
        reply = await _ask(ws, wire.pack(wire.Run(**run)))
        assert isinstance(reply, wire.Result) and reply.token >= 0
        await ws.close()
        await http.close()
        return got

    tokens, got = await asyncio.gather(good_client(), attacker())
    assert tokens == ref
    assert {code: code for code in got} == got
    assert server.state.metrics.errors["bad_frame"] >= 3


async def test_frames_before_hello_and_oversized_frames_are_refused(tiny_export, start_server):
    path, _ = tiny_export("llama", layers=3)
    server = await start_server(path, max_frame_bytes=8192)
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(server.url.replace("http", "ws") + "/v1/session")
        reply = await _ask(ws, wire.pack(wire.Ping(seq=1, sent_ms=0.0, pad=b"")))
        assert isinstance(reply, wire.Error) and reply.fatal and "Hello" in reply.message
        ws2 = await http.ws_connect(server.url.replace("http", "ws") + "/v1/session")
        await ws2.send_bytes(wire.pack(wire.Ping(seq=1, sent_ms=0.0, pad=b"x" * 100_000)))
        msg = await ws2.receive(timeout=30)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.BINARY)
        if msg.type == aiohttp.WSMsgType.BINARY:
            assert isinstance(wire.unpack(msg.data), wire.Error)
        async with http.get(server.url + "/healthz") as r:
            assert r.status == 200


def test_server_and_generate_cli(tiny_export):
    path, source = tiny_export("gpt2", layers=3)
    proc = subprocess.Popen([sys.executable, "-m", "splitllm_server.cli", "--bundle", str(path), "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:"), line
        url = line.split()[-1]
        r = subprocess.run(
            [sys.executable, "-m", "splitllm.cli", "generate", "--bundle", str(path), "--server", url,
             "--split", "2", "--codec", "fp32", "--max-new-tokens", "6", "--json", "Hello there"],
            capture_output=True, text=True, timeout=120,
        )
        assert r.returncode == 0, r.stderr
        result = json.loads(r.stdout.strip().splitlines()[-1])
        assert result["split"] == 2 and len(result["new_ids"]) >= 1 and result["tokens_per_s"] > 0
        assert isinstance(result["text"], str)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    r = subprocess.run([sys.executable, "-m", "splitllm_server.cli", "--bundle", "/nonexistent/b"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "no bundle directory" in r.stderr and "Traceback" not in r.stderr


async def test_no_websocket_compression_is_negotiated(tiny_export, start_server):
    """A client offering permessage-deflate gets none (no inflating on the server's event loop, no
    small frame that inflates to a large one), and the SDK does not offer it."""
    path, _ = tiny_export("llama", layers=3)
    server = await start_server(path)
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(server.url.replace("http", "ws") + "/v1/session", compress=15)
        assert ws.compress == 0
        await ws.close()
    async with SplitClient(path, server.url, split=1) as client:
        await client.connect()
        assert client.remote.ws.compress == 0
