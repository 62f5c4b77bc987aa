"""Fuzz the frame decoder, the activation decoder and a live server; report every finding.

Run: ``python benchmarks/fuzz.py [--frames 100000] [--payloads 100000] [--live-frames 2000]
[--session-requests 600] [--seed 0] [--max-seconds 600] [--bundle DIR]``; ``make fuzz-short`` runs a
short one with a fresh random seed, printed first so a finding can be reproduced.

Contracts checked (docs/protocol.md, codec.decode's docstring):

- ``wire.unpack(bytes)`` returns a registered message that packs and unpacks to itself, or raises
  a ``splitllm.errors.SplitLLMError``; nothing else, and fast.
- ``codec.decode(bytes)`` returns a finite, C-contiguous, writable float32 array of the header's
  shape, or raises a SplitLLMError; and its peak memory stays within a small factor of the tensor
  it returns (``--amplification-limit``), else a tiny payload can make a server allocate GiBs.
- live: a real ``splitllm-server`` (subprocess, tiny bundle) answers every garbage frame with an
  Error frame (or a valid reply) and keeps the connection, never logs an unhandled exception,
  never hangs, frees every session; a real SplitClient generating greedy tokens alongside gets
  exactly the tokens of an undisturbed run (and finishes rounds); /healthz still answers
  afterwards; the server's RSS grows by at most 256 MiB. A session fuzzer drives the paths of
  plausible sessions: speculative verification (want="tokens"), Plan frames, KVGet/KVPut,
  Truncate rollbacks, codec switches, and found inputs inside well-formed Runs and KVPuts; every
  Error frame must carry a known code and a message.

Anything else is a *finding*: printed with a reproducer (hex of the input), exit status 1. The
generators below are plain functions of a ``random.Random`` so tests/test_fuzz_sample.py reuses them.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import random
import re
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import tracemalloc
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import numpy as np
import zstandard

from splitllm import SplitClient, errors
from splitllm import codec as codecs
from splitllm.errors import SplitLLMError
from splitllm.protocol import wire
from splitllm.protocol.payload import encode_run_input
from splitllm.testing.server import spawn, stop

MAGIC, FIXED = codecs.MAGIC, struct.Struct("<4sBBBBB3s")  # the payload header of codec.py
INTS = (0, 1, 2, 3, 7, 8, 64, 127, 128, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
        2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -1, -2, -128, -2**31, -2**63)
FLOATS = (0.0, -0.0, 5e-324, 1e-310, 1e-3, 0.5, 1.0, 1.5, 65504.0, 65520.0, 1e300, 1.7e308,
          math.nan, math.inf, -math.inf, -1.0)
BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC6, 0xC9, 0xCB, 0xCF, 0xD3,
         0xD9, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0x90, 0x9F, 0xA0, 0xBF, 0x8F)
HUGE = (b"\xdb\xff\xff\xff\xffab", b"\xc6\xff\xff\xff\xff\x00", b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff",
        b"\xc9\xff\xff\xff\xff\x05", b"\xdc\xff\xff", b"\xde\xff\xff", b"\xc5\xff\xff", b"\xda\xff\xffxy",
        b"\xc6\x7f\xff\xff\xff" + bytes(64), b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff", b"\xd3\x80" + bytes(7))
TEMPERATURES = (0.0, 0.0, 0.0, 0.7, 1.0, 1e-3, 5e-324, 1e300)  # 5e-324: the smallest float > 0
TOP_PS, TOP_KS, SEEDS = (1.0, 1.0, 0.9, 5e-324), (0, 0, 1, 5, 2**31 - 1), (0, 1, 2**63 - 1)
SLOW_CASE_MS = 1000.0  # a decode slower than this (best of 3 runs) is a finding
CODES = {cls.code for cls in errors._all_error_classes()}  # noqa: SLF001 - the codes a peer may send


# ---------------------------------------------------------------- findings and tallies


@dataclass
class Finding:
    kind: str  # exception | contract | slow | amplification | dropped | hang | server_exception | ...
    where: str  # the decoder or the live check
    detail: str
    data: bytes = b""
    count: int = 1
    site: str = ""  # innermost splitllm source line of the traceback, if any

    def show(self) -> str:
        text = f"[{self.kind}] {self.where}: {self.detail} (x{self.count})"
        if self.site:
            text += f"\n    at {self.site}"
        if self.data:
            shown = self.data.hex() if len(self.data) <= 4096 else self.data[:256].hex() + "..."
            text += f"\n    input ({len(self.data)} bytes): {shown}"
        return text


@dataclass
class Tally:
    where: str
    cases: int = 0
    outcomes: Counter = field(default_factory=Counter)  # class name of the exception, or ok:<type>
    codes: Counter = field(default_factory=Counter)  # SplitLLMError.code
    strategies: Counter = field(default_factory=Counter)
    findings: dict[tuple, Finding] = field(default_factory=dict)
    max_case_ms: float = 0.0
    seconds: float = 0.0
    stopped_early: bool = False

    def add(self, kind: str, detail: str, data: bytes, exc: BaseException | None = None) -> None:
        site = _site(exc) if exc is not None else ""
        key = (kind, detail.split(":")[0] if exc is not None else detail, site)
        old = self.findings.get(key)
        if old is None:
            self.findings[key] = Finding(kind, self.where, detail, data, site=site)
        else:
            old.count += 1
            if len(data) < len(old.data):  # keep the smallest reproducer
                old.data, old.detail = data, detail


def _site(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "splitllm" in f.filename]
    frames = frames or traceback.extract_tb(exc.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""


def _timed(tally: Tally, data: bytes, strategy: str, call: Callable[[], Any],
           contract: Callable[[Any], str]) -> None:
    tally.cases += 1
    tally.strategies[strategy] += 1
    began = time.perf_counter()
    try:
        result = call()
    except errors.SplitLLMError as exc:
        tally.outcomes[type(exc).__name__] += 1
        tally.codes[exc.code] += 1
    except Exception as exc:  # noqa: BLE001 - exactly what the fuzzer is looking for
        tally.outcomes["!" + type(exc).__name__] += 1
        tally.add("exception", f"{type(exc).__name__}: {exc}"[:300], data, exc)
    else:
        problem = contract(result)
        tally.outcomes["ok:" + type(result).__name__] += 1
        if problem:
            tally.add("contract", problem, data)
    ms = (time.perf_counter() - began) * 1e3
    if ms > SLOW_CASE_MS:  # timed again: on a shared machine one run can stall for a second
        ms = min(ms, *(_time_ms(call) for _ in range(2)))
    tally.max_case_ms = max(tally.max_case_ms, ms)
    if ms > SLOW_CASE_MS:
        tally.add("slow", f"one case took {ms:.0f} ms (the fastest of 3 runs)", data)


def _time_ms(call: Callable[[], Any]) -> float:
    began = time.perf_counter()
    try:
        call()
    except Exception:  # noqa: BLE001, S110 - only the time matters here; the outcome was recorded
        pass
    return (time.perf_counter() - began) * 1e3


def _frame_contract(msg: Any) -> str:
    if type(msg) not in wire.MESSAGE_TYPES.values():
        return f"unpack returned {type(msg).__name__}, not a message"
    try:
        again = wire.unpack(wire.pack(msg))
    except errors.SplitLLMError as exc:
        return f"a decoded {type(msg).__name__} does not survive pack/unpack: {exc}"
    return "" if again == msg else f"{type(msg).__name__} changes through pack/unpack"


def _array_contract(payload: bytes) -> Callable[[Any], str]:
    def check(x: Any) -> str:
        if not isinstance(x, np.ndarray) or x.dtype != np.float32:
            return f"decode returned {type(x).__name__} {getattr(x, 'dtype', '')}, not float32"
        if not (x.flags.c_contiguous and x.flags.writeable) or not np.isfinite(x).all():
            return "decoded array is not C-contiguous, writable and finite"
        shape = codecs.read_header(payload).shape
        return "" if x.shape == shape else f"decoded shape {x.shape} differs from the header's {shape}"

    return check


def check_frame(tally: Tally, data: bytes, strategy: str = "") -> None:
    _timed(tally, data, strategy, lambda: wire.unpack(data), _frame_contract)


def check_payload(tally: Tally, data: bytes, strategy: str = "") -> None:
    _timed(tally, data, strategy, lambda: codecs.decode(data), _array_contract(data))


# ---------------------------------------------------------------- valid seeds


@dataclass(frozen=True)
class Model:
    """Sizes frames need to look plausible to a server (defaults: the tiny 2-layer llama)."""

    bundle_id: str = "0" * 64
    num_units: int = 4
    hidden_size: int = 64
    vocab_size: int = 384
    max_context: int = 512


def _np(rng: random.Random) -> np.random.Generator:
    return np.random.default_rng(rng.getrandbits(32))


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("abcXYZ09_-/é€😀\x00 ") for _ in range(rng.randint(0, n)))


def hidden_payload(rng: random.Random, n_tokens: int, hidden: int, name: str) -> bytes:
    """(1, T, H) hidden states encoded with ``name``; fp32 ones sometimes hold 3e38 (finite on
    the wire, overflowing inside the model)."""
    x = _np(rng).standard_normal((1, n_tokens, hidden), dtype=np.float32) * rng.choice((1.0, 1.0, 30.0))
    if name.startswith("fp32") and rng.random() < 0.1:
        x[..., 0] = 3e38
    return codecs.encode(x, name)


def run_message(rng: random.Random, m: Model, past_len: int = 0, start: int | None = None,
                end: int | None = None) -> wire.Run:
    start = rng.randrange(m.num_units) if start is None else start
    end = rng.randint(start + 1, m.num_units) if end is None else end
    n = rng.randint(1, 4)
    name = rng.choice(codecs.CODECS)
    if start == 0:
        payload = np.array([rng.randrange(m.vocab_size) for _ in range(n)], "<i4").tobytes()
    else:
        payload = hidden_payload(rng, n, m.hidden_size, name)
    want = rng.choice(("token", "token", "logits")) if end == m.num_units else "hidden"
    return wire.Run(seq=rng.randrange(2**31), start=start, end=end, past_len=past_len, n_tokens=n,
                    payload=payload, want=want, temperature=rng.choice(TEMPERATURES), top_p=rng.choice(TOP_PS),
                    top_k=rng.choice(TOP_KS), seed=rng.choice(SEEDS), codec=name)


def message(rng: random.Random, tag: str, m: Model) -> wire.Message:
    """A valid message of type ``tag`` with random field values (boundaries included)."""
    seq, units = rng.choice((0, 1, rng.randrange(2**31), 2**31 - 1)), m.num_units
    kv = codecs.encode(_np(rng).standard_normal((1, 2, rng.randint(0, 3), 16), dtype=np.float32),
                       rng.choice(("fp32", "fp16")))
    if tag == "hello":
        return wire.Hello(bundle_id=m.bundle_id, codec=rng.choice(codecs.CODECS), client_name=_text(rng, 20),
                          session_id=rng.choice(("", "ab" * 16)), token=rng.choice(("", "s3cret", "t" * 8192)))
    if tag == "welcome":
        n, ctx = rng.randint(3, 40), rng.randint(1, 10_000)
        return wire.Welcome(session_id="ab" * 16, server_name=_text(rng, 10), num_units=n, max_context=ctx,
                            codecs=list(codecs.CODECS), max_frame_bytes=rng.randint(1024, 2**31 - 1),
                            kv_lens=[rng.randint(0, ctx) for _ in range(n)])
    if tag == "run":
        return run_message(rng, m, past_len=rng.choice((0, 0, 1, 7, 2**31 - 9)))
    if tag == "result":
        token = rng.choice((-1, 0, 5, 2**31 - 1))
        payload = b"" if token >= 0 else hidden_payload(rng, 1, m.hidden_size, rng.choice(codecs.CODECS))
        return wire.Result(seq=seq, token=token, payload=payload, server_ms=rng.random() * 9, queue_ms=0)
    if tag == "truncate":
        start = rng.randrange(units)
        return wire.Truncate(seq=seq, start=start, end=rng.randint(start + 1, units), length=rng.choice((0, 1, 3)))
    if tag in ("kv_put", "kv_data"):
        cls = wire.KVPut if tag == "kv_put" else wire.KVData
        return cls(seq=seq, unit=rng.randrange(units), length=rng.randint(0, 3), key=kv, value=kv)
    if tag == "kv_get":
        return wire.KVGet(seq=seq, unit=rng.randrange(units + 2))
    if tag == "ack":
        return wire.Ack(seq=seq)
    if tag == "ping":
        return wire.Ping(seq=seq, sent_ms=rng.choice((0.0, 1e12)), pad=rng.randbytes(rng.choice((0, 1, 100))))
    if tag == "pong":
        return wire.Pong(seq=seq, sent_ms=1.5, pad_len=rng.randrange(2**31))
    if tag == "error":
        return wire.Error(seq=rng.choice((-1, seq)), code=rng.choice(sorted(CODES)), message=_text(rng, 50),
                          fatal=rng.random() < 0.5)
    if tag == "plan":
        return wire.Plan(seq=seq, request=rng.choice((b"", b"{}", b'{"sla": 1}', rng.randbytes(20))))
    if tag == "plan_result":
        return wire.PlanResult(seq=seq, policy=rng.choice((b"{}", rng.randbytes(20))))
    return wire.Close(reason=_text(rng, 30))


def frame_seeds(rng: random.Random, m: Model, per_type: int = 8) -> list[wire.Message]:
    return [message(rng, tag, m) for tag in wire.MESSAGE_TYPES for _ in range(per_type)]


@dataclass(frozen=True)
class PayloadSeed:
    codec: codecs.Codec
    shape: tuple[int, ...]
    dtype: int  # wire dtype code
    raw: bytes  # body before zstd


SHAPES = ((), (0,), (1,), (3,), (2, 5), (1, 3, 64), (1, 2, 130), (2, 0, 3), (1, 1, 1, 1, 7), (4, 1), (1, 65))


def payload_seeds(rng: random.Random) -> list[PayloadSeed]:
    """Every registered codec x a spread of shapes and input dtypes, as (header fields, raw body)."""
    out = []
    for name in codecs.CODECS:
        c = codecs.get_codec(name)
        for shape in SHAPES:
            dtype = rng.choice((np.float16, np.float32, np.float64))
            x = np.asarray(_np(rng).standard_normal(shape) * rng.choice((0.0, 1.0, 100.0)), dtype=dtype)
            payload = c.encode(x)
            hdr = codecs.read_header(payload)
            raw = codecs.get_codec(name.removesuffix("+zstd")).encode(x)[hdr.header_bytes:]
            out.append(PayloadSeed(c, shape, payload[7], raw))
    return out


def build_payload(codec_id: int, flags: int, dtype: int, shape: list[int], body: bytes, *, magic: bytes = MAGIC,
                  version: int = 1, ndim: int | None = None, reserved: bytes = b"\0\0\0",
                  body_len: int | None = None) -> bytes:
    ndim = len(shape) if ndim is None else ndim
    tail = b"".join(struct.pack("<I", d & 0xFFFFFFFF) for d in shape)
    size = len(body) if body_len is None else body_len
    head = FIXED.pack(magic, version & 255, codec_id & 255, flags & 255, dtype & 255, ndim & 255, reserved)
    return head + tail + struct.pack("<I", size & 0xFFFFFFFF) + body


def _zstd(raw: bytes, content_size: bool = True, checksum: bool = False) -> bytes:
    return zstandard.ZstdCompressor(level=1, write_content_size=content_size, write_checksum=checksum).compress(raw)


def seed_payload(s: PayloadSeed) -> bytes:
    body = _zstd(s.raw) if s.codec.zstd_level is not None else s.raw
    return build_payload(s.codec.id, int(s.codec.zstd_level is not None), s.dtype, list(s.shape), body)


# ---------------------------------------------------------------- mutators


def mutate(rng: random.Random, data: bytes, other: bytes = b"") -> bytes:
    """1-4 random byte-level edits: flips, interesting bytes and ints, inserts, cuts, splices."""
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 4))):
        op, at = rng.randrange(10), rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(at, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[min(at, len(b) - 1)] = rng.choice(BYTES)
        elif op == 2 and b:
            b[min(at, len(b) - 1)] = rng.randrange(256)
        elif op == 3:
            b[at:at] = rng.randbytes(rng.randint(1, 8))
        elif op == 4:
            del b[at:at + rng.randint(1, 16)]
        elif op == 5:
            del b[at:]
        elif op == 6:
            b += rng.randbytes(rng.randint(1, 32))
        elif op == 7 and b:
            b[at:at] = b[rng.randrange(len(b)):][: rng.randint(1, 32)]
        elif op == 8 and other:
            b = b[:at] + other[rng.randrange(len(other)):]
        else:
            width, order = rng.choice((1, 2, 4, 8)), rng.choice("<>")
            value = rng.choice(INTS) % 2 ** (8 * width)
            b[at:at + width] = value.to_bytes(width, "little" if order == "<" else "big")
    return bytes(b)


def odd_value(rng: random.Random) -> Any:
    """A msgpack value of any type, biased to boundaries."""
    return rng.choice((
        None, True, False, rng.choice(INTS), rng.choice(FLOATS), "", "x" * rng.choice((1, 300, 5000)),
        _text(rng, 10), b"", rng.randbytes(rng.randint(1, 40)), [], [rng.choice(INTS)] * rng.randint(1, 5),
        [[[]]], {}, {"a": 1}, {"seq": [1]}, msgpack.ExtType(5, b"xy"), msgpack.Timestamp(0, 0),
        [odd_value(rng) for _ in range(2)] if rng.random() < 0.3 else 0,
    ))


_SENTINEL = b"\xc4\x08" + b"\xa5" * 8


def wrong_types(rng: random.Random, msg: wire.Message) -> bytes:
    """A msgpack map shaped like ``msg`` with fields of the wrong type, missing, extra, or raw
    headers that declare huge sizes."""
    d: dict[Any, Any] = {"v": wire.PROTOCOL_VERSION, "t": msg.TYPE, **msg.__dict__}
    raw: bytes | None = None
    for _ in range(rng.choice((1, 1, 2, 3))):
        op, name = rng.randrange(7), rng.choice(list(d))
        if op <= 1:
            d[name] = odd_value(rng)
        elif op == 2:
            d.pop(name)
        elif op == 3:
            d[rng.choice(("extra", b"seq", "V", "t\x00"))] = odd_value(rng)
        elif op == 4:
            d["v"] = rng.choice((0, 2, -1, 2**64 - 1, "1", 1.0, True, None))
        elif op == 5:
            d["t"] = rng.choice(("", "RUN", "runn", b"run", 1, None, *wire.MESSAGE_TYPES))
        else:
            d[name], raw = _SENTINEL[2:], rng.choice(HUGE + (b"\x91" * rng.randint(2, 5000) + b"\xc0",))
    packed = msgpack.packb(d, use_bin_type=rng.random() < 0.8)
    return packed.replace(_SENTINEL, raw, 1) if raw is not None else packed


def odd_msgpack(rng: random.Random) -> bytes:
    """Huge declared sizes, deep nesting, ext types and non-map top levels."""
    op = rng.randrange(5)
    if op == 0:
        return rng.choice(HUGE) + rng.randbytes(rng.randint(0, 8))
    if op == 1:
        depth = rng.choice((10, 500, 1000, 5000, 100_000))
        return rng.choice((b"\x91", b"\x81\xa1a", b"\xdc\x00\x01")) * depth + b"\xc0"
    if op == 2:
        return msgpack.packb(odd_value(rng), use_bin_type=True)
    if op == 3:
        return b"\x82\xa1v\x01\xa1t" + rng.choice(HUGE)
    return b"\xde" + struct.pack(">H", rng.choice((0, 2, 65, 65535))) + rng.randbytes(rng.randint(0, 40))


def frame_case(rng: random.Random, seeds: list[wire.Message], pseeds: list[PayloadSeed]) -> tuple[str, bytes]:
    """(strategy, frame bytes) for the frame decoder."""
    r = rng.random()
    msg = rng.choice(seeds)
    if r < 0.08:
        return "random", rng.randbytes(rng.choice((0, 1, 2, 8, 64, 500)))
    if r < 0.45:
        return "mutated", mutate(rng, wire.pack(msg), wire.pack(rng.choice(seeds)))
    if r < 0.75:
        return "wrong_types", wrong_types(rng, msg)
    if r < 0.88:
        return "odd_msgpack", odd_msgpack(rng)
    if r < 0.95 and isinstance(msg, wire.Run) and msg.start > 0:
        fields = {**msg.__dict__, "payload": payload_case(rng, pseeds)[1]}
        return "fuzzed_payload", wire.pack(wire.Run(**fields))
    return "valid", wire.pack(msg)


def tamper_header(rng: random.Random, s: PayloadSeed) -> bytes:
    f: dict[str, Any] = dict(codec_id=s.codec.id, flags=int(s.codec.zstd_level is not None), dtype=s.dtype,
                             shape=list(s.shape), body=seed_payload(s)[16 + 4 * len(s.shape):])
    for _ in range(rng.choice((1, 1, 2, 3))):
        what = rng.choice(("magic", "version", "codec_id", "flags", "dtype", "ndim", "reserved", "shape",
                           "shape", "body_len", "body"))
        if what == "magic":
            f["magic"] = rng.choice((b"SLA2", b"sla1", b"\0\0\0\0", rng.randbytes(4)))
        elif what == "version":
            f["version"] = rng.choice((0, 2, 255))
        elif what == "codec_id":
            f["codec_id"] = rng.choice((0, 3, 13, 31, 255, *(codecs.get_codec(n).id for n in codecs.CODECS)))
        elif what == "flags":
            f["flags"] = rng.choice((0, 1, 2, 3, 0x80, 0xFF))
        elif what == "dtype":
            f["dtype"] = rng.choice((0, 1, 2, 3, 4, 255))
        elif what == "ndim":
            f["ndim"] = rng.choice((0, 1, 7, 8, 9, 200, 255))
        elif what == "reserved":
            f["reserved"] = rng.choice((b"\0\0\1", b"\xff\xff\xff"))
        elif what == "shape" and f["shape"] and rng.random() < 0.7:
            f["shape"][rng.randrange(len(f["shape"]))] = rng.choice((0, 1, 2, 63, 64, 65, 2**16, 2**31, 2**32 - 1))
        elif what == "shape":
            f["shape"] = f["shape"] + [rng.choice((1, 2, 2**32 - 1))] if rng.random() < 0.5 else f["shape"][1:]
        elif what == "body_len":
            f["body_len"] = rng.choice((0, 1, len(f["body"]) - 1, len(f["body"]) + 1, 2**31, 2**32 - 1))
        else:
            f["body"] = mutate(rng, f["body"])
    body = f.pop("body")
    return build_payload(f.pop("codec_id"), f.pop("flags"), f.pop("dtype"), f.pop("shape"), body, **f)


def corrupt_body(rng: random.Random, s: PayloadSeed) -> bytes:
    """A well-formed header over a body no genuine encoder writes (bad scales, codes, padding,
    NaN/inf, zstd frames of the wrong size, without a size, concatenated, skippable, with junk)."""
    raw, c = bytearray(s.raw), s.codec
    if raw and rng.random() < 0.6:
        if isinstance(c, codecs.FloatCodec):
            width = 4 if c.bits_per_value == 32 else 2
            bad = rng.choice((b"\x00\x00\x80\x7f", b"\x00\x00\xc0\x7f", b"\x00\x00\x80\xff") if width == 4
                             else (b"\x00\x7c", b"\x00\x7e", b"\x00\xfc"))
            at = rng.randrange(len(raw) // width) * width
            raw[at:at + width] = bad
        else:
            at = rng.randrange(len(raw))
            raw[at] = rng.choice((0xFF, 0x7C, 0xFC, 0x80, 0x01))
    raw = bytes(raw)
    if c.zstd_level is None:
        return build_payload(c.id, 0, s.dtype, list(s.shape), raw)
    op = rng.randrange(7)
    body = (_zstd(raw), _zstd(raw, content_size=False), _zstd(raw + b"\0"), _zstd(raw) + _zstd(b""),
            _zstd(raw) + b"junk", b"\x50\x2a\x4d\x18\x04\x00\x00\x00abcd" + _zstd(raw),
            _zstd(raw, checksum=True)[:-1] + b"\x00")[op]
    return build_payload(c.id, 1, s.dtype, list(s.shape), body)


def huge_payload(rng: random.Random, s: PayloadSeed) -> bytes:
    """Headers that declare far more than they carry (or shapes with a zero dim and huge others)."""
    ndim = rng.randint(1, 8)
    shape = [rng.choice((2**32 - 1, 2**16, 8192, 64 * 2**20, 0, 1)) for _ in range(ndim)]
    raw = s.codec.raw_size(tuple(shape)) if rng.random() < 0.5 else rng.choice((0, 2**32 - 1, 64))
    return build_payload(s.codec.id, int(s.codec.zstd_level is not None), s.dtype, shape,
                         rng.randbytes(rng.choice((0, 16, 300))), body_len=raw)


def payload_case(rng: random.Random, seeds: list[PayloadSeed]) -> tuple[str, bytes]:
    """(strategy, payload bytes) for the codec decoder."""
    s, r = rng.choice(seeds), rng.random()
    if r < 0.07:
        return "random", rng.choice((b"", MAGIC + b"\x01")) + rng.randbytes(rng.choice((0, 4, 12, 40, 300)))
    if r < 0.40:
        return "mutated", mutate(rng, seed_payload(s), seed_payload(rng.choice(seeds)))
    if r < 0.70:
        return "header", tamper_header(rng, s)
    if r < 0.80:
        return "huge", huge_payload(rng, s)
    if r < 0.95:
        return "body", corrupt_body(rng, s)
    return "valid", seed_payload(s)


# ---------------------------------------------------------------- offline phases


def fuzz_frames(cases: int, seed: int = 0, deadline: float = math.inf) -> Tally:
    rng = random.Random(seed)
    seeds, pseeds, tally = frame_seeds(rng, Model()), payload_seeds(rng), Tally("wire.unpack")
    began = time.perf_counter()
    for i in range(cases):
        if i % 256 == 0 and time.monotonic() > deadline:
            tally.stopped_early = True
            break
        strategy, data = frame_case(rng, seeds, pseeds)
        check_frame(tally, data, strategy)
    tally.seconds = time.perf_counter() - began
    return tally


def fuzz_payloads(cases: int, seed: int = 0, deadline: float = math.inf) -> Tally:
    rng = random.Random(seed)
    seeds, tally = payload_seeds(rng), Tally("codec.decode")
    began = time.perf_counter()
    for i in range(cases):
        if i % 256 == 0 and time.monotonic() > deadline:
            tally.stopped_early = True
            break
        strategy, data = payload_case(rng, seeds)
        check_payload(tally, data, strategy)
    tally.seconds = time.perf_counter() - began
    return tally


EC_AMPLIFICATION_LIMIT = 48.0  # the ec* codecs' own limit: see amplification()


def amplification_limit(name: str, limit: float, ec_limit: float = EC_AMPLIFICATION_LIMIT) -> float:
    """The limit that applies to codec ``name``: ``ec_limit`` for the entropy-coded ones."""
    return ec_limit if name.startswith("ec") else limit


def amplification(limit: float, rows: int = 16384, ec_limit: float = EC_AMPLIFICATION_LIMIT
                  ) -> tuple[list[dict], Tally]:
    """Peak bytes codec.decode allocates / (returned tensor + payload), for every codec, on
    column, row and square shapes, of zeros and of Gaussian values (escapes, outliers).

    One column of ``rows`` rows is the worst case for block and rotated codecs (rows padded to a
    block), and it must stay within ``limit``. The ec* codecs have a limit of their own,
    ``ec_limit``: a row is one chain of Huffman codes, which the decoder follows by pointer
    doubling over every bit position of the row (two int32 jump tables, ~9 bytes per body bit);
    a row cannot be split, so a single (1, rows) row of ec7 (7 body bits per 4-byte value) holds
    about 16 bytes of temporaries per output byte on top of the output, the body and the
    per-value code tables. Batches of rows bound every other shape as for the rotated codecs.
    """
    table, tally = [], Tally("codec.decode memory")
    side = int(math.isqrt(rows))
    gauss = np.random.default_rng(0)
    for name in codecs.CODECS:
        for shape in ((rows, 1), (1, rows), (side, side)):
            for values in ("zeros", "gaussian"):
                x = np.zeros(shape, np.float32) if values == "zeros" else gauss.standard_normal(shape, np.float32)
                payload = codecs.encode(x, name)
                codecs.decode(payload)  # one-time costs (lazy numpy imports, table caches) are not per payload
                tracemalloc.start()
                try:
                    out = codecs.decode(payload)
                    peak = tracemalloc.get_traced_memory()[1]
                finally:
                    tracemalloc.stop()
                ratio = peak / (out.nbytes + len(payload))
                table.append({"codec": name, "shape": shape, "values": values, "payload": payload,
                              "payload_bytes": len(payload), "peak_bytes": peak, "ratio": round(ratio, 1),
                              "limit": amplification_limit(name, limit, ec_limit)})
                tally.cases += 1
    over = sorted((r for r in table if r["ratio"] > r["limit"]), key=lambda r: -r["ratio"] / r["limit"])
    if over:  # one root cause: report the worst case, count the rest
        w = over[0]
        tally.add("amplification", f"{w['codec']} {w['shape']} ({w['values']}): {w['payload_bytes']}-byte payload -> "
                  f"{w['peak_bytes'] / 2**20:.1f} MiB peak ({w['ratio']:.0f}x > {w['limit']:g}x); {len(over)} of "
                  f"{len(table)} codec/shape pairs over their limit: "
                  + ", ".join(sorted({r['codec'] for r in over})), w["payload"])
    for row in table:
        del row["payload"]
    return table, tally


# ---------------------------------------------------------------- live phase


@dataclass
class Live:
    frames: int = 0
    connections: int = 0
    replies: Counter = field(default_factory=Counter)  # Result/Ack/Pong/Welcome, error:<code>, closed:*
    rounds: int = 0
    tokens: int = 0
    findings: list[Finding] = field(default_factory=list)

    def add(self, kind: str, detail: str, data: bytes = b"") -> None:
        for f in self.findings:
            if f.kind == kind and f.detail.split(" (")[0] == detail.split(" (")[0]:
                f.count += 1
                if data and len(data) < len(f.data):  # keep the smallest reproducer
                    f.data, f.detail = data, detail
                return
        self.findings.append(Finding(kind, "live", detail, data))


async def _exchange(ws: aiohttp.ClientWebSocketResponse, data: bytes | str, timeout_s: float) -> tuple[str, Any]:
    try:
        await (ws.send_str(data) if isinstance(data, str) else ws.send_bytes(data))
        frame = await ws.receive(timeout=timeout_s)
    except asyncio.TimeoutError:
        return "timeout", None
    except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
        return "closed", f"send failed: {exc}"
    if frame.type != aiohttp.WSMsgType.BINARY:
        return "closed", f"{frame.type.name} {frame.data} {frame.extra or ''}".strip()
    try:
        return "reply", wire.unpack(frame.data)
    except errors.SplitLLMError as exc:
        return "bad_reply", exc


def _describe(msg: Any) -> str:
    if isinstance(msg, wire.Run):
        return (f"a Run (units [{msg.start}, {msg.end}), want={msg.want}, temperature={msg.temperature!r}, "
                f"top_p={msg.top_p!r}, codec={msg.codec}, payload {len(msg.payload)} B)")
    return "an undecodable frame" if msg is None else "a " + type(msg).__name__


def _decoded(data: bytes | str) -> Any:
    try:
        return wire.unpack(data) if isinstance(data, bytes) else None
    except Exception:  # noqa: BLE001 - only to describe what was sent; the offline phase reports unpack's bugs
        return None


async def attacker(url: str, m: Model, frames: int, rng: random.Random, live: Live, deadline: float,
                   timeout_s: float = 20.0) -> None:
    """Send ``frames`` frames on raw WebSockets: garbage, mutated and valid requests (real
    sessions: Hello first, kv length tracked), reconnecting whenever the server closes."""
    seeds, pseeds = frame_seeds(rng, m, per_type=4), payload_seeds(rng)
    hello = wire.pack(wire.Hello(bundle_id=m.bundle_id, codec="fp32", client_name="fuzz", session_id="", token=""))
    ws, kv, sent = None, 0, 0
    async with aiohttp.ClientSession() as http:
        while sent < frames and time.monotonic() < deadline:
            if ws is None:
                ws, kv = await http.ws_connect(url.replace("http", "ws", 1) + "/v1/session", max_msg_size=0), 0
                live.connections += 1
                first = frame_case(rng, seeds, pseeds)[1] if rng.random() < 0.05 else hello
                sent += first is not hello
                live.frames += first is not hello
                kind, got = await _exchange(ws, first, timeout_s)
                if kind == "reply" and isinstance(got, wire.Welcome):
                    live.replies["Welcome"] += 1
                    continue
                fatal = kind == "reply" and isinstance(got, wire.Error) and got.fatal
                live.replies[f"error:{got.code}" if fatal else f"pre-hello:{kind}"] += 1
                if not fatal:
                    live.add("dropped" if kind == "closed" else kind, f"before Hello: {kind} {got}", first)
                await ws.close()
                ws = None
                continue
            r, units = rng.random(), m.num_units
            if kv + 4 >= m.max_context or r < 0.06:
                data: bytes | str = wire.pack(wire.Truncate(seq=1, start=0, end=units, length=0))
            elif r < 0.30:
                data = wire.pack(run_message(rng, m, past_len=kv, start=rng.choice((0, 1)),
                                             end=rng.choice((units, units, units - 1))))
            elif r < 0.34:
                data = rng.choice(("", "hello", "{\"v\": 1}", _text(rng, 100)))
            else:
                data = frame_case(rng, seeds, pseeds)[1]
            sent += 1
            live.frames += 1
            kind, got = await _exchange(ws, data, timeout_s)
            msg = _decoded(data)
            if kind == "reply" and isinstance(got, wire.Error):
                live.replies[f"error:{got.code}"] += 1
                if got.code not in CODES:
                    live.add("unknown_code", f"error code {got.code!r}", data if isinstance(data, bytes) else b"")
                if got.code == "session_state":
                    kv = -1  # unknown: the next valid request truncates
                if got.fatal:
                    await ws.close()
                    ws = None
            elif kind == "reply" and isinstance(got, wire.Close):  # the server says why it closes
                live.replies[f"Close: {got.reason[:40]}"] += 1
                await ws.close()
                ws = None
            elif kind == "reply":
                live.replies[type(got).__name__] += 1
                if isinstance(msg, wire.Run) and msg.start <= 1 and msg.end >= units - 1:
                    kv = msg.past_len + msg.n_tokens
                elif isinstance(msg, wire.Truncate) and msg.start <= 1 and msg.end >= units - 1:
                    kv = min(kv, msg.length)
            elif kind == "closed" and isinstance(msg, wire.Close):
                live.replies["closed:after Close"] += 1
                ws = None
            else:
                live.replies[f"{kind}"] += 1
                what = _describe(msg)
                live.add("dropped" if kind == "closed" else kind,
                         f"after Hello, {what} got {kind} ({got}) instead of a reply", data if
                         isinstance(data, bytes) else data.encode())
                if ws is not None:
                    await ws.close()
                ws = None
            if kv < 0 and ws is not None:  # resync the kv length with a Truncate to 0
                kind, got = await _exchange(ws, wire.pack(wire.Truncate(seq=2, start=0, end=units, length=0)),
                                            timeout_s)
                kv = 0 if kind == "reply" and isinstance(got, wire.Ack) else kv
        if ws is not None:
            await ws.close()


def valid_plan(rng: random.Random, m: Model) -> dict[str, Any]:
    """A valid /v1/plan request for the model, with a random client profile."""
    ms = [round(rng.uniform(0.01, 5), 3) for _ in range(m.num_units)]
    return {
        "client_profile": {"bundle_id": m.bundle_id, "threads": 1, "prefill_tokens": 16, "context": 64,
                           "prefill_ms": ms, "decode_ms": list(ms)},
        "sla": {"ttft_ms": 500.0, "token_ms": 100.0}, "codec": "int8-block64", "prompt_tokens": 20,
        "uplink_bps": 1e7, "downlink_bps": 1e8, "rtt_ms": 20.0,
    }


def plan_body(rng: random.Random, m: Model) -> str:
    """A POST /v1/plan body: a valid request with 0-3 fields (nested ones too) made odd, or junk."""
    body = valid_plan(rng, m)
    if rng.random() < 0.08:
        return rng.choice(("", "null", "[]", "{", "\"x\"", "1e999", _text(rng, 40)))
    odd = (None, True, "x", [], {}, -1, 0, 0.5, 1e-300, 1e308, 10**30, 2**63, math.nan, math.inf, -math.inf,
           [math.nan] * m.num_units, [1e308] * m.num_units, [0] * (m.num_units + 1))
    for _ in range(rng.randint(0, 3)):
        target = rng.choice([d for d in (body, body, body.get("client_profile"), body.get("sla"))
                             if isinstance(d, dict) and d])
        key = rng.choice(list(target))
        if rng.random() < 0.15:
            target.pop(key)
        else:
            target[key] = rng.choice(odd)
    return json.dumps(body)  # NaN / Infinity as Python's json writes (and aiohttp's json reads) them


async def plan_fuzz(url: str, m: Model, requests: int, rng: random.Random, live: Live, timeout_s: float = 60.0) -> None:
    """POST odd bodies to /v1/plan: each must get 200 or a 400 with an error code, never a 500."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http:
        for _ in range(requests):
            body = plan_body(rng, m)
            try:
                async with http.post(url + "/v1/plan", data=body, headers={"Content-Type": "application/json"}) as r:
                    status, text = r.status, await r.text()
            except asyncio.TimeoutError:
                live.add("hang", f"POST /v1/plan got no answer within {timeout_s} s", body.encode())
                continue
            live.replies[f"plan:{status}"] += 1
            code = json.loads(text).get("error", {}).get("code") if status == 400 else None
            if status == 400 and code not in CODES:
                live.add("plan_bad_error", f"POST /v1/plan answered 400 without a known code: {text[:200]}",
                         body.encode())
            elif status not in (200, 400):
                live.add("plan_http_500" if status == 500 else "plan_status",
                         f"POST /v1/plan answered HTTP {status} ({' '.join(text[:100].split())})", body.encode())


