"""The codec registry and the payload layout: a hidden-state tensor (B, T, H) <-> self-describing bytes.

Why: every decode step ships one hidden-state tensor across the network, and the codec decides
how many bytes that is (int8 with one fp16 scale per 64 values keeps greedy tokens at 3.9x
fewer bytes than fp32: ``benchmarks/codec_quality.py``). The bytes carry their own header, so a receiver decodes them with no
out-of-band agreement, and a corrupt or hostile payload is rejected with a
:class:`~splitllm.errors.CodecError` before anything large is allocated.

Payload layout (integers little-endian)::

    offset   size    field
    0        4       magic b"SLA1"
    4        1       format version (1)
    5        1       codec id (table below; an id never changes meaning)
    6        1       flags: bit 0 = the body is one zstd frame declaring its size; others zero
    7        1       dtype given to encode: 1 float32, 2 float16, 3 float64
    8        1       ndim, 0..8
    9        3       reserved, zero
    12       4*ndim  shape, uint32 each
    12+4*n   4       body length in bytes, uint32
    16+4*n   ...     body: the codec's raw body, or a zstd frame of it

A (1, 1, 576) decode step therefore carries 28 header bytes whatever the codec.

Codec ids (each codec also exists as "<name>+zstd": same id, flag bit 0 set)::

    1   fp32                  IEEE float32, the lossless reference
    2   fp16                  IEEE float16
    10  int8-block32          symmetric int-b codes, one float16 scale per block of n values
    11  int8-block64          of a row (splitllm.codec.scalar)
    12  int8-block128
    20  int6-block64
    25  int5-block64
    30  int4-block64
    40  hadamard-int6-block64     the same on rows rotated by a fixed random-sign block
    41  hadamard-int5-block64     Hadamard transform (splitllm.codec.rotate)
    42  hadamard-int4-block64
    50  int4-block64-o2           the two largest values of every row kept as float16,
    51  hadamard-int5-block64-o2  the rest coded as above
    52  hadamard-int4-block64-o2
    60  ec4     rotated rows, two float16 outliers, uniform steps, static Huffman codes,
    61  ec4.5   exactly ceil(b * H / 8) body bytes per row of H values: the encoder picks the
    62  ec5     finest step that fits (splitllm.codec.entropy). ec5 on a decode step of
    63  ec5.5   SmolLM2 is 388 bytes, 6.01x fewer than fp32's 2,332, header included
    64  ec6
    65  ec7

Every codec takes any float tensor of 0..8 dims; rows are the last axis (rotated codecs take
rows of at most 2**18 values, ec codecs 2**16). Which codec keeps which quality is measured by
``benchmarks/codec_frontier.py`` (teacher-forced top-1 agreement and perplexity change on real
text at several splits).
"""

from __future__ import annotations

import numpy as np

from splitllm.codec.base import (
    DEFAULT_MAX_ELEMENTS,
    FORMAT_VERSION,
    MAGIC,
    Codec,
    PayloadHeader,
    decode_payload,
    lookup,
    parse,
    register,
    registered,
)
from splitllm.codec.entropy import EntropyCodec
from splitllm.codec.rotate import RotatedIntCodec
from splitllm.codec.scalar import FloatCodec, IntBlockCodec

__all__ = [
    "CODECS",
    "DEFAULT_MAX_ELEMENTS",
    "FORMAT_VERSION",
    "MAGIC",
    "Codec",
    "EntropyCodec",
    "FloatCodec",
    "IntBlockCodec",
    "PayloadHeader",
    "RotatedIntCodec",
    "codec_names",
    "decode",
    "encode",
    "get_codec",
    "read_header",
]

register(FloatCodec(32, 1))
register(FloatCodec(16, 2))
register(IntBlockCodec(8, 32, 10))
register(IntBlockCodec(8, 64, 11))
register(IntBlockCodec(8, 128, 12))
register(IntBlockCodec(6, 64, 20))
register(IntBlockCodec(5, 64, 25))
register(IntBlockCodec(4, 64, 30))
register(RotatedIntCodec(6, 64, 40))
register(RotatedIntCodec(5, 64, 41))
register(RotatedIntCodec(4, 64, 42))
register(RotatedIntCodec(4, 64, 50, rotated=False, outliers=2))
register(RotatedIntCodec(5, 64, 51, outliers=2))
register(RotatedIntCodec(4, 64, 52, outliers=2))
for _codec_id, _bits in ((60, 4.0), (61, 4.5), (62, 5.0), (63, 5.5), (64, 6.0), (65, 7.0)):
    register(EntropyCodec(_bits, _codec_id))

CODECS: tuple[str, ...] = tuple(c.name for c in registered())


def codec_names() -> tuple[str, ...]:
    """Every known codec name, in a stable order (each base name followed by its +zstd twin)."""
    return CODECS


def get_codec(name: str) -> Codec:
    """The codec called ``name``; UnknownCodec (listing the known names) otherwise."""
    return lookup(name)


def encode(x: np.ndarray, codec: str = "fp32") -> bytes:
    """Encode ``x`` with the codec called ``codec`` (see :meth:`Codec.encode`)."""
    return get_codec(codec).encode(x)


def read_header(payload: bytes, *, max_elements: int | None = None) -> PayloadHeader:
    """Validated header of ``payload`` without decoding the body (e.g. to check H first)."""
    return parse(payload, max_elements)


def decode(payload: bytes, *, max_elements: int | None = None) -> np.ndarray:
    """The float32, C-contiguous, writable tensor that ``payload`` holds.

    Everything is checked before allocation: magic, version, codec id (UnknownCodec lists the
    known ones), ndim <= 8, element count <= ``max_elements`` (default 64 Mi), exact body length,
    zstd frame size. Raises only splitllm.errors exceptions, never returns non-finite values.
    """
    return decode_payload(payload, max_elements)
