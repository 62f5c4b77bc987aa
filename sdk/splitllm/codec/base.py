"""The activation payload format and the codec registry, shared by every codec module.

Why a module of its own: the codecs live in several private modules (scalar, rotated,
entropy-coded), all subclasses of :class:`Codec`, and :mod:`splitllm.codec` registers them and
is the public door. The header layout, the size limits, zstd and the mapping of foreign errors
to :class:`~splitllm.errors.CodecError` are written once, here (layout: see splitllm.codec).
"""

from __future__ import annotations

import copy
import math
import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import zstandard

from splitllm.errors import CodecError, ConfigError, SplitLLMError, UnknownCodec

__all__ = [
    "DEFAULT_MAX_ELEMENTS",
    "FORMAT_VERSION",
    "MAGIC",
    "Codec",
    "F16_MAX",
    "PayloadHeader",
    "decode_payload",
    "lookup",
    "parse",
    "register",
    "registered",
]

MAGIC = b"SLA1"
FORMAT_VERSION = 1
MAX_NDIM = 8
DEFAULT_MAX_ELEMENTS = 64 * 2**20
ZSTD_LEVEL = 3

_FLAG_ZSTD = 0x01
_FIXED = struct.Struct("<4sBBBBB3s")  # magic, version, codec id, flags, dtype, ndim, reserved
_TAIL = tuple(struct.Struct(f"<{n}II") for n in range(MAX_NDIM + 1))  # shape..., body length
_U32_MAX = 2**32 - 1
F16_MAX = float(np.finfo(np.float16).max)
_DTYPE_BY_SIZE = {4: 1, 2: 2, 8: 3}  # itemsize of a float dtype -> wire dtype code
_DTYPE_NAMES = {1: "float32", 2: "float16", 3: "float64"}
_tls = threading.local()  # zstd contexts are not thread-safe: one set per thread


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = _tls.__dict__.setdefault("cctx", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    if "dctx" not in _tls.__dict__:
        _tls.dctx = zstandard.ZstdDecompressor()
    return _tls.dctx


def _zstd_bound(raw_bytes: int) -> int:
    """ZSTD_COMPRESSBOUND: the largest frame zstd may write for ``raw_bytes`` of input."""
    small = ((128 << 10) - raw_bytes) >> 11 if raw_bytes < (128 << 10) else 0
    return raw_bytes + (raw_bytes >> 8) + small


class Codec(ABC):
    """One wire format for activations.

    A subclass only says how a C-contiguous float32 array becomes a raw body (``_encode_raw``),
    how many bytes that body has for a shape (``raw_size``) and how to read it back
    (``_decode_raw``, which must reject values a genuine encoder never writes). Header, zstd,
    input checks, size limits and error mapping live here, once. Register an instance with
    :func:`register` to give it a name and an id on the wire.
    """

    bits_per_value: float  # nominal bits per tensor value before zstd, scales included
    lossless: bool  # decode(encode(x)) == x bit for bit for float32 x

    def __init__(self, name: str, codec_id: int, zstd_level: int | None = None) -> None:
        self._base_name = name
        self.id = codec_id
        self.zstd_level = zstd_level

    @property
    def name(self) -> str:
        return self._base_name + ("+zstd" if self.zstd_level is not None else "")

    def with_zstd(self, level: int = ZSTD_LEVEL) -> Codec:
        """The same codec with its body compressed by zstd at ``level``."""
        twin = copy.copy(self)
        twin.zstd_level = level
        return twin

    def __repr__(self) -> str:
        return f"<Codec {self.name} id={self.id}>"

    @abstractmethod
    def raw_size(self, shape: tuple[int, ...]) -> int:
        """Exact body bytes before zstd for a tensor of ``shape``."""

    @abstractmethod
    def _encode_raw(self, x: np.ndarray) -> bytes:
        """Body of finite, C-contiguous float32 ``x``; CodecError if x does not fit the format."""

    @abstractmethod
    def _decode_raw(self, raw: bytes | memoryview, shape: tuple[int, ...]) -> np.ndarray:
        """New float32 array of ``shape`` from a body of exactly ``raw_size(shape)`` bytes.

        Called only for a non-empty ``shape`` that passed :meth:`check_shape`, so every row count
        and row length is at most the element count; what the body's own fields size (scales,
        codes, outlier indices, entropy-coder state) the decoder checks before it uses them.
        """

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """CodecError if this codec cannot hold ``shape``, before anything is allocated.

        Codecs whose decode work grows with the row length (rotation, entropy coding) refuse
        rows beyond their limit here; the base codec takes every shape.
        """
        del shape  # every shape is fine for a codec whose work is its element count

    def encoded_size(self, shape: Sequence[int]) -> int:
        """Bytes of ``encode(x)`` for ``x.shape == shape``, header included.

        Exact without zstd. With zstd it is zstd's worst-case bound (never below the real size,
        usually a little above the size without zstd), so a latency planner that uses it never
        underestimates transfer time.
        """
        dims = tuple(int(d) if isinstance(d, (int, np.integer)) else -1 for d in shape)
        if len(dims) > MAX_NDIM or any(not 0 <= d <= _U32_MAX for d in dims):
            raise ConfigError(
                f"{self.name}: bad shape {tuple(shape)!r} (at most {MAX_NDIM} dims in [0, 2**32))"
            )
        raw = self.raw_size(dims)
        body = _zstd_bound(raw) if self.zstd_level is not None else raw
        return _FIXED.size + _TAIL[len(dims)].size + body

    def encode(self, x: np.ndarray) -> bytes:
        """Self-describing payload of ``x`` (any float dtype, 0..8 dims, finite values).

        Raises CodecError when x is not a float array, has too many dims, holds NaN/inf, or
        exceeds what the format can represent (e.g. |x| > 65504 for fp16).
        """
        if not isinstance(x, np.ndarray) or x.dtype.kind != "f" or x.dtype.itemsize not in _DTYPE_BY_SIZE:
            got = f"dtype {x.dtype}" if isinstance(x, np.ndarray) else type(x).__name__
            raise CodecError(f"{self.name}: expected a numpy array of float16/32/64, got {got}")
        if x.ndim > MAX_NDIM or any(d > _U32_MAX for d in x.shape):
            raise CodecError(f"{self.name}: shape {x.shape} not encodable (at most {MAX_NDIM} dims < 2**32)")
        with np.errstate(over="ignore") if x.dtype.itemsize == 8 else nullcontext():
            arr = np.ascontiguousarray(x, dtype=np.float32)  # float64 beyond float32 -> inf: refused
        if not np.isfinite(arr).all():
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            raise CodecError(f"{self.name}: input has non-finite values ({bad} NaN/inf of {arr.size})")
        body = self._encode_raw(arr)
        if len(body) != self.raw_size(arr.shape):  # a codec bug, never the caller's input
            raise CodecError(f"{self.name}: internal error, body of {len(body)} bytes for shape {arr.shape}")
        flags = 0
        if self.zstd_level is not None:
            try:
                body = _compressor(self.zstd_level).compress(body)
            except zstandard.ZstdError as exc:
                raise CodecError(f"{self.name}: zstd compression failed: {exc}") from exc
            flags |= _FLAG_ZSTD
        if len(body) > _U32_MAX:
            raise CodecError(f"{self.name}: body of {len(body)} bytes exceeds the 4 GiB format limit")
        dtype_code = _DTYPE_BY_SIZE[x.dtype.itemsize]
        fixed = _FIXED.pack(MAGIC, FORMAT_VERSION, self.id, flags, dtype_code, x.ndim, b"\0\0\0")
        return b"".join((fixed, _TAIL[x.ndim].pack(*x.shape, len(body)), body))

    def decode(self, payload: bytes, *, max_elements: int | None = None) -> np.ndarray:
        """Like :func:`splitllm.codec.decode`, and CodecError if another codec wrote the payload."""
        return decode_payload(payload, max_elements, expect=self)


_BY_NAME: dict[str, Codec] = {}
_BY_WIRE: dict[tuple[int, bool], Codec] = {}


def register(codec: Codec) -> None:
    """Make ``codec`` and its "+zstd" twin known by name and by wire id."""
    if any(known.id == codec.id for known in _BY_NAME.values()):
        raise ConfigError(f"codec id {codec.id} registered twice")
    for variant in (codec, codec.with_zstd()):
        _BY_NAME[variant.name] = variant
        _BY_WIRE[(variant.id, variant.zstd_level is not None)] = variant


def registered() -> tuple[Codec, ...]:
    """Every registered codec (each base codec followed by its +zstd twin), in registration order."""
    return tuple(_BY_NAME.values())


def lookup(name: str) -> Codec:
    """The codec called ``name``; UnknownCodec (listing the known names) otherwise."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise UnknownCodec(f"unknown codec {name!r}; known: {', '.join(_BY_NAME)}") from None


@dataclass(frozen=True)
class PayloadHeader:
    """What a payload's header says, checked against its length and the size limit."""

    codec: str
    shape: tuple[int, ...]
    dtype: str  # dtype handed to encode; decode always returns float32
    header_bytes: int
    body_bytes: int


def _parse(payload: bytes, max_elements: int | None) -> tuple[Codec, PayloadHeader, memoryview]:
    """Validate the header against the payload's real length before anything is allocated."""
    if max_elements is None:
        max_elements = DEFAULT_MAX_ELEMENTS
    if not isinstance(max_elements, int) or isinstance(max_elements, bool) or max_elements < 0:
        raise ConfigError(f"max_elements must be a non-negative int or None, got {max_elements!r}")
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise CodecError(f"payload must be bytes, got {type(payload).__name__}")
    buf = memoryview(payload).cast("B")
    if len(buf) < _FIXED.size:
        raise CodecError(f"truncated payload: {len(buf)} bytes, the fixed header alone is {_FIXED.size}")
    magic, version, codec_id, flags, dtype_code, ndim, reserved = _FIXED.unpack_from(buf)
    if magic != MAGIC:
        raise CodecError(f"not an activation payload: magic {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise CodecError(f"payload format version {version}; this SDK reads version {FORMAT_VERSION}")
    if flags & ~_FLAG_ZSTD or reserved != b"\0\0\0":
        raise CodecError(f"unknown flags {flags:#04x} or nonzero reserved bytes {reserved!r}")
    codec = _BY_WIRE.get((codec_id, bool(flags & _FLAG_ZSTD)))
    if codec is None:
        known = ", ".join(f"{c.id}={c.name}" for c in _BY_NAME.values() if c.zstd_level is None)
        raise UnknownCodec(f"unknown codec id {codec_id} in payload; known: {known}")
    if dtype_code not in _DTYPE_NAMES:
        raise CodecError(f"{codec.name}: unknown dtype code {dtype_code}")
    if ndim > MAX_NDIM:
        raise CodecError(f"{codec.name}: header says {ndim} dims, at most {MAX_NDIM} allowed")
    header_bytes = _FIXED.size + _TAIL[ndim].size
    if len(buf) < header_bytes:
        raise CodecError(f"truncated payload: {len(buf)} bytes, a {ndim}-dim header needs {header_bytes}")
    *dims, body_bytes = _TAIL[ndim].unpack_from(buf, _FIXED.size)
    shape = tuple(dims)
    elements = math.prod(shape)
    if elements > max_elements:
        raise CodecError(f"{codec.name}: shape {shape} has {elements} elements, limit is {max_elements}")
    codec.check_shape(shape)
    got = len(buf) - header_bytes
    if got < body_bytes:
        raise CodecError(f"truncated payload: header says {body_bytes} body bytes, got {got}")
    if got > body_bytes:
        raise CodecError(f"trailing bytes: header says {body_bytes} body bytes, got {got}")
    raw = codec.raw_size(shape)
    limit = _zstd_bound(raw) if codec.zstd_level is not None else raw
    if body_bytes > limit or (codec.zstd_level is None and body_bytes != raw):
        raise CodecError(f"{codec.name}: shape {shape} needs {raw} body bytes, header says {body_bytes}")
    header = PayloadHeader(codec.name, shape, _DTYPE_NAMES[dtype_code], header_bytes, body_bytes)
    return codec, header, buf[header_bytes:]


def _unzstd(body: memoryview, raw_bytes: int) -> bytes:
    """Decompress one zstd frame that must declare exactly ``raw_bytes``: no bombs, no trailers."""
    declared = zstandard.frame_content_size(body)
    if declared != raw_bytes:
        raise CodecError(f"zstd frame declares {declared} bytes, the header's shape needs {raw_bytes}")
    # Small output chunks: the default (128 KiB) is several times a small tensor's own size.
    stream = _decompressor().decompressobj(write_size=min(max(raw_bytes, 1), 1 << 14))
    raw = stream.decompress(body)  # libzstd stops at the declared size
    if not stream.eof or stream.unused_data or len(raw) != raw_bytes:
        raise CodecError(f"zstd body is not exactly one frame of {raw_bytes} bytes")
    return raw


@contextmanager
def _at_edge(what: str) -> Iterator[None]:
    """Re-raise foreign errors (struct, numpy, zstd) as CodecError with the cause chained.

    IndexError is mapped too: a body decoder that trusted a corrupt field must still fail as a
    CodecError (the decoders validate first; this is the safety net, not the check).
    """
    try:
        yield
    except SplitLLMError:
        raise
    except zstandard.ZstdError as exc:
        raise CodecError(f"corrupt zstd body: {exc}") from exc
    except (struct.error, ValueError, TypeError, OverflowError, IndexError) as exc:
        raise CodecError(f"cannot {what} activation payload: {exc}") from exc


def decode_payload(payload: bytes, max_elements: int | None = None, expect: Codec | None = None) -> np.ndarray:
    """The tensor in ``payload`` (see :func:`splitllm.codec.decode`); ``expect`` pins the codec."""
    with _at_edge("decode"):
        codec, header, body = _parse(payload, max_elements)
        if expect is not None and codec.name != expect.name:
            raise CodecError(f"payload is encoded with {codec.name}, expected {expect.name}")
        raw = _unzstd(body, codec.raw_size(header.shape)) if codec.zstd_level is not None else body
        if math.prod(header.shape) == 0:
            # Nothing to decode, and the other dims may be huge: (2**32 - 1, 0) has 2**32 - 1
            # rows, and a decoder that sized anything by its rows would allocate for all of them.
            return np.zeros(header.shape, np.float32)
        return codec._decode_raw(raw, header.shape)


def parse(payload: bytes, max_elements: int | None = None) -> PayloadHeader:
    """Validated header of ``payload`` without decoding the body."""
    with _at_edge("read"):
        return _parse(payload, max_elements)[1]