# Inputs the fuzzer once found (tests/test_codec_hostile.py keeps them): they ride in Runs and
# KVPuts of the session fuzzer too, so a server that decodes before it checks would show it.
FOUND_PAYLOADS = tuple(bytes.fromhex(h) for h in (
    "534c41310128000205000000010000000000010000000100010000000000000000000000",  # seed 2: 2**32 empty rows
    "534c4131013200010400000001000000ffffffff000000040000000000000000",  # seed 7: 2**58 empty rows
))


class _Session:
    """One raw WebSocket session of :func:`session_fuzzer`: sends a request, classifies the reply."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, m: Model, live: Live, timeout_s: float) -> None:
        self.ws, self.m, self.live, self.timeout_s = ws, m, live, timeout_s
        self.kv = 0  # positions every unit holds; -1: unknown, resync with a Truncate to 0
        self.open = True

    async def ask(self, msg: wire.Message, expect: type, what: str) -> Any:
        """The reply to ``msg`` if it is an ``expect``; None after an Error (checked: known code,
        a message) or anything else (a finding unless the server closed after a fatal Error).
        A Plan gets 3x the time (as POST /v1/plan in plan_fuzz): the first one measures costs."""
        data = wire.pack(msg)
        self.live.frames += 1
        timeout_s = self.timeout_s * (3 if isinstance(msg, wire.Plan) else 1)
        kind, got = await _exchange(self.ws, data, timeout_s)
        if kind == "reply" and isinstance(got, expect):
            self.live.replies[f"{what}:{type(got).__name__}"] += 1
            return got
        if kind == "reply" and isinstance(got, wire.Error):
            self.live.replies[f"{what}:error:{got.code}"] += 1
            if got.code not in CODES or not got.message:
                self.live.add("unknown_code", f"{what}: error code {got.code!r}, message {got.message[:80]!r}", data)
            self.kv = -1
            self.open = not got.fatal
            return None
        self.open = False
        if kind == "reply":
            self.live.add("contract", f"{what}: expected {expect.__name__}, got {type(got).__name__}", data)
        else:
            self.live.add("dropped" if kind == "closed" else kind, f"session {what}: {kind} ({got})", data)
        return None

    def run(self, start: int, end: int, ids_or_hidden: np.ndarray | bytes, n: int, want: str, codec: str,
            past_len: int | None = None) -> wire.Run:
        payload = ids_or_hidden if isinstance(ids_or_hidden, bytes) else encode_run_input(ids_or_hidden, start, codec)
        return wire.Run(seq=1, start=start, end=end, past_len=self.kv if past_len is None else past_len, n_tokens=n,
                        payload=payload, want=want, temperature=0.0, top_p=1.0, top_k=0, seed=0, codec=codec)

    def check_hidden(self, reply: wire.Result, n: int, what: str) -> np.ndarray | None:
        try:
            hidden = codecs.decode(reply.payload, max_elements=n * self.m.hidden_size)
        except SplitLLMError as exc:
            self.live.add("contract", f"{what}: the server's hidden payload does not decode: {exc}", reply.payload)
            return None
        if hidden.shape != (1, n, self.m.hidden_size):
            self.live.add("contract", f"{what}: hidden reply of shape {hidden.shape}", reply.payload)
            return None
        return hidden

    def check_tokens(self, reply: wire.Result, n: int, what: str) -> None:
        ids = np.frombuffer(reply.payload, "<i4") if len(reply.payload) % 4 == 0 else np.zeros(0, "<i4")
        if len(ids) != n or ((ids < 0) | (ids >= self.m.vocab_size)).any() or reply.token >= 0:
            self.live.add("contract", f"{what}: want='tokens' over {n} positions answered token {reply.token}, "
                          f"{len(reply.payload)} payload bytes", reply.payload)


async def session_step(s: _Session, rng: random.Random, pseeds: list[PayloadSeed]) -> None:
    """One request (or a pair) of a plausible session: generation, speculative verification, a
    split run with a codec switch, a KV move, a Plan, a Truncate, or a hostile payload in a
    well-formed Run/KVPut. Tracks the KV length and checks every reply's content."""
    m, units = s.m, s.m.num_units
    if s.kv < 0 or s.kv + 8 >= m.max_context:
        s.kv = 0 if await s.ask(wire.Truncate(seq=2, start=0, end=units, length=0), wire.Ack, "resync") else -1
        return
    n = rng.randint(1, 5)
    ids = np.array([[rng.randrange(m.vocab_size) for _ in range(n)]], np.int64)
    op = rng.choice(("generate", "verify", "verify", "split", "split", "kv_move", "plan", "truncate", "hostile"))
    codec = rng.choice(codecs.CODECS)
    if op in ("generate", "verify"):
        want = "tokens" if op == "verify" else "token"
        reply = await s.ask(s.run(0, units, ids, n, want, codec), wire.Result, op)
        if reply is not None:
            s.kv += n
            if op == "verify":
                s.check_tokens(reply, n, op)
                keep = s.kv - rng.randint(0, n - 1)  # the rejected drafts
                s.kv = keep if await s.ask(wire.Truncate(seq=3, start=0, end=units, length=keep), wire.Ack,
                                           "rollback") else -1
    elif op == "split":
        cut = rng.randint(1, units - 1)
        reply = await s.ask(s.run(0, cut, ids, n, "hidden", codec), wire.Result, "split_head")
        hidden = None if reply is None else s.check_hidden(reply, n, "split_head")
        if hidden is not None:  # the rest of the units, with another codec each way
            want = rng.choice(("token", "logits", "tokens"))
            second = s.run(cut, units, hidden, n, want, rng.choice(codecs.CODECS))
            second = wire.Run(**{**second.__dict__, "payload": codecs.encode(hidden, rng.choice(codecs.CODECS))})
            reply = await s.ask(second, wire.Result, "split_tail")
            s.kv = s.kv + n if reply is not None else -1
            if reply is not None and want == "tokens":
                s.check_tokens(reply, n, "split_tail")
        elif reply is not None:
            s.kv = -1
    elif op == "kv_move":
        unit = rng.randint(1, units - 2)
        data = await s.ask(wire.KVGet(seq=4, unit=unit), wire.KVData, "kv_get")
        try:
            key, value = (codecs.decode(data.key), codecs.decode(data.value)) if data is not None else (None, None)
        except SplitLLMError as exc:
            s.live.add("contract", f"kv_get: the server's KVData does not decode: {exc}")
            data = None
        if data is not None and key is not None and value is not None:
            if data.length != s.kv or key.shape != value.shape or key.shape[2] != s.kv:
                s.live.add("contract", f"kv_get: {data.length} positions of shape {key.shape}, expected {s.kv}")
            kv_codec = rng.choice(("fp32", "fp16", "fp32+zstd", codec))
            put = wire.KVPut(seq=5, unit=unit, length=data.length, key=codecs.encode(key, kv_codec),
                             value=codecs.encode(value, kv_codec))
            if await s.ask(put, wire.Ack, "kv_put") is None:
                s.kv = -1
    elif op == "plan":
        reply = await s.ask(wire.Plan(seq=6, request=plan_body(rng, m).encode()), wire.PlanResult, "plan")
        if reply is not None:
            try:
                json.loads(reply.policy)
            except ValueError:
                s.live.add("contract", "plan: PlanResult.policy is not JSON", reply.policy[:200])
        s.kv = -1 if reply is None else s.kv  # an Error sets -1; a plan changes no KV
    elif op == "truncate":
        start = rng.randrange(units)
        length = rng.choice((0, s.kv, s.kv + 5, 2**31 - 1))
        ok = await s.ask(wire.Truncate(seq=7, start=start, end=units, length=length), wire.Ack, "truncate")
        s.kv = min(s.kv, length) if ok and start == 0 else -1
    else:
        payload = rng.choice(FOUND_PAYLOADS + (payload_case(rng, pseeds)[1],))
        if rng.random() < 0.5:
            msg: wire.Message = s.run(1, units, payload, n, "token", codec)
        else:
            msg = wire.KVPut(seq=8, unit=rng.randint(1, units - 2), length=rng.choice((0, n, s.kv)), key=payload,
                             value=payload)
        await s.ask(msg, wire.Ack if isinstance(msg, wire.KVPut) else wire.Result, "hostile")
        s.kv = -1


