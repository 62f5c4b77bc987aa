"""The wire protocol: round trips, every way a frame can be invalid, and fuzzing of unpack."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitllm import errors
from splitllm.errors import FrameError, SplitLLMError, VersionMismatch
from splitllm.protocol import wire
from splitllm.protocol.wire import (
    PROTOCOL_VERSION,
    Ack,
    Close,
    Error,
    Hello,
    KVData,
    KVGet,
    KVPut,
    Ping,
    Plan,
    PlanResult,
    Pong,
    Result,
    Run,
    Truncate,
    Welcome,
    error_frame,
    pack,
    raise_for_error,
    unpack,
)

BUNDLE_ID = "ab" * 32


def run(**changes: Any) -> Run:
    fields: dict[str, Any] = dict(
        seq=7, start=3, end=12, past_len=100, n_tokens=1, payload=bytes(2300), want="token",
        temperature=0.7, top_p=0.9, top_k=40, seed=2**40, codec="int8",
    )  # fmt: skip
    return Run(**{**fields, **changes})


SAMPLES: list[Any] = [
    Hello(bundle_id=BUNDLE_ID, codec="fp16", client_name="phone", session_id="", token=""),
    Hello(bundle_id=BUNDLE_ID, codec="int8", client_name="", session_id="s-1", token="secret"),
    Welcome(
        session_id="s-1", server_name="srv", num_units=4, max_context=2048, codecs=["fp32", "fp16"],
        max_frame_bytes=1 << 26, kv_lens=[0, 5, 5, 0],
    ),  # fmt: skip
    run(),
    run(start=0, end=1, n_tokens=3, payload=b"\x01\x00\x00\x00" * 3, want="hidden", temperature=0),
    run(want="logits", top_p=1.0, top_k=0, seed=0, codec=""),
    Result(seq=7, token=42, payload=b"", server_ms=1.5, queue_ms=0.0),
    Result(seq=8, token=-1, payload=b"\x00" * 64, server_ms=0.25, queue_ms=3.0),
    Truncate(seq=1, start=0, end=4, length=0),
    KVPut(seq=2, unit=3, length=17, key=b"k" * 100, value=b"v" * 100),
    KVGet(seq=3, unit=3),
    KVData(seq=3, unit=3, length=0, key=b"", value=b""),
    Ack(seq=2),
    Ping(seq=9, sent_ms=1.7e12, pad=bytes(4096)),
    Pong(seq=9, sent_ms=1.7e12, pad_len=4096),
    Error(seq=-1, code="bad_frame", message="nope", fatal=True),
    Close(reason="bye"),
    Plan(seq=4, request=b'{"sla": {"ttft_ms": 100, "token_ms": 20}}'),
    PlanResult(seq=4, policy=b'{"policy": {}}'),
]


def sample_of(cls: type) -> Any:
    return next(m for m in SAMPLES if type(m) is cls)


def frame_of(msg: Any) -> dict[str, Any]:
    return msgpack.unpackb(pack(msg))


def encode(frame: Any) -> bytes:
    return msgpack.packb(frame, use_bin_type=True)


def expect_frame_error(frame: Any, match: str) -> None:
    with pytest.raises(FrameError, match=match):
        unpack(encode(frame))


# --- round trips and the public surface -------------------------------------------------------


def test_samples_cover_every_message_type() -> None:
    assert {type(m).TYPE for m in SAMPLES} == set(wire.MESSAGE_TYPES)
    assert set(wire.MESSAGE_TYPES.values()) == set(wire.Message.__args__)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Any) -> None:
    data = pack(msg)
    assert isinstance(data, bytes)
    back = unpack(data)
    assert type(back) is type(msg)
    assert back == msg
    assert unpack(bytearray(data)) == msg


def test_frame_layout_is_the_documented_map() -> None:
    frame = frame_of(KVGet(seq=3, unit=5))
    assert frame == {"v": PROTOCOL_VERSION, "t": "kv_get", "seq": 3, "unit": 5}
    raw = msgpack.unpackb(pack(Ping(seq=1, sent_ms=2.0, pad=b"xy")), raw=True)
    assert raw[b"pad"] == b"xy"  # bytes travel as msgpack bin, not str


def test_ints_are_accepted_for_floats_and_stored_as_float() -> None:
    msg = run(temperature=0, top_p=1)
    assert type(msg.temperature) is float and type(msg.top_p) is float
    frame = {**frame_of(sample_of(Result)), "server_ms": 3}
    back = unpack(encode(frame))
    assert type(back.server_ms) is float and back.server_ms == 3.0


def test_messages_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Ack(seq=1).seq = 2  # type: ignore[misc]


# --- frame-level failures ---------------------------------------------------------------------


def test_oversized_frame() -> None:
    data = pack(run())
    with pytest.raises(FrameError, match=f"frame of {len(data)} bytes exceeds the limit of 1000"):
        unpack(data, max_frame_bytes=1000)
    assert unpack(data, max_frame_bytes=len(data)) == run()


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\x81\xa1v", pack(Ack(seq=1)) + b"\x00", b"\xd4\x01\x00", b"\x81\xc4\x01v\x01"],
    ids=["empty", "reserved-byte", "truncated", "trailing-data", "ext-type", "bin-key"],
)
def test_invalid_msgpack_is_a_frame_error(data: bytes) -> None:
    with pytest.raises(FrameError):
        unpack(data)


def test_msgpack_errors_are_chained() -> None:
    with pytest.raises(FrameError, match="not valid msgpack") as info:
        unpack(b"\xc1")
    assert info.value.__cause__ is not None


def test_non_bytes_input() -> None:
    with pytest.raises(FrameError, match="must be bytes, got str"):
        unpack("hello")  # type: ignore[arg-type]


@pytest.mark.parametrize("top", [[1, 2], 5, "v", None, b"x"])
def test_top_level_must_be_a_map(top: Any) -> None:
    expect_frame_error(top, "must be a msgpack map")


def test_missing_or_non_int_version() -> None:
    frame = frame_of(Ack(seq=1))
    del frame["v"]
    expect_frame_error(frame, "protocol version 'v'")
    expect_frame_error({**frame, "v": True}, "protocol version 'v', got bool True")
    expect_frame_error({**frame, "v": "1"}, "protocol version 'v'")


@pytest.mark.parametrize("version", [0, 2, 99, -1, 2**64 - 1])
def test_other_version_is_a_version_mismatch(version: int) -> None:
    with pytest.raises(VersionMismatch, match=rf"version {version}\b.*version {PROTOCOL_VERSION}\b"):
        unpack(encode({**frame_of(Ack(seq=1)), "v": version}))


@pytest.mark.parametrize("tag", ["nope", "Run", "", 3, None, [1], {"a": 1}])
def test_unknown_type_lists_the_known_ones(tag: Any) -> None:
    frame = {**frame_of(Ack(seq=1)), "t": tag}
    with pytest.raises(FrameError, match="unknown message type") as info:
        unpack(encode(frame))
    for known in wire.MESSAGE_TYPES:
        assert known in str(info.value)
    del frame["t"]
    expect_frame_error(frame, "unknown message type")


def test_missing_and_unknown_fields_are_named() -> None:
    frame = frame_of(run())
    del frame["seed"], frame["past_len"]
    expect_frame_error(frame, r"missing fields \['past_len', 'seed'\]")
    expect_frame_error({**frame_of(run()), "speed": 1, "x": 2}, r"unknown fields \['speed', 'x'\]")
    expect_frame_error({**frame_of(Ack(seq=1)), b"raw": 1}, r"unknown fields \[b'raw'\]")


# --- field-level failures (the same checker serves unpack and the constructors) ----------------

BAD_FIELDS: list[tuple[type, str, Any, str]] = [
    (Run, "past_len", -3, "Run.past_len must be an int >= 0 and <= 2147483647, got -3"),
    (Run, "seq", True, "Run.seq must be an int >= 0 and <= 2147483647, got bool True"),
    (Run, "seq", 1.0, "Run.seq must be an int"),
    (Run, "seq", "1", "Run.seq must be an int"),
    (Run, "top_k", 2**31, "Run.top_k must be an int"),
    (Run, "seed", 2**63, "Run.seed must be an int"),
    (Run, "seed", -1, "Run.seed must be an int"),
    (Run, "n_tokens", 0, "Run.n_tokens must be an int >= 1"),
    (Run, "temperature", math.nan, "Run.temperature must be a finite float >= 0.0, got nan"),
    (Run, "temperature", math.inf, "Run.temperature must be a finite float"),
    (Run, "temperature", -0.5, "Run.temperature must be a finite float"),
    (Run, "temperature", False, "Run.temperature must be a finite float"),
    (Run, "temperature", 2**60, "Run.temperature must be a finite float"),
    (Run, "top_p", 0.0, "Run.top_p must be a finite float > 0.0 and <= 1.0"),
    (Run, "top_p", 1.5, "Run.top_p must be a finite float > 0.0 and <= 1.0"),
    (Run, "want", "everything", "Run.want must be one of ['hidden', 'token', 'logits', 'tokens']"),
    (Run, "want", b"token", "Run.want must be one of"),
    (Run, "payload", "text", "Run.payload must be bytes, got str 'text'"),
    (Run, "payload", [1, 2], "Run.payload must be bytes"),
    (Run, "codec", "c" * 257, "Run.codec must be a str of at most 256 characters, got str of length 257"),
    (Hello, "bundle_id", "AB" * 32, "Hello.bundle_id must be a str matching"),
    (Hello, "bundle_id", "ab", "Hello.bundle_id must be a str matching"),
    (Hello, "token", "t" * 8193, "Hello.token must be a str of at most 8192"),
    (Welcome, "codecs", ["fp16", 3], "Welcome.codecs items must be a str"),
    (Welcome, "codecs", ["c" * 65, "fp16"], "Welcome.codecs items must be a str of at most 64"),
    (Welcome, "codecs", "fp16", "Welcome.codecs must be a list"),
    (Welcome, "kv_lens", [0, -1, 0, 0], "Welcome.kv_lens items must be an int >= 0"),
    (Welcome, "kv_lens", [0, True, 0, 0], "Welcome.kv_lens items must be an int"),
    (Welcome, "num_units", 2, "Welcome.num_units must be an int >= 3"),
    (Result, "token", -2, "Result.token must be an int >= -1"),
    (Result, "queue_ms", -1.0, "Result.queue_ms must be a finite float >= 0.0"),
    (Error, "fatal", 1, "Error.fatal must be a bool, got 1"),
    (Error, "code", "Bad Code", "Error.code must be a str matching"),
    (Error, "seq", -2, "Error.seq must be an int >= -1"),
    (Error, "message", "m" * 4097, "Error.message must be a str of at most 4096"),
    (Close, "reason", None, "Close.reason must be a str"),
    (Pong, "pad_len", -1, "Pong.pad_len must be an int >= 0"),
    (Ping, "pad", None, "Ping.pad must be bytes"),
]


@pytest.mark.parametrize(("cls", "name", "value", "message"), BAD_FIELDS)
def test_bad_field_fails_on_unpack(cls: type, name: str, value: Any, message: str) -> None:
    frame = {**frame_of(sample_of(cls)), name: value}
    try:
        data = encode(frame)
    except (ValueError, OverflowError):
        pytest.skip("not representable in msgpack")
    with pytest.raises(FrameError, match=re.escape(message)):
        unpack(data)


@pytest.mark.parametrize(("cls", "name", "value", "message"), BAD_FIELDS)
def test_bad_field_fails_on_construction(cls: type, name: str, value: Any, message: str) -> None:
    with pytest.raises(FrameError, match=re.escape(message)):
        dataclasses.replace(sample_of(cls), **{name: value})


def test_oversize_lists_fail_on_both_paths() -> None:
    codecs = ["fp16"] * (wire.MAX_LIST_LEN + 1)
    with pytest.raises(FrameError, match="Welcome.codecs must be a list of at most 4096 items"):
        dataclasses.replace(sample_of(Welcome), codecs=codecs)
    with pytest.raises(FrameError, match="not valid msgpack"):  # refused by the decoder's own limit
        unpack(encode({**frame_of(sample_of(Welcome)), "codecs": codecs}))


def test_big_bytes_are_not_put_in_error_messages() -> None:
    with pytest.raises(FrameError, match="got bytes of length 100000$"):
        run(seq=bytes(100_000))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: run(start=5, end=5), r"Run needs start < end, got \[5, 5\)"),
        (lambda: run(start=0, end=2, n_tokens=2, payload=bytes(7)), "2 int32 token ids = 8 bytes, got 7"),
        (lambda: Truncate(seq=1, start=3, end=2, length=0), "Truncate needs start < end"),
        (lambda: run(want="tokens", temperature=0.7), "want='tokens' .* is greedy: temperature must be 0"),
        (lambda: Result(seq=1, token=3, payload=b"x", server_ms=0, queue_ms=0), "either a token or a payload"),
        (
            lambda: Welcome(session_id="", server_name="", num_units=3, max_context=8, codecs=[],
                            max_frame_bytes=4096, kv_lens=[0, 0]),
            "kv_lens has 2 entries, num_units is 3",
        ),  # fmt: skip
        (
            lambda: Welcome(session_id="", server_name="", num_units=3, max_context=8, codecs=[],
                            max_frame_bytes=4096, kv_lens=[0, 9, 0]),
            "kv_lens has 9 > max_context 8",
        ),  # fmt: skip
    ],
)
def test_cross_field_rules(build: Any, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        build()


def test_cross_field_rules_apply_on_unpack_too() -> None:
    expect_frame_error({**frame_of(run()), "start": 12}, "Run needs start < end")


def test_missing_constructor_argument_is_a_type_error_not_a_frame() -> None:
    # Building a message in code with a missing argument is a plain programming error.
    with pytest.raises(TypeError):
        Ack()  # type: ignore[call-arg]


# --- pack -------------------------------------------------------------------------------------


def test_pack_rejects_non_messages_and_unencodable_text() -> None:
    with pytest.raises(FrameError, match="not a wire message"):
        pack({"t": "ack", "seq": 1})  # type: ignore[arg-type]
    with pytest.raises(FrameError, match="cannot pack Close"):
        pack(Close(reason="\udc80"))


# --- error frames -----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", errors._all_error_classes(), ids=lambda c: c.__name__)
def test_error_frame_round_trips_every_error_class(cls: type[SplitLLMError]) -> None:
    msg = unpack(pack(error_frame(cls("it broke"), seq=4, fatal=True)))
    assert msg == Error(seq=4, code=cls.code, message="it broke", fatal=True)
    with pytest.raises(cls, match="it broke") as info:
        raise_for_error(msg)
    assert type(info.value) is cls


def test_error_frame_defaults_and_limits() -> None:
    msg = error_frame(errors.LimitExceeded("x" * 10_000))
    assert (msg.seq, msg.fatal, len(msg.message)) == (-1, False, wire.MAX_TEXT_LEN)
    assert error_frame(errors.AuthError()).message == "AuthError"


def test_unknown_error_code_becomes_remote_error() -> None:
    with pytest.raises(errors.RemoteError, match="from_the_future: hm"):
        raise_for_error(unpack(pack(Error(seq=1, code="from_the_future", message="hm", fatal=False))))


# --- fuzzing: unpack raises only SplitLLMError ------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

wire_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=8,
)


def unpack_or_split_error(data: bytes) -> None:
    try:
        msg = unpack(data, max_frame_bytes=1 << 16)
    except SplitLLMError:
        return
    assert isinstance(msg, wire.Message)
    assert unpack(pack(msg)) == msg


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    unpack_or_split_error(data)


@FUZZ
@given(st.sampled_from(SAMPLES), st.data())
def test_fuzz_field_mutations(msg: Any, data: st.DataObject) -> None:
    frame = frame_of(msg)
    for _ in range(data.draw(st.integers(1, 3))):
        action = data.draw(st.sampled_from(["set", "delete", "add"]))
        keys = sorted(frame)
        if action == "set":
            frame[data.draw(st.sampled_from(keys))] = data.draw(wire_values)
        elif action == "delete" and keys:
            del frame[data.draw(st.sampled_from(keys))]
        else:
            frame[data.draw(st.text(max_size=6))] = data.draw(wire_values)
    unpack_or_split_error(encode(frame))


@FUZZ
@given(st.sampled_from(SAMPLES), st.data())
def test_fuzz_byte_mutations(msg: Any, data: st.DataObject) -> None:
    buf = bytearray(pack(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(buf) - 1))
        action = data.draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
        if action == "flip":
            buf[pos] = data.draw(st.integers(0, 255))
        elif action == "insert":
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif action == "delete":
            del buf[pos]
        else:
            del buf[pos:]
        if not buf:
            break
    unpack_or_split_error(bytes(buf))


# --- the protocol document stays in step with the code ----------------------------------------


def test_protocol_doc_names_every_message_field_and_error_code() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
    for tag, cls in wire.MESSAGE_TYPES.items():
        assert f"`{tag}`" in doc, tag
        for field in dataclasses.fields(cls):
            assert f"`{field.name}`" in doc, f"{tag}.{field.name}"
    for cls in errors._all_error_classes():
        assert f"`{cls.code}`" in doc, cls.code
