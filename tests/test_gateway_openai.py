"""The gateway's OpenAI surface: replies validate against the `openai` package's own types, the
completions and model endpoints, the field policy, 429 on a full gateway, SSE keep-alive, /metrics."""

from __future__ import annotations

import json

import aiohttp
import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from splitllm.client import SplitClient
from splitllm.model.bundle import Bundle
from splitllm_gateway.app import _GATEWAY

MESSAGES = [{"role": "user", "content": "Tell me about robots."}]
PROMPT = "Once upon a time"


@pytest.fixture
async def setup(tiny_export, start_server, start_gateway):
    path, _ = tiny_export("llama", layers=3)
    server = await start_server(path)
    url, app = await start_gateway(path, server.url)
    return path, server, url, app


def _api(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


async def _sse(http: aiohttp.ClientSession, url: str, body: dict) -> tuple[list[dict], str]:
    """POST a streaming request; the data events (JSON, without [DONE]) and the raw text."""
    async with http.post(url, json=body) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        raw = await r.text()
    events = [line[len("data: "):] for line in raw.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]], raw


async def test_chat_replies_and_chunks_validate_against_openai_types(setup):
    _, _, url, _ = setup
    body = {"model": "m", "messages": MESSAGES, "temperature": 0, "max_tokens": 12}
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/v1/chat/completions", json=body) as r:
            reply = ChatCompletion.model_validate(await r.json(), strict=False)
        chunks, _ = await _sse(http, url + "/v1/chat/completions",
                               {**body, "stream": True, "stream_options": {"include_usage": True}})
    parsed = [ChatCompletionChunk.model_validate(c) for c in chunks]
    assert reply.object == "chat.completion" and reply.choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].delta.content or "" for c in parsed if c.choices) == reply.choices[0].message.content
    assert parsed[-1].usage is not None and parsed[-1].usage.completion_tokens == reply.usage.completion_tokens


async def test_completions_equal_the_sdk_and_validate_streaming_and_not(setup):
    path, server, url, _ = setup
    bundle = Bundle.open(path, verify=False)
    async with SplitClient(path, server.url, split=1, codec="fp32") as client:
        ids = bundle.text.encode(PROMPT, add_special_tokens=True)
        expected = "".join([p.text async for p in client.generate_ids(ids, max_new_tokens=10)])
    body = {"model": "m", "prompt": PROMPT, "temperature": 0, "max_tokens": 10}
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/v1/completions", json=body) as r:
            reply = Completion.model_validate(await r.json())
        chunks, _ = await _sse(http, url + "/v1/completions",
                               {**body, "stream": True, "stream_options": {"include_usage": True}})
        async with http.post(url + "/v1/completions", json={**body, "prompt": [ids]}) as r:
            by_ids = Completion.model_validate(await r.json())
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert reply.choices[0].text == expected == by_ids.choices[0].text
    assert reply.usage.prompt_tokens == len(ids)
    parsed = [_completion_chunk(c) for c in chunks]
    assert "".join(c.choices[0].text for c in parsed if c.choices) == expected
    assert [c.choices[0].finish_reason for c in parsed if c.choices][-1] == reply.choices[0].finish_reason
    assert parsed[-1].choices == [] and parsed[-1].usage.total_tokens == reply.usage.total_tokens
    via_openai = await _api(url).completions.create(model="m", prompt=PROMPT, temperature=0, max_tokens=10)
    assert via_openai.choices[0].text == expected
    stream = await _api(url).completions.create(model="m", prompt=PROMPT, temperature=0, max_tokens=10, stream=True)
    assert "".join([c.choices[0].text async for c in stream if c.choices]) == expected


def _completion_chunk(chunk: dict) -> Completion:
    """Validate a streamed text completion chunk with the openai package's ``Completion`` type.

    OpenAI's API streams ``finish_reason: null`` until the last chunk, which that type (written for
    the whole reply) does not allow; the package builds stream chunks without validating. So an
    intermediate chunk must have null there and is validated with it filled in."""
    for choice in chunk["choices"]:
        if choice["finish_reason"] is None:
            choice["finish_reason"] = "length"
    return Completion.model_validate(chunk)