async def session_fuzzer(url: str, m: Model, requests: int, rng: random.Random, live: Live, deadline: float,
                         timeout_s: float = 20.0) -> None:
    """``requests`` requests over sessions of 4-16 steps each (see :func:`session_step`), each
    session on a fresh connection with a random codec in its Hello."""
    pseeds = payload_seeds(rng)
    sent = 0
    async with aiohttp.ClientSession() as http:
        while sent < requests and time.monotonic() < deadline:
            ws = await http.ws_connect(url.replace("http", "ws", 1) + "/v1/session", max_msg_size=0)
            live.connections += 1
            s = _Session(ws, m, live, timeout_s)
            hello = wire.Hello(bundle_id=m.bundle_id, codec=rng.choice(codecs.CODECS), client_name="fuzz-session",
                               session_id="", token="")
            if await s.ask(hello, wire.Welcome, "hello") is not None:
                s.kv = 0
                for _ in range(rng.randint(4, 16)):
                    if not s.open or sent >= requests or time.monotonic() > deadline:
                        break
                    await session_step(s, rng, pseeds)
                    sent += 1
            else:
                sent += 1
            await ws.close()


async def good_client(url: str, bundle: Path, prompt: list[int], tokens: int, codec: str, reference: list[int],
                      live: Live, stop: asyncio.Event) -> None:
    """Generate greedily, round after round until ``stop``; every round must equal ``reference``,
    on the first connection (no failover: it would hide a dropped session behind a replay)."""
    async with SplitClient(bundle, url, split=1, codec=codec, threads=1, fallback_local=False) as client:
        while True:
            async for _ in client.generate_ids(prompt, max_new_tokens=tokens, ignore_eos=True):
                await asyncio.sleep(0)
            got = client.last_stats.new_ids
            live.rounds += 1
            live.tokens += len(got)
            if got != reference:
                live.add("client_tokens_changed", f"round {live.rounds}: {got} != undisturbed {reference}")
            if client.failovers:
                live.add("client_failover", f"the good client lost its server {client.failovers} time(s)")
            if stop.is_set():
                return


