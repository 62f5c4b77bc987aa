"""Rotation and outlier handling shared by the rotated codecs, and the rotated int-block codecs.

Why rotate: SmolLM2's hidden states have a few massive channels (13x the row's RMS and more:
``benchmarks/codec_frontier.py``). A block holding one gets a huge scale and crushes its 63 neighbours to a few
levels. A random orthogonal rotation spreads every value over a whole block, so each block
looks Gaussian and the scales fit: block-Hadamard + int5 keeps far more top-1 agreement than plain
int5 (``benchmarks/codec_frontier.py`` prints both). The rotation is orthonormal, so the mean squared error is unchanged by
undoing it, and it is its own inverse up to the fixed permutation and signs.

The rotation of a row of C values: zero-pad to P = 64 * ceil(C / 64); permute the P positions
by a fixed permutation; multiply by fixed random signs; apply the normalised Sylvester
Hadamard matrix H64 / 8 to each block of 64 consecutive values. Permutation and signs come from
splitmix64 seeded with :data:`ROTATION_SEED` (integer arithmetic, so the two ends agree whatever
their platform or numpy version): output i is mix(seed + (i + 1) * 0x9E3779B97F4A7C15); sign i
is minus when the top bit of output i is clear; position j of the permuted row takes value
order[j], where order sorts outputs P..2P-1 ascending (stable). Rows may hold at most
:data:`MAX_ROW_VALUES` values (CodecError beyond), which bounds what a decoder allocates.

Outliers: codecs with ``o{k}`` keep the k values of largest magnitude of every row exactly as
float16 (index and value) and code the row with those positions zeroed, so one massive channel
no longer sets the scale of the rest. Indices are stored in increasing order.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from splitllm.codec.base import F16_MAX
from splitllm.codec.scalar import IntBlockCodec
from splitllm.errors import CodecError, ConfigError

__all__ = [
    "BLOCK",
    "BATCH_VALUES",
    "MAX_ROW_VALUES",
    "ROTATION_SEED",
    "RotatedIntCodec",
    "batch_rows",
    "check_outliers",
    "check_row",
    "padded_width",
    "rotate",
    "split_outliers",
    "unrotate",
]

BLOCK = 64
ROTATION_SEED = 0x53504C49  # "SPLI"; changing it changes every rotated codec's format
MAX_ROW_VALUES = 2**18  # longest row a rotated codec takes: hidden sizes and vocabularies fit
BATCH_VALUES = 1 << 14  # padded values a rotated or entropy-coded decoder handles at once
_UNPADDED_BATCH_VALUES = 1 << 16  # the same for rows that padding does not double
_MIN_BATCH_VALUES = 256  # below this a batch costs more in per-batch calls than its temporaries weigh


def _splitmix64(seed: int, count: int) -> np.ndarray:
    """The first ``count`` outputs (uint64) of splitmix64 (Steele, Lea, Flood 2014) from ``seed``."""
    z = np.uint64(seed) + np.arange(1, count + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)  # uint64 arrays wrap mod 2**64
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def check_row(cols: int, what: str, limit: int = MAX_ROW_VALUES) -> None:
    """CodecError if rows of ``cols`` values are longer than ``limit``."""
    if cols > limit:
        raise CodecError(f"{what}: rows of {cols} values; this codec takes at most {limit}")


def _hadamard(n: int) -> np.ndarray:
    """Sylvester Hadamard matrix of order n (a power of two), scaled to be orthonormal."""
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.float32(math.sqrt(n))  # 1/8 for n = 64: exact in float32


_H = _hadamard(BLOCK)  # symmetric and orthonormal: its own inverse


@lru_cache(maxsize=16)
def _rotation(width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(permutation, its inverse, signs) for rows padded to ``width`` (a multiple of BLOCK)."""
    draws = _splitmix64(ROTATION_SEED, 2 * width)
    signs = np.where(draws[:width] >> np.uint64(63), np.float32(1), np.float32(-1))
    order = np.argsort(draws[width:], kind="stable")
    inverse = np.empty_like(order)
    inverse[order] = np.arange(width)
    return order, inverse, signs