async def test_model_by_id(setup):
    path, _, url, _ = setup
    name = Bundle.open(path, verify=False).model_id
    model = await _api(url).models.retrieve(name)
    assert model.id == name and model.object == "model"
    with pytest.raises(openai.NotFoundError) as info:
        await _api(url).models.retrieve("gpt-4o")
    assert info.value.code == "model_not_found"


async def test_unknown_fields_are_refused_by_name_and_harmless_ones_ignored(setup):
    _, _, url, _ = setup
    api = _api(url)
    kw = {"model": "m", "messages": MESSAGES, "temperature": 0, "max_tokens": 3}
    with pytest.raises(openai.BadRequestError, match="'mirostat'") as info:
        await api.chat.completions.create(**kw, extra_body={"mirostat": 2})
    assert info.value.param == "mirostat"
    with pytest.raises(openai.BadRequestError, match="'presence_penalty' is not supported"):
        await api.chat.completions.create(**kw, presence_penalty=0.5)
    with pytest.raises(openai.BadRequestError, match="'echo'"):
        await api.completions.create(model="m", prompt=PROMPT, echo=True)
    with pytest.raises(openai.BadRequestError, match="'messages'") as info:
        await api.completions.create(model="m", prompt=PROMPT, extra_body={"messages": MESSAGES})
    plain = await api.chat.completions.create(**kw)
    ignored = await api.chat.completions.create(**kw, user="u1", metadata={"a": "b"}, store=False,
                                                presence_penalty=0, tool_choice="none", logprobs=False)
    assert ignored.choices[0].message.content == plain.choices[0].message.content


async def test_a_full_gateway_answers_429_with_retry_after(setup, tiny_export, start_server, start_gateway):
    path, server, _, _ = setup
    url, app = await start_gateway(path, server.url, queue_timeout_s=0.2)
    body = {"model": "m", "messages": MESSAGES, "max_tokens": 2}
    async with app[_GATEWAY].slot([]), aiohttp.ClientSession() as http:  # the only client is busy
        async with http.post(url + "/v1/chat/completions", json=body) as r:
            assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
            assert (await r.json())["error"]["code"] == "rate_limit_exceeded"
    with pytest.raises(openai.RateLimitError):
        async with app[_GATEWAY].slot([]):
            await _api(url).chat.completions.create(**body)
    assert (await _api(url).chat.completions.create(**body)).choices  # free again


async def test_a_slow_first_token_gets_keep_alive_comments(setup, start_gateway):
    path, server, _, _ = setup
    url, _ = await start_gateway(path, server.url, keepalive_s=0.001)
    body = {"model": "m", "messages": MESSAGES, "temperature": 0, "max_tokens": 4, "stream": True}
    async with aiohttp.ClientSession() as http:
        chunks, raw = await _sse(http, url + "/v1/chat/completions", body)
    assert raw.startswith(": keep-alive\n\n")
    assert [ChatCompletionChunk.model_validate(c) for c in chunks]
    stream = await _api(url).chat.completions.create(**body)  # the openai package skips the comments
    assert [c async for c in stream]


async def test_gateway_metrics(setup):
    from prometheus_client.parser import text_string_to_metric_families

    _, _, url, _ = setup
    await _api(url).chat.completions.create(model="m", messages=MESSAGES, max_tokens=2)
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as r:
        families = {f.name: f for f in text_string_to_metric_families(await r.text())}
    assert all(f.documentation for f in families.values())
    requests = {(s.labels["route"], s.labels["status"]): s.value for s in families["splitllm_gateway_requests"].samples
                if s.name.endswith("_total")}
    assert requests[("/v1/chat/completions", "200")] == 1
    assert "splitllm_gateway_ttft_seconds" in families and "process_cpu_seconds" in families