async def reference_tokens(url: str, bundle: Path, prompt: list[int], tokens: int, codec: str) -> list[int]:
    async with SplitClient(bundle, url, split=1, codec=codec, threads=1, fallback_local=False) as client:
        async for _ in client.generate_ids(prompt, max_new_tokens=tokens, ignore_eos=True):
            pass
        return client.last_stats.new_ids


async def health(url: str, live: Live, baseline_sessions: int = 0) -> dict:
    """/healthz must answer 200 and, once every connection is gone, hold ``baseline_sessions``."""
    async with aiohttp.ClientSession() as http:
        for _ in range(50):
            async with http.get(url + "/healthz") as r:
                body = await r.json() if r.status == 200 else {"status": f"HTTP {r.status}"}
            if body.get("sessions") == baseline_sessions:
                break
            await asyncio.sleep(0.1)
    if body.get("status") != "ok":
        live.add("server_unhealthy", f"/healthz answered {body}")
    elif body["sessions"] != baseline_sessions:
        live.add("leaked_sessions", f"{body['sessions']} sessions left, expected {baseline_sessions}")
    return body


async def live_phase(url: str, bundle: Path, m: Model, frames: int, seed: int, deadline: float,
                     attackers: int = 3, tokens: int = 24, codec: str = "int8-block64",
                     plan_requests: int = 0, session_requests: int = 0) -> Live:
    """Reference run, then attackers, a session fuzzer and a good client at once, then /healthz.
    The good client must finish at least one round while the others run (else the server
    stopped answering it)."""
    live, prompt, stop = Live(), list(range(5, 25)), asyncio.Event()
    reference = await reference_tokens(url, bundle, prompt, tokens, codec)

    async def attack_all() -> None:
        shares = [frames // attackers + (i < frames % attackers) for i in range(attackers)]
        try:
            await asyncio.gather(*(attacker(url, m, n, random.Random(seed * 1000 + i), live, deadline)
                                   for i, n in enumerate(shares)),
                                 session_fuzzer(url, m, session_requests, random.Random(seed * 1000 + 999), live,
                                                deadline))
        finally:
            stop.set()

    await asyncio.gather(attack_all(), good_client(url, bundle, prompt, tokens, codec, reference, live, stop),
                         plan_fuzz(url, m, plan_requests, random.Random(seed), live))
    if live.rounds == 0:
        live.add("starved", "the good client finished no round while the fuzzers ran")
    await health(url, live)
    return live


_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Failure|Exit)\b.*)$")


