"""Activation codecs: a float hidden-state tensor (B, T, H) <-> self-describing bytes.

The package's door. ``registry`` holds the payload layout, the codec ids and ``encode`` /
``decode``; ``base`` the header and the codec interface; ``scalar`` float and int-block codecs;
``rotate`` rotated and outlier-aware ones; ``huffman`` and ``entropy`` the entropy-coded ones.
"""

from __future__ import annotations

from splitllm.codec.registry import (
    CODECS,
    DEFAULT_MAX_ELEMENTS,
    FORMAT_VERSION,
    MAGIC,
    Codec,
    EntropyCodec,
    FloatCodec,
    IntBlockCodec,
    PayloadHeader,
    RotatedIntCodec,
    codec_names,
    decode,
    encode,
    get_codec,
    read_header,
)

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
