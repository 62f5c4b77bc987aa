"""The wire protocol: every message the client and the server exchange, defined once.

A frame is one binary WebSocket message holding one msgpack map::

    {"v": PROTOCOL_VERSION, "t": "<message type>", "<field>": <value>, ...}

Each message is a frozen dataclass whose fields are the wire keys. Fields are checked twice with the
same precompiled checkers: when a message is built in code (so a bug fails at its source, not on
the peer) and when :func:`unpack` reads a frame (so a hostile or buggy peer can never hand the
other side a malformed message). :func:`unpack` raises only :mod:`splitllm.errors` exceptions,
whatever the input. The full field reference is ``docs/protocol.md``.

Checkers come from each field's annotation plus an optional ``_Rule`` in the field metadata, built
once per class at import, because ``unpack`` sits on the per-token hot path.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NoReturn, TypeAlias, TypeVar, get_args, get_origin, get_type_hints

import msgpack

from splitllm.errors import FrameError, SplitLLMError, VersionMismatch, error_from_code

# fmt: off
__all__ = [
    "DEFAULT_MAX_FRAME_BYTES", "MESSAGE_TYPES", "PROTOCOL_VERSION", "Message", "error_frame", "pack",
    "raise_for_error", "unpack", "Ack", "Close", "Error", "Hello", "KVData", "KVGet", "KVPut", "Ping", "Plan",
    "PlanResult",
    "Pong", "Result", "Run", "Truncate", "Welcome",
]
# fmt: on

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024
INT32_MAX = 2**31 - 1
MAX_NAME_LEN = 256  # default cap (characters) of a str field: names, ids, codec names
MAX_TEXT_LEN = 4096  # human-readable text: error messages, close reasons
MAX_TOKEN_LEN = 8192  # auth tokens (JWTs can be long)
MAX_LIST_LEN = 4096  # default cap of a list field (one entry per unit at most)
# Strict decoding: text as str, only str (or bin) map keys, no ext types, every length bounded.
# fmt: off
_UNPACK_OPTIONS: dict[str, Any] = {
    "raw": False, "strict_map_key": True, "use_list": True, "max_ext_len": 0, "max_map_len": 64,
    "max_array_len": MAX_LIST_LEN, "max_str_len": 4 * MAX_TOKEN_LEN,  # UTF-8: <= 4 bytes a character
}
# fmt: on

_Check = Callable[[Any], Any]  # returns the value (floats given as int come back as float) or raises


@dataclass(frozen=True)
class _Rule:
    """Constraint of one field; ``None`` means the default of the field's type (see _build_check)."""

    lo: float | None = None  # smallest allowed number (ints and floats)
    hi: float | None = None  # largest allowed number
    lo_open: bool = False  # ``lo`` itself is not allowed
    max_len: int | None = None  # characters of a str, entries of a list, bytes of a bytes field
    choices: tuple[str, ...] = ()  # a str must be one of these
    pattern: str = ""  # a str must fully match this regex


def _f(**rule: Any) -> Any:
    """A dataclass field with a non-default constraint."""
    return dataclasses.field(metadata={"rule": _Rule(**rule)})


def _show(value: Any) -> str:
    """Short description of an offending value; never reprs a huge str/bytes/list in full."""
    if type(value) in (int, float):
        return repr(value)
    name = type(value).__name__
    if isinstance(value, (list, tuple, dict)):
        # Containers are never repr'd: a hostile frame can nest them deeply enough to make
        # repr raise RecursionError.
        return f"{name} of length {len(value)}"
    if isinstance(value, (str, bytes, bytearray)) and len(value) > 40:
        return f"{name} of length {len(value)}"
    return f"{name} {value!r}"


def _fail(where: str, want: str, value: Any) -> NoReturn:
    raise FrameError(f"{where} must be {want}, got {_show(value)}")


def _int_check(where: str, lo: int, hi: int) -> _Check:
    want = f"an int >= {lo} and <= {hi}"

    def check(v: Any) -> Any:
        if type(v) is not int or not lo <= v <= hi:  # type() is exact: bool is not an int here
            _fail(where, want, v)
        return v

    return check


def _float_check(where: str, lo: float, hi: float, lo_open: bool) -> _Check:
    want = f"a finite float {'>' if lo_open else '>='} {lo}" + ("" if hi == math.inf else f" and <= {hi}")

    def check(v: Any) -> Any:
        if type(v) is int and abs(v) <= 2**53:  # ints are valid floats (PEP 484), e.g. temperature=0
            v = float(v)
        if type(v) is not float or not math.isfinite(v) or not (lo < v <= hi if lo_open else lo <= v <= hi):
            _fail(where, want, v)
        return v

    return check