def server_exceptions(log_text: str) -> list[Finding]:
    """Unhandled exceptions in a server's log (aiohttp's "Error handling request" tracebacks)."""
    found: dict[str, Finding] = {}
    sites: list[str] = []
    for line in log_text.splitlines():
        frame = re.match(r'\s*File "([^"]*splitllm[^"]*)", line (\d+), in (\S+)', line)
        if frame:
            sites.append(f"{frame.group(1)}:{frame.group(2)} in {frame.group(3)}")
        match = _EXC_LINE.match(line)
        if match and sites:
            key = match.group(1)[:200]
            if key in found:
                found[key].count += 1
            else:  # the innermost splitllm line, and the server line that called into it
                server = [x for x in sites if "splitllm_server" in x]
                site = sites[-1] + (f" (from {server[-1]})" if server and server[-1] != sites[-1] else "")
                found[key] = Finding("server_exception", "live server", key, site=site)
            sites = []
    return list(found.values())


class _Server:
    """``splitllm-server`` as a subprocess on a free loopback port; stderr kept for tracebacks."""

    def __init__(self, bundle: Path, *extra: str) -> None:
        self.log = tempfile.TemporaryFile("w+")
        try:
            self.proc, self.url = spawn(bundle, extra, stderr=self.log)
        except SplitLLMError as exc:
            raise SystemExit(f"{exc}: {self.stderr()[-2000:]}") from exc

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> int | None:
        return stop(self.proc)


