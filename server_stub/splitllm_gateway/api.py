"""The OpenAI shapes of the gateway: request validation and the field policy, error mapping,
reply and stream-chunk bodies.

Every field of a request is in one of three lists. **Handled** fields do what OpenAI documents.
**Harmless** fields (``IGNORED_FIELDS``) are accepted and ignored because ignoring them cannot
change the reply: bookkeeping (``user``, ``metadata``, ``store``, ...), caching or latency hints,
``model`` (one model is served). **Off-only** fields (``OFF_FIELDS``) name features the gateway
does not have; they are accepted only when they ask for nothing (absent, null, false, 0, empty,
or the value listed). Any other field is refused with a 400 naming it, so a caller never gets a
reply that silently differs from what it asked for.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Any

from splitllm import GenerationStats, errors

log = logging.getLogger("splitllm_gateway")

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_MAX_STOP = 4  # OpenAI's limit on stop sequences
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # GenerationStats.stop_reason -> OpenAI's
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions

# Accepted and ignored: none of them can change the generated text.
IGNORED_FIELDS = frozenset({
    "model", "user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier",
    "prediction", "parallel_tool_calls",
})
# Features this gateway lacks: accepted only when they ask for nothing (or for the allowed values).
OFF_FIELDS: dict[str, tuple[Any, ...]] = {
    "tools": (), "functions": (), "logit_bias": (), "logprobs": (), "top_logprobs": (),
    "presence_penalty": (), "frequency_penalty": (), "audio": (), "web_search_options": (),
    "reasoning_effort": (), "tool_choice": ("none", "auto"), "function_call": ("none", "auto"),
    "modalities": (["text"],), "response_format": ({"type": "text"},),
}
CHAT_FIELDS = frozenset({"messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
                         "seed", "stop", "stream", "stream_options", "n"})
COMPLETION_FIELDS = frozenset({"prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
                               "stream_options", "n", "best_of", "echo", "suffix"})
_COMPLETION_OFF = frozenset({"logit_bias", "logprobs", "presence_penalty", "frequency_penalty"})


class RequestError(Exception):
    """An HTTP-level failure of the gateway, rendered as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}


def map_error(exc: Exception) -> RequestError:
    """The HTTP status and OpenAI error for any failure of a request (the gateway's edge)."""
    if isinstance(exc, RequestError):
        return exc
    if not isinstance(exc, errors.SplitLLMError):
        log.error("unexpected failure of a request", exc_info=exc)
        return RequestError(500, "internal gateway error (see the gateway's log)", type_="server_error")
    if isinstance(exc, errors.ContextTooLong):
        return RequestError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, (errors.ConfigError, errors.GenerationError)):
        return RequestError(400, str(exc), code=exc.code)
    if isinstance(exc, (errors.ServerUnavailable, errors.LimitExceeded)):
        return RequestError(503, f"the split server is unavailable: {exc}", code=exc.code, type_="server_error")
    if isinstance(exc, errors.AuthError):
        return RequestError(502, f"the split server refused the gateway's token: {exc}", code=exc.code,
                            type_="server_error")
    if isinstance(exc, (errors.ServerError, errors.ProtocolError)):
        return RequestError(502, f"the split server failed: {exc}", code=exc.code, type_="server_error")
    return RequestError(500, f"the gateway failed: {exc}", code=exc.code, type_="server_error")


@dataclass(frozen=True)
class GenRequest:
    """A validated chat (``messages``) or text completion (``prompt`` / ``prompt_ids``) request."""

    kind: str  # "chat" or "text"
    messages: list[dict[str, str]] | None
    prompt: str | None
    prompt_ids: list[int] | None
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def bad(message: str, param: str | None = None) -> RequestError:
    return RequestError(400, message, param=param)


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise bad(f"'{key}' must be a number in [{lo:g}, {hi:g}], got {value!r}", key)
    return float(value)