def _sized_check(where: str, tp: type, want: str, max_len: int, allowed: Callable[[Any], Any]) -> _Check:
    """str and bytes: the exact type, at most ``max_len`` long, and ``allowed(v)`` true."""

    def check(v: Any) -> Any:
        if type(v) is not tp or len(v) > max_len or not allowed(v):  # type: ignore[arg-type]  # exact type first
            _fail(where, want, v)
        return v

    return check


def _always(_: Any) -> bool:
    return True


def _bool_check(where: str) -> _Check:
    def check(v: Any) -> Any:
        if type(v) is not bool:
            _fail(where, "a bool", v)
        return v

    return check


def _list_check(where: str, item: _Check) -> _Check:
    def check(v: Any) -> Any:
        if type(v) is not list or len(v) > MAX_LIST_LEN:
            _fail(where, f"a list of at most {MAX_LIST_LEN} items", v)
        for x in v:
            item(x)
        return v

    return check


def _build_check(where: str, tp: Any, rule: _Rule) -> _Check:
    """Checker for one field. Defaults: ints in [0, 2**31), floats finite and >= 0."""
    lo, hi = rule.lo, rule.hi
    if tp is int:
        return _int_check(where, int(0 if lo is None else lo), int(INT32_MAX if hi is None else hi))
    if tp is float:
        return _float_check(where, 0.0 if lo is None else lo, math.inf if hi is None else hi, rule.lo_open)
    if tp is str:
        max_len = rule.max_len or MAX_NAME_LEN
        want, allowed = f"a str of at most {max_len} characters", _always
        if rule.choices:
            want, allowed = f"one of {list(rule.choices)}", frozenset(rule.choices).__contains__
        elif rule.pattern:
            want, allowed = f"a str matching {rule.pattern!r}", re.compile(rule.pattern).fullmatch
        return _sized_check(where, str, want, max_len, allowed)
    if tp is bytes:
        return _sized_check(
            where, bytes, "bytes", rule.max_len or 2**63, _always
        )  # the frame limit bounds it
    if tp is bool:
        return _bool_check(where)
    if get_origin(tp) is list:
        return _list_check(where, _build_check(f"{where} items", get_args(tp)[0], rule))
    raise TypeError(f"{where}: no wire checker for annotation {tp!r}")


class _Message:
    """Base of every message: validates all fields on construction, then cross-field rules."""

    TYPE: ClassVar[str]  # the frame's "t"
    _field_set: ClassVar[frozenset[str]]
    _checks: ClassVar[tuple[tuple[str, _Check], ...]]

    def __post_init__(self) -> None:
        # Works on __dict__ so unpack can reuse it on an instance filled without __init__, and
        # so a float given as int can be normalised in place despite frozen=True.
        values = self.__dict__
        for name, check in self._checks:
            value = values[name]
            checked = check(value)
            if checked is not value:
                values[name] = checked
        self._check_invariants()

    def _check_invariants(self) -> None:
        """Rules that span fields; raise FrameError. Overridden where a message has some."""


MESSAGE_TYPES: dict[str, type] = {}


_M = TypeVar("_M", bound=type)


def _message(tag: str) -> Callable[[_M], _M]:
    """Register a message dataclass as ``"t": tag`` and compile its field checkers.

    Applied on top of an explicit ``@dataclass(frozen=True)`` so type checkers see the dataclass.
    """

    def register(cls: _M) -> _M:
        hints = get_type_hints(cls)
        fields = dataclasses.fields(cls)
        cls.TYPE = tag
        cls._field_set = frozenset(f.name for f in fields)
        cls._checks = tuple(
            (f.name, _build_check(f"{cls.__name__}.{f.name}", hints[f.name], f.metadata.get("rule", _Rule())))
            for f in fields
        )
        MESSAGE_TYPES[tag] = cls
        return cls

    return register


@_message("hello")
@dataclass(frozen=True)
class Hello(_Message):
    """Client → server, the first frame of a connection.

    ``bundle_id`` is the SHA-256 hex of the bundle manifest (the server refuses a different bundle);
    ``session_id`` is empty for a new session or names one to resume; ``token`` duplicates the
    bearer token for clients that cannot set HTTP headers (the header wins when both are given).
    """

    bundle_id: str = _f(pattern=r"[0-9a-f]{64}")
    codec: str
    client_name: str
    session_id: str
    token: str = _f(max_len=MAX_TOKEN_LEN)