def _export_tiny(out: Path) -> None:
    exe = Path(sys.executable).with_name("splitllm-export")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "splitllm_export.cli"]
    subprocess.run([*cmd, "--tiny", "llama", "--layers", "2", "-q", "-o", str(out)], check=True,
                   stdout=subprocess.DEVNULL, timeout=300)


RSS_GROWTH_LIMIT_BYTES = 256 * 2**20  # server RSS growth over the live phase that counts as a finding


async def warm_up(url: str, bundle: Path, m: Model) -> None:
    """What a server loads once and keeps: a plan (its profile, batch curve and the planner's
    compiled kernel, ~100 MiB with numba) and the pieces of every split. Done before the RSS
    baseline, so that growth over the live phase means memory the server did not give back."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
        async with http.post(url + "/v1/plan", data=json.dumps(valid_plan(random.Random(0), m)),
                             headers={"Content-Type": "application/json"}) as r:
            await r.read()
    for split in range(m.num_units - 1):
        async with SplitClient(bundle, url, split=split, codec="int8-block64") as client:
            async for _ in client.generate_ids([1, 2, 3], max_new_tokens=4, ignore_eos=True):
                pass


def run_live(bundle: Path | None, frames: int, seed: int, deadline: float, plan_requests: int = 0,
             session_requests: int = 0) -> tuple[Live, dict]:
    from splitllm import Bundle

    with tempfile.TemporaryDirectory(prefix="splitllm-fuzz-") as tmp:
        if bundle is None:
            bundle = Path(tmp) / "tiny"
            _export_tiny(bundle)
        b = Bundle.open(bundle)
        s = b.shapes
        m = Model(b.bundle_id, b.num_units, s.hidden_size, s.vocab_size, s.max_context)
        server = _Server(bundle, "--threads", "1")
        try:
            asyncio.run(warm_up(server.url, bundle, m))
            rss_before = _vm_hwm(server.proc.pid, "VmRSS")
            live = asyncio.run(live_phase(server.url, bundle, m, frames, seed, deadline, plan_requests=plan_requests,
                                          session_requests=session_requests))
            alive = server.proc.poll() is None
            rss, rss_after = _vm_hwm(server.proc.pid), _vm_hwm(server.proc.pid, "VmRSS")
        finally:
            code = server.stop()
        if not alive:
            live.add("server_crashed", f"the server process exited with {code}")
        live.findings += server_exceptions(server.stderr())
        if alive and rss_after - rss_before > RSS_GROWTH_LIMIT_BYTES:
            live.add("memory_growth", f"the server's RSS grew by {(rss_after - rss_before) / 2**20:.0f} MiB over "
                     f"the live phase (> {RSS_GROWTH_LIMIT_BYTES / 2**20:.0f} MiB)")
        return live, {"server_peak_rss_bytes": rss, "server_rss_growth_bytes": rss_after - rss_before,
                      "bundle": b.model_id}


def server_bomb(bundle: Path, limit: float) -> tuple[dict, list[Finding]]:
    """One Run of max_context positions whose payload is an int8-block128+zstd column of the
    same element count: a legal element count, so the server decodes it before it checks the
    shape. Measures the server's peak RSS growth and how long a /healthz sent alongside waits."""
    from splitllm import Bundle

    b = Bundle.open(bundle, verify=False)
    n, hidden = b.shapes.max_context, b.shapes.hidden_size
    payload = codecs.encode(np.zeros((n * hidden, 1), np.float32), "int8-block128+zstd")
    frame = wire.pack(wire.Run(seq=1, start=1, end=b.num_units, past_len=0, n_tokens=n, payload=payload,
                               want="token", temperature=0.0, top_p=1.0, top_k=0, seed=0, codec="fp32"))
    hello = wire.pack(wire.Hello(bundle_id=b.bundle_id, codec="fp32", client_name="bomb", session_id="", token=""))
    server = _Server(bundle, "--no-verify", "--threads", "1")

    async def go() -> tuple[str, Any, float, float]:
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(server.url.replace("http", "ws", 1) + "/v1/session")
            await _exchange(ws, hello, 60)
            began = time.perf_counter()
            health = asyncio.create_task(http.get(server.url + "/healthz"))
            await asyncio.sleep(0)
            kind, got = await _exchange(ws, frame, 120)
            reply_s = time.perf_counter() - began
            (await health).release()
            await ws.close()
            return kind, got, reply_s, time.perf_counter() - began

    try:
        before = _vm_hwm(server.proc.pid)
        kind, got, reply_s, health_s = asyncio.run(go())
        after = _vm_hwm(server.proc.pid)
    finally:
        server.stop()
    legit = n * hidden * 4  # the largest hidden state such a Run may carry, as float32
    row = {"bundle": b.model_id, "frame_bytes": len(frame), "declared_shape": [n * hidden, 1],
           "reply": getattr(got, "code", type(got).__name__), "reply_s": round(reply_s, 2),
           "healthz_alongside_s": round(health_s, 2), "server_rss_before_bytes": before,
           "server_rss_after_bytes": after, "legit_tensor_bytes": legit}
    findings = []
    if after - before > limit * legit:
        findings.append(Finding("amplification", "live server", f"a {len(frame)}-byte Run frame raised the server's "
                                f"peak RSS by {(after - before) / 2**20:.0f} MiB (> {limit:g} x the {legit / 2**20:.1f} MiB "
                                f"of the largest legal hidden state); /healthz waited {health_s:.2f} s", frame))
    return row, findings


