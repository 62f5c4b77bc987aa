"""Scalar codecs: IEEE floats (fp32, fp16) and symmetric integers with per-block scales.

Block codecs ``int{b}-block{n}`` cut the last axis of every row into blocks of n values (the
last block zero-padded; the shape says how much to drop) and store one float16 scale per block
(row-major), then the codes of the unpadded values, b bits each, packed MSB-first into one bit
stream (zero bits fill the last byte). Code u means (u - qmax) * scale with qmax = 2**(b-1) - 1,
so the range is symmetric and the all-ones code is invalid. Scales are rounded *up* to float16,
hence |error| <= scale / 2 for every value and no code is ever clipped.
"""

from __future__ import annotations

import math

import numpy as np

from splitllm.codec.base import F16_MAX, Codec
from splitllm.errors import CodecError, ConfigError

__all__ = ["FloatCodec", "IntBlockCodec", "pack_codes", "unpack_codes"]


class FloatCodec(Codec):
    """IEEE floats as they are: fp32 is the lossless reference; fp16 halves the bytes and kept
    every greedy token (``benchmarks/codec_quality.py``), but refuses |x| > 65504 rather than sending inf."""

    def __init__(self, bits: int, codec_id: int, zstd_level: int | None = None) -> None:
        super().__init__(f"fp{bits}", codec_id, zstd_level)
        self._wire = np.dtype(f"<f{bits // 8}")
        self.bits_per_value = float(bits)
        self.lossless = bits == 32

    def raw_size(self, shape: tuple[int, ...]) -> int:
        return self._wire.itemsize * math.prod(shape)

    def _encode_raw(self, x: np.ndarray) -> bytes:
        if self._wire.itemsize < 4:
            peak = float(np.abs(x).max()) if x.size else 0.0
            if peak > float(np.finfo(self._wire).max):
                raise CodecError(f"{self.name}: input value {peak:g} is beyond the {self._wire.name} range")
        return x.astype(self._wire, copy=False).tobytes()

    def _decode_raw(self, raw: bytes | memoryview, shape: tuple[int, ...]) -> np.ndarray:
        values = np.frombuffer(raw, self._wire, count=math.prod(shape))
        if not np.isfinite(values).all():
            raise CodecError(f"{self.name}: body holds NaN/inf, which no encoder writes")
        return values.astype(np.float32).reshape(shape)

def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """(N,) uint8 codes < 2**bits -> ceil(N*bits/8) bytes, MSB-first, zero-padded."""
    if bits == 8:
        return codes.tobytes()
    shifted = (codes << (8 - bits)).astype(np.uint8)  # uint8 in, uint8 out: no widening
    planes = np.unpackbits(shifted[:, None], axis=1, count=bits)  # (N, bits)
    return np.packbits(planes).tobytes()