@_message("welcome")
@dataclass(frozen=True)
class Welcome(_Message):
    """Server → client, the answer to Hello.

    ``num_units`` = embeddings + decoder layers + head. ``kv_lens[u]`` is how many positions of
    unit ``u``'s KV the server holds (0 for none), so a resuming client knows what survived.
    """

    session_id: str
    server_name: str
    num_units: int = _f(lo=3)
    max_context: int = _f(lo=1)
    codecs: list[str] = _f(max_len=64)
    max_frame_bytes: int = _f(lo=1024)
    kv_lens: list[int]

    def _check_invariants(self) -> None:
        if len(self.kv_lens) != self.num_units:
            raise FrameError(
                f"Welcome.kv_lens has {len(self.kv_lens)} entries, num_units is {self.num_units}"
            )
        if self.kv_lens and max(self.kv_lens) > self.max_context:
            raise FrameError(f"Welcome.kv_lens has {max(self.kv_lens)} > max_context {self.max_context}")


@_message("run")
@dataclass(frozen=True)
class Run(_Message):
    """Client → server: run units [start, end) on ``n_tokens`` new positions.

    Unit 0 is the embeddings, 1..L the decoder layers, L+1 the head. ``past_len`` is the number of
    positions already in the KV of those units (the server checks it). ``payload`` is the codec's
    encoding of hidden states (1, n_tokens, H), or int32 little-endian token ids when start == 0.
    ``want`` picks the reply: hidden states, logits (both encoded with ``codec``) or a sampled token
    (temperature 0 = greedy; ``seed`` is mixed with the position so sampling is reproducible), or
    ``"tokens"``: the greedy token after *every* position, as int32 little-endian in the Result's
    payload (speculative verification; temperature must be 0).
    """

    seq: int
    start: int
    end: int = _f(lo=1)
    past_len: int
    n_tokens: int = _f(lo=1)
    payload: bytes
    want: str = _f(choices=("hidden", "token", "logits", "tokens"))
    temperature: float
    top_p: float = _f(lo=0.0, lo_open=True, hi=1.0)
    top_k: int
    seed: int = _f(hi=2**63 - 1)
    codec: str

    def _check_invariants(self) -> None:
        if self.start >= self.end:
            raise FrameError(f"Run needs start < end, got [{self.start}, {self.end})")
        if self.want == "tokens" and self.temperature != 0:
            raise FrameError("want='tokens' (speculative verification) is greedy: temperature must be 0")
        if self.start == 0 and len(self.payload) != 4 * self.n_tokens:
            raise FrameError(
                f"Run from unit 0 carries {self.n_tokens} int32 token ids = {4 * self.n_tokens} bytes, "
                f"got {len(self.payload)}"
            )


@_message("result")
@dataclass(frozen=True)
class Result(_Message):
    """Server → client, the answer to Run ``seq``: a ``token`` (-1 unless want == "token") or an
    encoded ``payload`` (empty when want == "token"); ``server_ms``/``queue_ms`` = compute/wait time.
    """

    seq: int
    token: int = _f(lo=-1)
    payload: bytes
    server_ms: float
    queue_ms: float

    def _check_invariants(self) -> None:
        if self.token >= 0 and self.payload:
            raise FrameError("Result carries either a token or a payload, not both")


@_message("truncate")
@dataclass(frozen=True)
class Truncate(_Message):
    """Client → server: cut the KV of units [start, end) to ``length`` positions (rollback, replay).
    Answered by Ack."""

    seq: int
    start: int
    end: int = _f(lo=1)
    length: int

    def _check_invariants(self) -> None:
        if self.start >= self.end:
            raise FrameError(f"Truncate needs start < end, got [{self.start}, {self.end})")


@_message("kv_put")
@dataclass(frozen=True)
class KVPut(_Message):
    """Client → server: the KV of one unit that moves to the server (``length`` positions,
    ``key``/``value`` encoded with an fp32/fp16 codec). Answered by Ack."""

    seq: int
    unit: int
    length: int
    key: bytes
    value: bytes


@_message("kv_get")
@dataclass(frozen=True)
class KVGet(_Message):
    """Client → server: ask for the KV of one unit (it moves to the client). Answered by KVData."""

    seq: int
    unit: int


@_message("kv_data")
@dataclass(frozen=True)
class KVData(_Message):
    """Server → client, the answer to KVGet: the unit's KV, encoded as in KVPut."""

    seq: int
    unit: int
    length: int
    key: bytes
    value: bytes


@_message("ack")
@dataclass(frozen=True)
class Ack(_Message):
    """Server → client: Truncate or KVPut ``seq`` is done."""

    seq: int


@_message("ping")
@dataclass(frozen=True)
class Ping(_Message):
    """Either way: ``sent_ms`` is echoed for the RTT, ``pad`` lets the peer measure bandwidth."""

    seq: int
    sent_ms: float
    pad: bytes


@_message("pong")
@dataclass(frozen=True)
class Pong(_Message):
    """Either way, the answer to Ping: its ``seq`` and ``sent_ms``, and how many pad bytes came."""

    seq: int
    sent_ms: float
    pad_len: int