def batch_rows(rows: int, cols: int, width: int) -> int:
    """Rows a decoder takes at once for rows of ``cols`` values padded to ``width``.

    Its temporaries are a few dozen bytes per padded value. Rows that padding more than doubles
    (e.g. one column, padded 64x) go at most :data:`BATCH_VALUES` padded values and an eighth of
    the tensor's own values at a time, so the temporaries stay a fraction of the output; other
    rows go 64 Ki values at a time (one batch for a prefill), their temporaries being a few
    times the output anyway. A batch holds at least 256 padded values: a tiny tensor decoded row
    by row spent 3x its old time in per-batch calls ((4, 1) in ec4: 907 against 300 us), while
    its temporaries at that size are a few KiB.
    """
    if width <= 2 * cols:  # temporaries a few times the output: batches only bound the absolute size
        return max(1, max(BATCH_VALUES, _UNPADDED_BATCH_VALUES) // max(width, 1))
    return max(1, max(_MIN_BATCH_VALUES, min(BATCH_VALUES, rows * cols // 8)) // max(width, 1))


def padded_width(cols: int) -> int:
    """Row length P after zero-padding ``cols`` values to whole rotation blocks."""
    return -(-cols // BLOCK) * BLOCK


def rotate(rows: np.ndarray) -> np.ndarray:
    """Rotated rows (R, P) float32 of rows (R, C); orthonormal, so norms are kept."""
    n_rows, cols = rows.shape
    width = padded_width(cols)
    if n_rows == 0:
        return np.zeros((0, width), np.float32)
    order, _, signs = _rotation(width)
    padded = np.zeros((n_rows, width), np.float32)
    padded[:, :cols] = rows
    mixed = padded[:, order] * signs  # (R, P)
    return (mixed.reshape(n_rows, width // BLOCK, BLOCK) @ _H).reshape(n_rows, width)


def unrotate(z: np.ndarray, cols: int) -> np.ndarray:
    """Inverse of :func:`rotate`: rows (R, C) float32 from rotated rows (R, P)."""
    n_rows, width = z.shape
    if n_rows == 0:
        return np.zeros((0, cols), np.float32)
    _, inverse, signs = _rotation(width)
    mixed = (z.reshape(n_rows, width // BLOCK, BLOCK) @ _H).reshape(n_rows, width) * signs
    return np.ascontiguousarray(mixed[:, inverse][:, :cols])


def split_outliers(rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices (R, k) increasing, float16 values (R, k), rows with those positions zeroed).

    CodecError if an outlier is beyond the float16 range (as the fp16 codec refuses it).
    """
    n_rows, cols = rows.shape
    if k == 0 or n_rows == 0:
        return np.zeros((n_rows, 0), np.intp), np.zeros((n_rows, 0), np.float16), rows
    top = np.argpartition(-np.abs(rows), k - 1, axis=1)[:, :k] if k < cols else np.tile(np.arange(cols), (n_rows, 1))
    top.sort(axis=1)
    values = np.take_along_axis(rows, top, axis=1)  # (R, k)
    peak = float(np.abs(values).max()) if values.size else 0.0
    if peak > F16_MAX:
        raise CodecError(f"outlier value {peak:g} is beyond the float16 range")
    rest = rows.copy()
    np.put_along_axis(rest, top, 0.0, axis=1)
    return top, values.astype(np.float16), rest


def check_outliers(idx: np.ndarray, values: np.ndarray, cols: int, what: str) -> None:
    """CodecError unless indices (R, k) are increasing and < cols and values (R, k) are finite."""
    if idx.size and (int(idx.max()) >= cols or (idx[:, 1:] <= idx[:, :-1]).any()):  # unsigned-safe
        raise CodecError(f"{what}: outlier indices out of range or not increasing")
    if not np.isfinite(values).all():
        raise CodecError(f"{what}: outlier values hold NaN/inf, which no encoder writes")


class RotatedIntCodec(IntBlockCodec):
    """``int{b}-block{n}`` on rotated rows, optionally after taking the top-k outliers out.

    Body: for every row its k outlier indices (uint16, or uint32 when C > 65536) then, for every
    row, its k float16 outlier values; then the int-block body (see splitllm.codec.scalar) of
    the rotated rows (R, P) if ``rotated``, else of the rows themselves (R, C).
    """

    def __init__(
        self, bits: int, block: int, codec_id: int, *, rotated: bool = True, outliers: int = 0,
        zstd_level: int | None = None,
    ) -> None:
        if outliers < 0 or (not rotated and not outliers):
            raise ConfigError(f"a rotated int codec needs rotation or outliers, got {rotated=}, {outliers=}")
        super().__init__(bits, block, codec_id, zstd_level)
        self.rotated = rotated
        self.outliers = outliers
        self._base_name = ("hadamard-" if rotated else "") + self._base_name + (f"-o{outliers}" if outliers else "")
        self.bits_per_value = bits + 16 / block + outliers * 32 / 576  # nominal, for H = 576

    def _rows(self, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        """(rows, values per row, outliers per row, bytes per outlier index)."""
        rows, cols = (math.prod(shape[:-1]), shape[-1]) if shape else (1, 1)
        return rows, cols, min(self.outliers, cols), 2 if cols <= 65536 else 4

    def _inner_shape(self, rows: int, cols: int) -> tuple[int, int]:
        return (rows, padded_width(cols)) if self.rotated else (rows, cols)

    def raw_size(self, shape: tuple[int, ...]) -> int:
        rows, cols, k, idx_bytes = self._rows(shape)
        return rows * k * (idx_bytes + 2) + super().raw_size(self._inner_shape(rows, cols))

    def _encode_raw(self, x: np.ndarray) -> bytes:
        rows, cols, k, idx_bytes = self._rows(x.shape)
        check_row(cols, self.name)
        idx, values, rest = split_outliers(x.reshape(rows, cols), k)
        inner = rotate(rest) if self.rotated else rest
        head = idx.astype(f"<u{idx_bytes}").tobytes() + values.astype("<f2").tobytes()
        return head + super()._encode_raw(np.ascontiguousarray(inner))

    def check_shape(self, shape: tuple[int, ...]) -> None:
        check_row(shape[-1] if shape else 1, self.name)

    def _decode_raw(self, raw: bytes | memoryview, shape: tuple[int, ...]) -> np.ndarray:
        rows, cols, k, idx_bytes = self._rows(shape)
        idx = np.frombuffer(raw, f"<u{idx_bytes}", count=rows * k).reshape(rows, k)  # widened per batch
        values = np.frombuffer(raw, "<f2", count=rows * k, offset=rows * k * idx_bytes).reshape(rows, k)
        check_outliers(idx, values, cols, self.name)
        body = memoryview(raw)[rows * k * (idx_bytes + 2) :]
        _, width = self._inner_shape(rows, cols)
        nblocks = -(-width // self.block)
        codes = body[2 * rows * nblocks :]
        if not self.rotated:  # no padding: the inner body is the tensor's own size
            out = self.decode_rows(body[: 2 * rows * nblocks], codes, rows, cols)
            np.put_along_axis(out, idx.astype(np.intp), values.astype(np.float32), axis=1)
            return out.reshape(shape)
        # Rotated rows are padded to whole 64-value blocks: (N, 1) is coded as (N, 64). A batch of
        # rows at a time keeps the padded temporaries a fraction of the tensor; a batch ends on a
        # byte boundary because ``width * bits`` is a multiple of 64 bits.
        step = batch_rows(rows, cols, width)
        batched: np.ndarray | None = np.empty((rows, cols), np.float32) if step < rows else None
        row_code_bytes = width * self.bits // 8
        for a in range(0, rows, step):
            n = min(step, rows - a)
            inner = self.decode_rows(body[2 * a * nblocks : 2 * (a + n) * nblocks],
                                     codes[a * row_code_bytes : (a + n) * row_code_bytes], n, width)
            part = unrotate(inner, cols)
            np.put_along_axis(part, idx[a : a + n].astype(np.intp), values[a : a + n].astype(np.float32), axis=1)
            if batched is None:  # one batch: its rows are the tensor
                return part.reshape(shape)
            batched[a : a + n] = part
        return np.asarray(batched).reshape(shape)
