"""Operating a server: open health and readiness probes, the hardening limits, graceful drain."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import numpy as np
import pytest
from helpers import until

from splitllm import codec as codecs
from splitllm.model.bundle import Bundle
from splitllm.protocol import wire
from splitllm_server.app import CONNECTIONS, PER_ADDRESS, drain
from splitllm_server.handler import DRAIN_REASON


def _ws_url(url: str) -> str:
    return url.replace("http", "ws") + "/v1/session"


def _hello(bundle: Bundle, token: str = "") -> bytes:
    return wire.pack(wire.Hello(bundle_id=bundle.bundle_id, codec="fp32", client_name="ops-test",
                                session_id="", token=token))


async def _until_ready(http: aiohttp.ClientSession, url: str) -> None:
    for _ in range(600):
        async with http.get(url + "/readyz") as r:
            if r.status == 200:
                return
        await asyncio.sleep(0.05)
    raise AssertionError("the server never became ready")


async def test_probes_are_open_and_everything_else_needs_the_token(tiny_export, start_server):
    path, _ = tiny_export("llama", layers=3)
    server = await start_server(path, token="s3cret")
    auth = {"Authorization": "Bearer s3cret"}
    async with aiohttp.ClientSession() as http:
        await _until_ready(http, server.url)
        async with http.get(server.url + "/healthz") as r:
            assert r.status == 200
            assert await r.json() == {"status": "ok", "ready": True, "draining": False}  # no details
        async with http.get(server.url + "/healthz", headers=auth) as r:
            assert (await r.json())["model"] == Bundle.open(path, verify=False).model_id
        for method, route in (("GET", "/metrics"), ("GET", "/v1/manifest"), ("POST", "/v1/plan")):
            async with http.request(method, server.url + route, json={}) as r:
                assert r.status == 401, route
            async with http.request(method, server.url + route, json={}, headers=auth) as r:
                assert r.status != 401, route
        ws = await http.ws_connect(_ws_url(server.url))  # the upgrade is allowed; the Hello must carry it
        await ws.send_bytes(_hello(Bundle.open(path, verify=False), token="wrong"))
        reply = wire.unpack((await ws.receive(timeout=30)).data)
        assert isinstance(reply, wire.Error) and reply.code == "unauthorized" and reply.fatal
        await ws.close()


async def test_a_socket_without_hello_is_closed_at_the_handshake_deadline(tiny_export, start_server):
    path, _ = tiny_export("llama", layers=3)
    server = await start_server(path, handshake_timeout_s=0.3)
    bundle = Bundle.open(path, verify=False)
    async with aiohttp.ClientSession() as http:
        silent = await http.ws_connect(_ws_url(server.url))
        greeted = await http.ws_connect(_ws_url(server.url))
        await greeted.send_bytes(_hello(bundle))
        assert isinstance(wire.unpack((await greeted.receive(timeout=30)).data), wire.Welcome)
        # The server armed the greeted socket's deadline before this Welcome was sent.
        greeted_deadline = time.monotonic() + 0.3
        close = wire.unpack((await silent.receive(timeout=30)).data)
        assert isinstance(close, wire.Close) and "no valid Hello within 0.3 s" in close.reason
        end = await silent.receive(timeout=30)
        assert end.type == aiohttp.WSMsgType.CLOSE and end.data == aiohttp.WSCloseCode.POLICY_VIOLATION
        # The greeted connection outlives its own deadline and still answers.
        await until(lambda: time.monotonic() > greeted_deadline, what="the greeted socket's deadline")
        await greeted.send_bytes(wire.pack(wire.Ping(seq=1, sent_ms=0.0, pad=b"")))
        assert isinstance(wire.unpack((await greeted.receive(timeout=30)).data), wire.Pong)
        await greeted.close()
    assert server.state.metrics.errors["handshake_timeout"] == 1


async def test_open_connections_per_address_are_capped(tiny_export, start_server):
    path, _ = tiny_export("llama", layers=3)
    server = await start_server(path, max_conns_per_addr=2)
    async with aiohttp.ClientSession() as http:
        first = await http.ws_connect(_ws_url(server.url))
        second = await http.ws_connect(_ws_url(server.url))
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(_ws_url(server.url))
        assert refused.value.status == 429
        await first.close()
        for _ in range(100):  # the server counts the close once its handler has returned
            if server.app[PER_ADDRESS].get("127.0.0.1", 0) < 2:
                break
            await asyncio.sleep(0.02)
        third = await http.ws_connect(_ws_url(server.url))  # a freed place is usable again
        await third.close()
        await second.close()
    assert server.state.metrics.errors["too_many_connections"] == 1


async def test_forwarded_address_counts_only_from_a_trusted_proxy(tiny_export, start_server):
    path, _ = tiny_export("llama", layers=3)
    server = await start_server(path, max_conns_per_addr=1, trusted_proxies=("127.0.0.1",))
    async with aiohttp.ClientSession() as http:
        a = await http.ws_connect(_ws_url(server.url), headers={"X-Forwarded-For": "10.0.0.1"})
        b = await http.ws_connect(_ws_url(server.url), headers={"X-Forwarded-For": "10.0.0.2"})
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(_ws_url(server.url), headers={"X-Forwarded-For": "spoof, 10.0.0.1"})
        assert refused.value.status == 429
        await a.close()
        await b.close()


async def test_drain_finishes_the_step_in_flight_then_says_reconnect(tiny_export, start_server):
    path, _ = tiny_export("llama", layers=3)
    bundle = Bundle.open(path, verify=False)
    server = await start_server(path)
    hidden = codecs.encode(np.ones((1, 4, bundle.shapes.hidden_size), np.float32), "fp32")
    run = wire.Run(seq=1, start=2, end=bundle.num_units, past_len=0, n_tokens=4, payload=hidden, want="token",
                   temperature=0.0, top_p=1.0, top_k=0, seed=0, codec="fp32")
    async with aiohttp.ClientSession() as http:
        await _until_ready(http, server.url)
        busy = await http.ws_connect(_ws_url(server.url))
        idle = await http.ws_connect(_ws_url(server.url))
        for ws in (busy, idle):
            await ws.send_bytes(_hello(bundle))
            assert isinstance(wire.unpack((await ws.receive(timeout=30)).data), wire.Welcome)
        await busy.send_bytes(wire.pack(run))
        while not any(conn.busy for conn in server.app[CONNECTIONS]):
            await asyncio.sleep(0)
        drained = asyncio.create_task(drain(server.app, timeout_s=30))
        await asyncio.sleep(0)
        async with http.get(server.url + "/readyz") as r:
            assert r.status == 503 and (await r.json())["status"] == "draining"
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(_ws_url(server.url))
        assert refused.value.status == 503
        result = wire.unpack((await busy.receive(timeout=30)).data)
        assert isinstance(result, wire.Result) and result.seq == 1 and result.token >= 0  # the step finished
        for ws in (busy, idle):
            close = wire.unpack((await ws.receive(timeout=30)).data)
            assert isinstance(close, wire.Close) and close.reason == DRAIN_REASON
            end = await ws.receive(timeout=30)
            assert end.type == aiohttp.WSMsgType.CLOSE and end.data == aiohttp.WSCloseCode.SERVICE_RESTART
        assert await drained in (1, 2)  # the idle one, and the busy one unless it closed itself after its step
        async with http.get(server.url + "/healthz") as r:
            assert (await r.json())["draining"] is True
    assert len(server.state.sessions) == 0


async def test_metrics_have_help_units_histograms_and_process_series(tiny_export, start_server):
    from prometheus_client.parser import text_string_to_metric_families

    from splitllm.client import SplitClient

    path, _ = tiny_export("llama", layers=3)
    server = await start_server(path, token="t")
    # No speculation: the server counts one generated token per token request.
    async with SplitClient(path, server.url, token="t", split=1, codec="fp32", speculate="off") as client:
        async for _ in client.generate_ids([1, 2, 3, 4], max_new_tokens=5, ignore_eos=True):
            pass
    async with aiohttp.ClientSession() as http:
        async with http.get(server.url + "/metrics", headers={"Authorization": "Bearer t"}) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert all(f.documentation for f in families.values()), [n for n, f in families.items() if not f.documentation]
    samples = {s.name: s.value for f in families.values() for s in f.samples if not s.labels}
    assert samples["splitllm_tokens_generated_total"] == server.state.metrics.tokens_out == 5
    for name in ("splitllm_step_compute_seconds", "splitllm_queue_wait_seconds"):
        assert families[name].type == "histogram" and samples[name + "_count"] == server.state.engine.runs
    assert samples["splitllm_ttft_seconds_count"] == 1  # one prompt, answered with a token
    runs = samples["splitllm_batch_size_sequences_count"]
    assert runs >= 2  # the engine reports the rows of every run: the prompt's pieces and the step's
    assert samples["process_resident_memory_bytes"] > 0 and "process_cpu_seconds_total" in samples
    server.state.metrics.observe_batch(3)
    body = server.state.metrics.exposition().decode()
    assert f"splitllm_batch_size_sequences_count {runs + 1}" in body


async def test_providers_fall_back_to_cpu_with_a_warning_and_healthz_says_what_runs(tiny_export, start_server,
                                                                                      caplog):
    import onnxruntime as ort

    from splitllm.client import SplitClient
    from splitllm.model.runtime import PROVIDER_ALIASES

    available = ort.get_available_providers()
    missing = next(short for short in ("dml", "coreml", "nnapi", "cuda") if PROVIDER_ALIASES[short] not in available)
    path, _ = tiny_export("llama", layers=3)
    with caplog.at_level("WARNING", logger="splitllm.runtime"):
        server = await start_server(path, providers=(missing, "cpu"))
        async with SplitClient(path, server.url, split=1, codec="fp32", providers=(missing, "cpu")) as client:
            async for _ in client.generate_ids([1, 2, 3], max_new_tokens=2):
                pass
            assert client.providers_in_use == ["CPUExecutionProvider"]  # what the device really runs
    assert any("not available" in r.getMessage() for r in caplog.records)
    async with aiohttp.ClientSession() as http, http.get(server.url + "/healthz") as r:
        health = await r.json()
    assert health["providers_requested"] == [missing, "cpu"]
    assert health["providers"] == ["CPUExecutionProvider"]
    assert health["session_providers"] == ["CPUExecutionProvider"]


def test_make_session_takes_providers_in_order_and_refuses_unknown_names(tiny_export):
    import onnxruntime as ort

    from splitllm.errors import ConfigError
    from splitllm.model.runtime import RuntimeOptions, make_session, resolve_providers

    path, _ = tiny_export("llama", layers=3)
    bundle = Bundle.open(path, verify=False)
    session = make_session(bundle, 0, 2, options=RuntimeOptions(providers=("cpu",)))
    assert session.get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(ConfigError, match="unknown execution provider 'gpu'"):
        resolve_providers(["gpu"])
    assert resolve_providers(["CPUExecutionProvider", "cuda"])[-1] == "CPUExecutionProvider"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no CUDA provider here (needs onnxruntime-gpu and a GPU); the GPU check did not run")
    session = make_session(bundle, 0, 2, options=RuntimeOptions(providers=("cuda",)))
    assert session.get_providers()[0] == "CUDAExecutionProvider"


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 120):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_every_cli_has_version_and_the_server_help_shows_every_default():
    from splitllm import __version__

    for module in ("splitllm.cli", "splitllm_server.cli", "splitllm_gateway", "splitllm_export.cli"):
        r = _run("-m", module, "--version")
        assert r.returncode == 0 and __version__ in r.stdout, (module, r.stderr)
    from splitllm_server.cli import build_parser

    parser = build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest not in ("help", "version"):
            assert action.help, action.option_strings
    text = parser.format_help()
    for flag, default in (("--handshake-timeout", "5.0"), ("--max-conns-per-addr", "64"),
                          ("--drain-timeout", "30.0"), ("--max-sessions", "256"), ("--providers", "cpu")):
        assert flag in text and f"(default: {default})" in " ".join(text.split()), flag


def test_export_without_torch_names_the_extra_to_install(tmp_path):
    script = ("import sys; sys.modules['torch'] = None; from splitllm_export.cli import main; "
              f"sys.exit(main(['--tiny', 'llama', '-o', {str(tmp_path / 'b')!r}, '-q']))")
    r = _run("-c", script)
    assert r.returncode == 1, r.stderr
    assert "pip install 'splitllm[export]'" in r.stderr and "Traceback" not in r.stderr


def test_generate_takes_the_token_from_splitllm_token(tiny_export):
    import subprocess
    import sys

    path, _ = tiny_export("llama", layers=3)
    proc = subprocess.Popen([sys.executable, "-m", "splitllm_server.cli", "--bundle", str(path), "--port", "0",
                             "--no-verify", "--token", "envtok"], stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().split()[-1]
        args = ("-m", "splitllm.cli", "generate", "--bundle", str(path), "--server", url, "--split", "1",
                "--max-new-tokens", "2", "--json", "Hi")
        refused = _run(*args)
        assert refused.returncode == 1 and "token" in refused.stderr
        ok = _run(*args, env={"SPLITLLM_TOKEN": "envtok"})
        assert ok.returncode == 0, ok.stderr
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0  # SIGTERM drains, then exits cleanly


def test_log_format_json_prints_one_object_per_line():
    import json

    r = _run("-c", "import logging; from splitllm_server.logs import configure; configure('info', 'json'); "
                   "logging.getLogger('splitllm.server').info('hello %s', 'there')")
    entry = json.loads(r.stderr.strip().splitlines()[-1])
    assert entry["message"] == "hello there" and entry["level"] == "info" and entry["logger"] == "splitllm.server"


async def test_a_plan_frame_is_answered_on_the_session_like_post_v1_plan(tiny_export, start_server):
    import json

    from splitllm.planner.profile import measure

    path, _ = tiny_export("llama", layers=3)
    bundle = Bundle.open(path, verify=False)
    server = await start_server(path)
    body = {"client_profile": measure(bundle, repeats=1).to_dict(), "sla": {"ttft_ms": 1000, "token_ms": 100},
            "codec": "fp16", "uplink_bps": 10e6, "rtt_ms": 5}
    async with aiohttp.ClientSession() as http:
        async with http.post(server.url + "/v1/plan", json=body) as r:
            over_http = await r.json()
        ws = await http.ws_connect(_ws_url(server.url))
        await ws.send_bytes(_hello(bundle))
        assert isinstance(wire.unpack((await ws.receive(timeout=30)).data), wire.Welcome)
        await ws.send_bytes(wire.pack(wire.Plan(seq=5, request=json.dumps(body).encode())))
        reply = wire.unpack((await ws.receive(timeout=60)).data)
        assert isinstance(reply, wire.PlanResult) and reply.seq == 5
        over_ws = json.loads(reply.policy)
        assert over_ws["policy"] == over_http["policy"] and set(over_ws) == set(over_http)
        await ws.send_bytes(wire.pack(wire.Plan(seq=6, request=b"{nope")))
        error = wire.unpack((await ws.receive(timeout=30)).data)
        assert isinstance(error, wire.Error) and error.seq == 6 and not error.fatal and "JSON" in error.message
        await ws.close()
    assert server.state.metrics.plans == 2