@_message("error")
@dataclass(frozen=True)
class Error(_Message):
    """Server → client: request ``seq`` (or -1: the connection) failed with a splitllm.errors
    ``code``; the server closes the connection after a ``fatal`` one. Codes this side does not know
    are accepted (a newer peer may send them) and become RemoteError in :func:`raise_for_error`.
    """

    seq: int = _f(lo=-1)
    code: str = _f(pattern=r"[a-z][a-z0-9_]{0,63}")
    message: str = _f(max_len=MAX_TEXT_LEN)
    fatal: bool


@_message("close")
@dataclass(frozen=True)
class Close(_Message):
    """Either way: the sender is closing the connection, and why."""

    reason: str = _f(max_len=MAX_TEXT_LEN)


@_message("plan")
@dataclass(frozen=True)
class Plan(_Message):
    """Client → server: ask for a placement policy on this session, so the plan is made by (and
    with the load of) the replica that holds the session, whatever a balancer does with other
    requests. ``request`` is the UTF-8 JSON body of ``POST /v1/plan`` (at most 1 MiB). Answered
    by PlanResult, or an Error frame (non-fatal) for a bad request."""

    seq: int
    request: bytes


@_message("plan_result")
@dataclass(frozen=True)
class PlanResult(_Message):
    """Server → client, the answer to Plan ``seq``: ``policy`` is the UTF-8 JSON that
    ``POST /v1/plan`` answers (``policy``, ``load_factor``, ``valid_s``, ``server_profile``)."""

    seq: int
    policy: bytes


Message: TypeAlias = (
    Hello | Welcome | Run | Result | Truncate | KVPut | KVGet | KVData | Ack | Ping | Pong | Error | Close
    | Plan | PlanResult
)


def pack(msg: Message) -> bytes:
    """Encode a message as one frame. Raises FrameError if ``msg`` is not a message."""
    cls = type(msg)
    if not isinstance(msg, _Message):
        raise FrameError(f"cannot pack {cls.__name__}: not a wire message")
    frame: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": cls.TYPE}
    frame.update(msg.__dict__)
    try:
        return msgpack.packb(frame, use_bin_type=True)
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a str with lone surrogates
        raise FrameError(f"cannot pack {cls.__name__}: {exc}") from exc


def unpack(data: bytes, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Message:
    """Decode and fully validate one frame.

    Raises FrameError (oversized, not msgpack, not a map, unknown type, missing/unknown/invalid
    fields) or VersionMismatch (a different protocol version); never anything else.
    """
    if not isinstance(data, (bytes, bytearray)):
        raise FrameError(f"a frame must be bytes, got {type(data).__name__}")
    if len(data) > max_frame_bytes:
        raise FrameError(f"frame of {len(data)} bytes exceeds the limit of {max_frame_bytes}")
    try:
        frame = msgpack.unpackb(data, max_bin_len=max_frame_bytes, **_UNPACK_OPTIONS)
    except (msgpack.UnpackException, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise FrameError(f"frame is not valid msgpack: {exc}") from exc
    if type(frame) is not dict:
        raise FrameError(f"a frame must be a msgpack map, got {_show(frame)}")
    version = frame.pop("v", None)
    if type(version) is not int:
        raise FrameError(f"frame needs an int protocol version 'v', got {_show(version)}")
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(
            f"peer speaks protocol version {version}, this side speaks version {PROTOCOL_VERSION}"
        )
    tag = frame.pop("t", None)
    cls = MESSAGE_TYPES.get(tag) if type(tag) is str else None
    if cls is None:
        raise FrameError(f"unknown message type 't' {_show(tag)}; known types: {', '.join(MESSAGE_TYPES)}")
    if frame.keys() != cls._field_set:
        gaps = (("missing", cls._field_set - frame.keys()), ("unknown", frame.keys() - cls._field_set))
        named = [f"{what} fields {sorted(keys, key=repr)}" for what, keys in gaps if keys]
        raise FrameError(f"{cls.__name__} frame has " + " and ".join(named))
    msg = object.__new__(cls)  # skip __init__: the keys are checked, __post_init__ checks the values
    msg.__dict__.update(frame)
    msg.__post_init__()
    return msg


def error_frame(exc: SplitLLMError, seq: int = -1, fatal: bool = False) -> Error:
    """The Error frame that reports ``exc`` to the peer (its text cut to the wire's cap)."""
    text = str(exc) or type(exc).__name__
    return Error(seq=seq, code=exc.code, message=text[:MAX_TEXT_LEN], fatal=fatal)


def raise_for_error(msg: Error) -> NoReturn:
    """Raise the exception the peer reported, rebuilt from its code (unknown codes → RemoteError)."""
    raise error_from_code(msg.code, msg.message)