def unpack_codes(buf: bytes | memoryview, count: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`; CodecError if the padding bits are not zero."""
    packed = np.frombuffer(buf, np.uint8)
    if bits == 8:
        return packed
    stream = np.unpackbits(packed)
    if stream[count * bits :].any():
        raise CodecError(f"int{bits} codes: padding bits after the last code are not zero")
    weights = np.left_shift(np.uint8(1), np.arange(bits - 1, -1, -1, dtype=np.uint8))  # MSB first
    return stream[: count * bits].reshape(count, bits) @ weights  # (N,) uint8


class IntBlockCodec(Codec):
    """Symmetric ``bits``-bit integers with one float16 scale per ``block`` values of a row."""

    lossless = False

    def __init__(self, bits: int, block: int, codec_id: int, zstd_level: int | None = None) -> None:
        if not 2 <= bits <= 8 or block < 1:
            raise ConfigError(f"int block codec needs 2 <= bits <= 8 and block >= 1, got {bits}, {block}")
        super().__init__(f"int{bits}-block{block}", codec_id, zstd_level)
        self.bits = bits
        self.block = block
        self.qmax = 2 ** (bits - 1) - 1
        self.bits_per_value = bits + 16 / block
        self._levels = np.arange(2**bits, dtype=np.float32) - np.float32(self.qmax)

    def _layout(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(rows, values per row, blocks per row); a 0-d tensor is one row of one value."""
        rows, cols = (math.prod(shape[:-1]), shape[-1]) if shape else (1, 1)
        return rows, cols, -(-cols // self.block)

    def raw_size(self, shape: tuple[int, ...]) -> int:
        rows, cols, nblocks = self._layout(shape)
        return 2 * rows * nblocks + (rows * cols * self.bits + 7) // 8

    def _encode_raw(self, x: np.ndarray) -> bytes:
        rows, cols, nblocks = self._layout(x.shape)
        width = nblocks * self.block
        flat = x.reshape(rows, cols)  # (R, C)
        if width != cols:
            flat = np.zeros((rows, width), np.float32)
            flat[:, :cols] = x.reshape(rows, cols)
        blocks = flat.reshape(rows, nblocks, self.block)  # (R, NB, block)
        scale = np.abs(blocks).max(axis=-1) / np.float32(self.qmax)  # (R, NB)
        if scale.size and float(scale.max()) > F16_MAX:
            peak = float(scale.max()) * self.qmax
            raise CodecError(f"{self.name}: input value {peak:g} too large for a float16 block scale")
        half = scale.astype(np.float16)
        low = half.astype(np.float32) < scale  # round scales up: then no value needs clipping
        half[low] = np.nextafter(half[low], np.float16(np.inf))
        divisor = np.maximum(half.astype(np.float32), np.float32(1e-30))  # zero block: 0 / tiny = 0
        # |x| / half <= qmax (+ rounding far below 0.5) because half >= scale: no clipping needed
        q = np.rint(blocks / divisor[..., None])  # (R, NB, block)
        codes = (q.reshape(rows, width)[:, :cols] + self.qmax).astype(np.uint8)  # (R, C)
        return half.astype("<f2").tobytes() + pack_codes(codes.reshape(-1), self.bits)

    def _decode_raw(self, raw: bytes | memoryview, shape: tuple[int, ...]) -> np.ndarray:
        rows, cols, nblocks = self._layout(shape)
        scales = memoryview(raw)[: 2 * rows * nblocks]
        return self.decode_rows(scales, memoryview(raw)[2 * rows * nblocks :], rows, cols).reshape(shape)

    def decode_rows(self, scales: bytes | memoryview, codes: bytes | memoryview, rows: int, cols: int) -> np.ndarray:
        """(rows, cols) float32 from their ``rows * blocks`` float16 scales and packed codes.

        ``codes`` holds exactly ``ceil(rows * cols * bits / 8)`` bytes, so a caller may decode a
        body a batch of rows at a time wherever a batch ends on a byte boundary. CodecError for
        a NaN/inf/negative scale, a code beyond ``2 * qmax`` or nonzero padding bits.
        """
        nblocks = -(-cols // self.block)
        half = np.frombuffer(scales, "<f2", count=rows * nblocks)
        if not (half.view("<u2") < 0x7C00).all():  # sign bit clear, exponent not all ones
            raise CodecError(f"{self.name}: corrupt block scales (NaN, inf or negative)")
        codes_u8 = unpack_codes(codes, rows * cols, self.bits)
        if codes_u8.size and int(codes_u8.max()) > 2 * self.qmax:
            raise CodecError(f"{self.name}: code {int(codes_u8.max())} out of range [0, {2 * self.qmax}]")
        values = self._levels.take(codes_u8).reshape(rows, cols)  # (R, C) code -> code - qmax
        # One scale per value, exactly C columns: the last block may be short, and a row shorter
        # than a block must not be expanded to a whole block (a (N, 1) tensor would grow 64x).
        if values.size == 0:  # no values: do not build a per-block table for a 0-row shape
            return values
        counts = np.full(nblocks, self.block, dtype=np.int64)
        counts[-1] = cols - (nblocks - 1) * self.block
        values *= np.repeat(half.astype(np.float32).reshape(rows, nblocks), counts, axis=1)
        return values