def _vm_hwm(pid: int, field: str = "VmHWM") -> int:
    """Bytes of /proc/<pid>/status ``field`` (peak RSS by default; "VmRSS": the current one)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------- report


def print_tally(t: Tally) -> None:
    rate = t.cases / t.seconds if t.seconds else 0.0
    print(f"\n== {t.where}: {t.cases} cases in {t.seconds:.1f} s ({rate:,.0f}/s), slowest {t.max_case_ms:.1f} ms"
          + (" [stopped at --max-seconds]" if t.stopped_early else ""))
    print(f"  {'outcome (exception class or ok:<type>)':44} {'count':>8}")
    for name, n in t.outcomes.most_common():
        print(f"  {name:44} {n:8}")
    print(f"  {'error code':44} {'count':>8}")
    for code, n in t.codes.most_common():
        print(f"  {code:44} {n:8}")
    print("  strategies: " + ", ".join(f"{k} {v}" for k, v in sorted(t.strategies.items())))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=100_000, help="cases for wire.unpack (default 100000)")
    p.add_argument("--payloads", type=int, default=100_000, help="cases for codec.decode (default 100000)")
    p.add_argument("--live-frames", type=int, default=2000, help="garbage frames sent to a live server (0: skip)")
    p.add_argument("--plan-requests", type=int, default=300, help="odd POST /v1/plan bodies in the live phase")
    p.add_argument("--session-requests", type=int, default=600, help="requests of plausible sessions (speculative "
                   "verification, Plan frames, KV moves, truncation, codec switches) in the live phase")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=600.0, help="stop every phase by then (default 600)")
    p.add_argument("--amplification-limit", type=float, default=16.0,
                   help="largest allowed decode peak / (tensor + payload) bytes (default 16)")
    p.add_argument("--amplification-rows", type=int, default=16384,
                   help="values of the column, row and square tensors the memory check decodes (default 16384)")
    p.add_argument("--ec-amplification-limit", type=float, default=EC_AMPLIFICATION_LIMIT,
                   help=f"the same for the ec* codecs (default {EC_AMPLIFICATION_LIMIT:g}; amplification() says why)")
    p.add_argument("--bundle", type=Path, default=None, help="bundle for the live phase (default: export a "
                   "tiny 2-layer llama to a temp dir)")
    p.add_argument("--bomb", action="store_true", help="also send one maximal block-codec Run to a server on "
                   "--bomb-bundle and measure its peak RSS (allocates ~2.4 GiB with SmolLM2)")
    p.add_argument("--bomb-bundle", type=Path, default=Path(__file__).resolve().parents[1] / "bundles" / "smollm2")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    start = time.monotonic()
    deadline = start + args.max_seconds
    share = lambda f: start + f * args.max_seconds  # noqa: E731 - time budget per offline phase
    frames = fuzz_frames(args.frames, args.seed, min(deadline, share(0.35)))
    payloads = fuzz_payloads(args.payloads, args.seed, min(deadline, share(0.7)))
    table, amp = amplification(args.amplification_limit, rows=args.amplification_rows,
                               ec_limit=args.ec_amplification_limit)
    for t in (frames, payloads):
        print_tally(t)
    print(f"\n== codec.decode peak memory / (tensor + payload), limit {args.amplification_limit:g}x "
          f"(ec*: {args.ec_amplification_limit:g}x)")
    print(f"  {'codec':22} {'shape':>12} {'values':>8} {'payload B':>10} {'peak MiB':>9} {'ratio':>7} {'limit':>6}")
    for row in sorted(table, key=lambda r: -r["ratio"] / r["limit"])[:12]:
        print(f"  {row['codec']:22} {str(row['shape']):>12} {row['values']:>8} {row['payload_bytes']:10} "
              f"{row['peak_bytes'] / 2**20:9.2f} {row['ratio']:7.1f} {row['limit']:6g}")
    live, extra = Live(), {}
    if args.live_frames > 0 and time.monotonic() < deadline:
        live, extra = run_live(args.bundle, args.live_frames, args.seed, deadline, args.plan_requests,
                               args.session_requests)
        print(f"\n== live: {live.frames} frames on {live.connections} connections; good client "
              f"{live.rounds} rounds, {live.tokens} tokens")
        print(f"  {'server reply':44} {'count':>8}")
        for name, n in live.replies.most_common():
            print(f"  {name:44} {n:8}")
    bomb, bomb_findings = {}, []
    if args.bomb and time.monotonic() < deadline:
        bomb, bomb_findings = server_bomb(args.bomb_bundle, args.amplification_limit)
        print(f"\n== server decode amplification ({bomb['bundle']})")
        for key, value in bomb.items():
            print(f"  {key:28} {value}")
    findings = [*frames.findings.values(), *payloads.findings.values(), *amp.findings.values(), *live.findings,
                *bomb_findings]
    print(f"\n== findings: {len(findings)}")
    for f in findings:
        print(f.show())
    summary = {
        "cases": frames.cases + payloads.cases + amp.cases + live.frames, "findings": len(findings),
        "frame_cases": frames.cases, "payload_cases": payloads.cases, "amplification_cases": amp.cases,
        "live_frames": live.frames, "live_connections": live.connections, "client_rounds": live.rounds,
        "client_tokens": live.tokens, "frame_codes": dict(frames.codes), "payload_codes": dict(payloads.codes),
        "live_replies": dict(live.replies), "max_amplification": max(r["ratio"] for r in table),
        "finding_kinds": dict(Counter(f.kind for f in findings)), "seconds": round(time.monotonic() - start, 1),
        "seed": args.seed, **extra, **({"bomb": bomb} if bomb else {}),
    }
    print(json.dumps(summary))
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