def _integer(body: dict[str, Any], key: str, lo: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise bad(f"'{key}' must be an integer >= {lo}, got {value!r}", key)
    return value


def _content_text(content: object, where: str) -> str:
    """A message's text: a string, or the concatenated ``{"type": "text"}`` parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad(f"{where}: only text content parts are supported", where)
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"{where} must be a string or a list of text parts", where)


def _messages(raw: object) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise bad("'messages' must be a non-empty array", "messages")
    out = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(f"{where} must be an object", where)
        role = message.get("role")
        if role == "tool" or message.get("tool_calls") or message.get("function_call"):
            raise bad(f"{where}: tool and function calls are not supported by this gateway", where)
        if not isinstance(role, str) or role not in _ROLES:
            raise bad(f"{where}.role must be one of {sorted(_ROLES)}, got {role!r}", f"{where}.role")
        content = message.get("content")
        text = "" if content is None and role == "assistant" else _content_text(content, f"{where}.content")
        out.append({"role": _ROLES[role], "content": text})
    return out


def _check_fields(body: dict[str, Any], handled: frozenset[str], off: frozenset[str]) -> None:
    """Refuse unknown fields and features asked for that this gateway lacks (see the module doc)."""
    for key, value in body.items():
        if key in handled or key in IGNORED_FIELDS:
            continue
        if key not in off:
            raise bad(f"unknown or unsupported field '{key}' (this gateway refuses fields it would otherwise "
                      "ignore; see docs/gateway.md)", key)
        if value in (None, False, 0, "", [], {}) or value in OFF_FIELDS[key]:
            continue
        raise bad(f"'{key}' is not supported by this gateway", key)


def _common(body: dict[str, Any], kind: str, **prompt: Any) -> GenRequest:
    if (n := _integer(body, "n", 1)) not in (None, 1):
        raise bad(f"'n' must be 1 (one choice per request), got {n}", "n")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stops, list) or len(stops) > _MAX_STOP or not all(isinstance(s, str) for s in stops):
        raise bad(f"'stop' must be a string or an array of at most {_MAX_STOP} strings", "stop")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise bad("'stream' must be a boolean", "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise bad("'stream_options' is only allowed (as an object) when 'stream' is true", "stream_options")
    if kind == "chat":
        max_tokens = _integer(body, "max_completion_tokens", 1) or _integer(body, "max_tokens", 1)
    else:
        max_tokens = _integer(body, "max_tokens", 1) or DEFAULT_COMPLETION_TOKENS
    seed = _integer(body, "seed", -(2**63))
    return GenRequest(
        kind=kind, max_tokens=max_tokens, **prompt,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),  # OpenAI's default: sampling at 1
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        top_k=_integer(body, "top_k", 0) or 0,  # an extension (vLLM's), 0 = off
        seed=secrets.randbits(63) if seed is None else seed % 2**63,  # OpenAI seeds are signed int64
        stop=tuple(stops), stream=stream, include_usage=bool((options or {}).get("include_usage")),
    )


def parse_chat(body: object) -> GenRequest:
    """Validate a chat completion request body; unsupported features are refused, not ignored."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    messages = _messages(body.get("messages"))
    _check_fields(body, CHAT_FIELDS, frozenset(OFF_FIELDS))
    return _common(body, "chat", messages=messages, prompt=None, prompt_ids=None)


def parse_completion(body: object) -> GenRequest:
    """Validate a (legacy) text completion request: one prompt, a string or token ids."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    _check_fields(body, COMPLETION_FIELDS, _COMPLETION_OFF)
    raw = body.get("prompt")
    if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], (str, list)):
        raw = raw[0]  # a batch of one prompt
    text, ids = None, None
    if isinstance(raw, str) and raw:
        text = raw
    elif isinstance(raw, list) and raw and all(isinstance(t, int) and not isinstance(t, bool) for t in raw):
        ids = list(raw)
    else:
        raise bad("'prompt' must be a non-empty string or token-id array (one prompt per request)", "prompt")
    if (best_of := _integer(body, "best_of", 1)) not in (None, 1):
        raise bad(f"'best_of' must be 1, got {best_of}", "best_of")
    if body.get("echo"):
        raise bad("'echo' is not supported by this gateway", "echo")
    if body.get("suffix"):
        raise bad("'suffix' (insertion) is not supported by this gateway", "suffix")
    return _common(body, "text", messages=None, prompt=text, prompt_ids=ids)


def usage(stats: GenerationStats) -> dict[str, int]:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.new_tokens,
            "total_tokens": stats.prompt_tokens + stats.new_tokens}


class Shape:
    """How replies of one endpoint look: chat (messages, deltas) or text completion (text)."""

    def __init__(self, req: GenRequest, head: dict[str, Any]) -> None:
        self.chat = req.kind == "chat"
        self.head = head
        self.extra = {"usage": None} if req.include_usage else {}
        self.object = "chat.completion" if self.chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if self.chat else "text_completion"

    def reply(self, text: str, finish: str, usage: dict[str, int]) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {**self.head, "object": self.object, "choices": [choice], "usage": usage}

    def chunk(self, text: str | None, finish: str | None = None) -> dict[str, Any]:
        """A streamed piece; ``text=None`` with the chat shape is the opening role delta."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if text is None else {"content": text} if text else {}
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return {**self.head, "object": self.chunk_object, **self.extra, "choices": [choice]}

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self.head, "object": self.chunk_object, "choices": [], "usage": usage}
