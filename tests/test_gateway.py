"""The OpenAI-compatible gateway, driven by the real `openai` package, in front of a real split server."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import openai
import pytest
from aiohttp import web

from splitllm.client import SplitClient
from splitllm_gateway.app import create_gateway_app
from splitllm_gateway.cli import build_parser

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about robots."}]
SPLIT = 1
CODEC = "fp32"


@pytest.fixture
async def gateway(tiny_export, start_server, start_gateway):
    path, _ = tiny_export("llama", layers=3)
    server = await start_server(path)
    url, _ = await start_gateway(path, server.url)
    return path, server, url


def _openai(url: str, api_key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=30)


async def _direct(path, server_url: str, **kw) -> tuple[str, object]:
    """What SplitClient itself yields for MESSAGES, and its stats."""
    async with SplitClient(path, server_url, split=SPLIT, codec=CODEC) as client:
        text = "".join([p.text async for p in client.generate(MESSAGES, temperature=0.0, **kw)])
        return text, client.last_stats


async def test_models_lists_the_bundle_model(gateway):
    path, _, url = gateway
    models = await _openai(url).models.list()
    from splitllm.model.bundle import Bundle

    assert [m.id for m in models.data] == [Bundle.open(path, verify=False).model_id]


async def test_completion_equals_the_sdk_and_streaming_equals_the_completion(gateway):
    path, server, url = gateway
    expected, stats = await _direct(path, server.url, max_new_tokens=24)
    api = _openai(url)
    reply = await api.chat.completions.create(model="any", messages=MESSAGES, temperature=0, max_tokens=24)
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion" and reply.created > 0
    assert len(reply.choices) == 1
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == {"length": "length"}.get(stats.stop_reason, "stop")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (stats.prompt_tokens, stats.new_tokens)
    assert reply.usage.total_tokens == stats.prompt_tokens + stats.new_tokens

    stream = await api.chat.completions.create(model="any", messages=MESSAGES, temperature=0, max_tokens=24,
                                               stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [reply.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == reply.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


async def test_max_tokens_gives_length_and_stop_cuts_the_text(gateway):
    path, _, url = gateway
    api = _openai(url)
    reply = await api.chat.completions.create(model="m", messages=MESSAGES, temperature=0,
                                              max_completion_tokens=20)
    text = reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 20
    assert len(text) >= 8, "the tiny model should say something in 20 tokens"
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = await api.chat.completions.create(model="m", messages=MESSAGES, temperature=0, max_tokens=20,
                                            stop=["\u2603never", stop])
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    stream = await api.chat.completions.create(model="m", messages=MESSAGES, temperature=0, max_tokens=20,
                                               stop=stop, stream=True)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text[: text.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_seeded_sampling_is_reproducible(gateway):
    _, _, url = gateway
    api = _openai(url)
    kw = {"model": "m", "messages": MESSAGES, "temperature": 0.9, "top_p": 0.95, "max_tokens": 12}
    a = await api.chat.completions.create(seed=7, **kw)
    b = await api.chat.completions.create(seed=7, **kw)
    assert a.choices[0].message.content == b.choices[0].message.content



async def test_concurrent_requests_are_serialised_and_each_gets_its_own_reply(gateway):
    _, _, url = gateway
    api = _openai(url)
    prompts = [[{"role": "user", "content": f"Question number {i}?"}] for i in range(3)]

    async def ask(messages):
        reply = await api.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=10)
        return reply.choices[0].message.content

    alone = [await ask(m) for m in prompts]
    assert await asyncio.gather(*(ask(m) for m in reversed(prompts))) == alone[::-1]
    as_parts = [{"role": "user", "content": [{"type": "text", "text": "Question "}, {"type": "text", "text": "number 0?"}]}]
    assert await ask(as_parts) == alone[0]

async def test_bad_requests_get_400_in_openai_shape(gateway):
    _, _, url = gateway
    api = _openai(url)
    with pytest.raises(openai.BadRequestError, match="'n' must be 1") as info:
        await api.chat.completions.create(model="m", messages=MESSAGES, n=2)
    assert info.value.body["param"] == "n" and info.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="role must be one of"):
        await api.chat.completions.create(model="m", messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="context") as info:
        await api.chat.completions.create(model="m", messages=[{"role": "user", "content": "robot " * 2000}],
                                          max_tokens=4, stream=True)
    assert info.value.code == "context_length_exceeded"
    async with aiohttp.ClientSession() as http:
        for body in (b"{not json", b"[]", b'{"model": "m"}'):
            async with http.post(url + "/v1/chat/completions", data=body) as resp:
                assert resp.status == 400
                error = (await resp.json())["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["message"]
        async with http.get(url + "/v1/nope") as resp:
            assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"


async def test_api_key_is_required_when_set(tiny_export, start_server, start_gateway):
    path, _ = tiny_export("llama", layers=3)
    server = await start_server(path)
    url, _ = await start_gateway(path, server.url, api_key="sesame")
    with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
        await _openai(url, "wrong").models.list()
    async with aiohttp.ClientSession() as http, http.get(url + "/v1/models") as resp:
        assert resp.status == 401 and (await resp.json())["error"]["code"] == "invalid_api_key"
    assert len((await _openai(url, "sesame").models.list()).data) == 1


async def test_gateway_connects_lazily_reconnects_and_reports_503_when_the_server_is_down(tiny_export, start_gateway):
    from splitllm_server.app import create_app
    from splitllm_server.config import ServerConfig

    path, _ = tiny_export("llama", layers=3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def split_server() -> web.AppRunner:
        config = ServerConfig(bundle=path, host="127.0.0.1", port=port, allow_spinning=False, verify_bundle=False)
        runner = web.AppRunner(create_app(config))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner

    url, _ = await start_gateway(path, f"http://127.0.0.1:{port}")
    api = _openai(url)
    kw = {"model": "m", "messages": MESSAGES, "temperature": 0, "max_tokens": 6}
    with pytest.raises(openai.APIStatusError) as info:  # never started: the lazy connect fails
        await api.chat.completions.create(**kw)
    assert info.value.status_code == 503 and info.value.code == "server_unavailable"
    runner = await split_server()
    first = await api.chat.completions.create(**kw)
    await runner.cleanup()
    runner = await split_server()  # a new server on the same port: the request retries on a new session
    try:
        stream = await api.chat.completions.create(**kw, stream=True)
        again = "".join([c.choices[0].delta.content or "" async for c in stream])
    finally:
        await runner.cleanup()
    assert again == first.choices[0].message.content
    with pytest.raises(openai.APIStatusError) as info:  # was connected, now gone
        await api.chat.completions.create(**kw)
    assert info.value.status_code == 503

def test_cli_parser_of_splitllm_gateway():
    args = build_parser().parse_args(["--bundle", "b", "--server", "http://s", "--port", "0",
                                      "--split", "2", "--api-key", "k"])
    assert (args.port, args.split, args.api_key, args.host) == (0, 2, "k", "127.0.0.1")


def test_splitllm_serve_openai_says_where_the_gateway_went(capsys):
    from splitllm.cli import main as splitllm_main

    assert splitllm_main(["serve-openai", "--bundle", "b", "--server", "http://s"]) == 2
    assert "splitllm-gateway" in capsys.readouterr().err


async def test_concurrency_two_serves_two_conversations_at_once_and_a_next_turn_finds_its_kv(
    tiny_export, start_server, start_gateway
):
    from splitllm.errors import ConfigError
    from splitllm.model.bundle import Bundle

    path, _ = tiny_export("llama", layers=3)
    server = await start_server(path)
    url, _ = await start_gateway(path, server.url, concurrency=2)
    other = [{"role": "user", "content": "Name three colours."}]
    expected = {}
    for name, messages in (("robots", MESSAGES), ("colours", other)):
        async with SplitClient(path, server.url, split=SPLIT, codec=CODEC) as client:
            expected[name] = "".join([p.text async for p in client.generate(messages, max_new_tokens=24)])
    api = _openai(url)
    sessions, metrics = server.state.sessions, server.state.metrics
    opened = sessions.opened_total

    async def ask(messages) -> str:
        reply = await api.chat.completions.create(model="any", messages=messages, temperature=0, max_tokens=24)
        return reply.choices[0].message.content

    robots, colours = await asyncio.gather(ask(MESSAGES), ask(other))
    assert (robots, colours) == (expected["robots"], expected["colours"])  # greedy: as if each ran alone
    assert sessions.opened_total - opened == 2  # one server session per gateway client
    # The next turn of the robots conversation goes to the client holding its KV: only the
    # positions after the first prompt reach the server.
    turn = [*MESSAGES, {"role": "assistant", "content": robots}, {"role": "user", "content": "And then?"}]
    text = Bundle.open(path, verify=False).text
    before = metrics.tokens_in
    await ask(turn)
    assert metrics.tokens_in - before <= len(text.encode_chat(turn)) - len(text.encode_chat(MESSAGES))
    with pytest.raises(ConfigError, match="concurrency"):
        create_gateway_app(path, server.url, concurrency=0)
