"""Static canonical Huffman codes built from integer weights, and MSB-first bit-field I/O.

Why a module of its own: the ``ec`` codecs (splitllm.codec.entropy) need a code that both ends
build identically on any platform, and numpy-vectorised reading and writing of variable-length
bit fields over many rows at once. Weights are Python integers, Huffman ties are broken by
symbol order and codes are canonical (sorted by length, then symbol), so a table is a pure
function of its weights.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from splitllm.errors import CodecError, ConfigError

__all__ = [
    "WINDOW", "BitFields", "HuffmanTable", "binomial_table", "follow_chains", "read_codes", "read_field", "tops",
    "tops_at",
    "write_fields",
]

WINDOW = 32  # bits a decoder looks at per position: the longest code + the longest escape field
_FLOOR_SHIFT = 12  # every symbol has weight >= 2**-12 of the binomial total: codes stay short


@dataclass(frozen=True)
class HuffmanTable:
    """One static code: ``lengths``/``codes`` per symbol (index h + A; escape = 2A) and a lookup
    table from the next ``lut_bits`` stream bits to (symbol, code length)."""

    half: int  # A
    lengths: np.ndarray  # (2A + 1,) uint8
    codes: np.ndarray  # (2A + 1,) uint32, canonical
    lut_bits: int
    lut_symbol: np.ndarray  # (2**lut_bits,) int32
    lut_length: np.ndarray  # (2**lut_bits,) uint8

    @property
    def escape(self) -> int:
        return 2 * self.half


def _huffman_lengths(weights: list[int]) -> list[int]:
    """Code length per symbol of a Huffman code for integer ``weights`` (deterministic ties)."""
    heap: list[tuple[int, int, tuple[int, ...]]] = [(w, i, (i,)) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    lengths = [0] * len(weights)
    order = len(weights)
    while len(heap) > 1:
        w1, _, a = heapq.heappop(heap)
        w2, _, b = heapq.heappop(heap)
        for s in a + b:
            lengths[s] += 1
        heapq.heappush(heap, (w1 + w2, order, a + b))
        order += 1
    return lengths


def binomial_table(n: int) -> HuffmanTable:
    """The code for symbols h in [-A, A-1] (index h + A) weighted max(C(n, h + A), 2**(n - 12)),
    plus an escape symbol (index 2A) of weight 2**(n - 12); A = (n + 1) / 2, n odd."""
    half = (n + 1) // 2
    floor = 1 << (n - _FLOOR_SHIFT)
    weights = [max(math.comb(n, k), floor) for k in range(n + 1)] + [floor]
    lengths = _huffman_lengths(weights)
    codes, code, prev = [0] * len(weights), 0, 0
    for sym in sorted(range(len(weights)), key=lambda s: (lengths[s], s)):
        code <<= lengths[sym] - prev
        codes[sym], prev = code, lengths[sym]
        code += 1
    lut_bits = max(lengths)
    lut_symbol = np.zeros(1 << lut_bits, np.int32)
    lut_length = np.zeros(1 << lut_bits, np.uint8)
    for sym, (c, ln) in enumerate(zip(codes, lengths, strict=True)):
        lo = c << (lut_bits - ln)
        lut_symbol[lo : lo + (1 << (lut_bits - ln))] = sym
        lut_length[lo : lo + (1 << (lut_bits - ln))] = ln
    if lut_bits > 16 or not lut_length.all():
        raise ConfigError(f"Huffman table for n={n} is not a complete code of <= 16 bits")
    return HuffmanTable(half, np.array(lengths, np.uint8), np.array(codes, np.uint32), lut_bits, lut_symbol, lut_length)


def write_fields(n_rows: int, row_bits: int, row: np.ndarray, start: np.ndarray, value: np.ndarray,
                 width: np.ndarray) -> np.ndarray:
    """Bits (R, row_bits) uint8: field i is the low width[i] <= 32 bits of value[i], MSB first,
    at bit start[i] of row row[i]. The fields of a row must tile [0, its end) without gaps (the
    rest of the row stays zero); CodecError otherwise (a bug in the caller, not bad input)."""
    order = np.lexsort((start, row))
    row, start, value, width = row[order], start[order], value[order].astype(np.uint64), width[order]
    aligned = (value << (32 - width).astype(np.uint64)) & np.uint64(2**32 - 1)  # MSB-aligned in 32 bits
    matrix = np.unpackbits(aligned.astype(">u4").view(np.uint8).reshape(-1, 4), axis=1)  # (F, 32)
    stream = matrix[np.arange(32)[None, :] < width[:, None]]  # every field's bits, in order
    per_row = np.bincount(row, weights=width, minlength=n_rows).astype(np.int64)  # (R,)
    first = np.cumsum(per_row) - per_row  # where each row's bits start in the stream
    if (per_row > row_bits).any() or (start != np.cumsum(width) - width - first[row]).any():
        raise CodecError("internal error: bit fields overlap, leave gaps or overflow the row")
    owner = np.repeat(np.arange(n_rows), per_row)
    bits = np.zeros(n_rows * row_bits, np.uint8)
    bits[owner * row_bits + np.arange(len(stream)) - first[owner]] = stream
    return bits.reshape(n_rows, row_bits)


def read_field(bits: np.ndarray, start: int, width: int) -> np.ndarray:
    """Unsigned field of ``width`` bits at the same ``start`` of every row: (R,) int64."""
    if width == 0:
        return np.zeros(len(bits), np.int64)
    weights = np.left_shift(np.int64(1), np.arange(width - 1, -1, -1, dtype=np.int64))
    return bits[:, start : start + width].astype(np.int64) @ weights


def read_codes(bits: np.ndarray, start: int, count: int, width: int) -> np.ndarray:
    """``count`` consecutive unsigned fields of ``width`` <= 16 bits from bit ``start`` of every
    row: (R, count) int64 (int32 temporaries: 4 bytes per bit read)."""
    planes = bits[:, start : start + count * width].reshape(len(bits), count, width)
    weights = np.left_shift(np.int32(1), np.arange(width - 1, -1, -1, dtype=np.int32))
    return (planes.astype(np.int32) @ weights).astype(np.int64)


def tops(packed: np.ndarray, width: int) -> np.ndarray:
    """(R, 8 * B) uint16: the ``width`` <= 16 bits starting at every bit position of rows of B
    packed bytes (R, B), MSB first, zeros past the row; about 6 bytes of temporaries per bit."""
    if not 1 <= width <= 16:
        raise ConfigError(f"tops reads 1..16 bits per position, asked for {width}")
    n_rows, n_bytes = packed.shape
    padded = np.zeros((n_rows, n_bytes + 2), np.uint32)
    padded[:, :n_bytes] = packed
    word = (padded[:, :n_bytes] << 16) | (padded[:, 1 : n_bytes + 1] << 8) | padded[:, 2:]  # 24 bits per byte
    del padded
    out = np.repeat(word, 8, axis=1).reshape(n_rows, n_bytes, 8)  # (R, B, 8) uint32
    del word
    out >>= (24 - width - np.arange(8)).astype(np.uint32)
    out &= np.uint32((1 << width) - 1)
    return out.reshape(n_rows, 8 * n_bytes).astype(np.uint16)


_MIN_CHUNK = 1 << 12  # entries gathered at once while squaring a jump table: at least this, at most 1/8


def follow_chains(nxt: np.ndarray, start: np.ndarray, count: int) -> np.ndarray:
    """(R, count) int64: the first ``count`` positions of the chain p -> nxt[r, p] of every row
    r from ``start[r]``, by pointer doubling: log2(count) squarings of the jump table, each
    gathered in chunks of at most 1/8 of it, so the only per-position memory is ``nxt`` (R, S)
    int32 and one copy.

    ``nxt`` must map [0, S) into [0, S) (an absorbing last position ends a runaway chain) and
    hold fewer than 2**31 entries; it is overwritten (with flat indices).
    """
    n_rows, size = nxt.shape
    if nxt.size >= 2**31:
        raise ConfigError(f"a jump table of {nxt.size} entries does not fit int32 flat indices")
    base = np.arange(n_rows, dtype=np.int32)[:, None] * np.int32(size)
    nxt += base  # flat indices: squaring is then one gather, with no per-row offsets
    jump = nxt.reshape(-1)
    spare = np.empty_like(jump)
    chunk = max(_MIN_CHUNK, -(-jump.size // 8))
    pos = np.repeat(start.astype(np.int64)[:, None] + base.astype(np.int64), count, axis=1)
    index = np.arange(count)[None, :]
    for level in range(max(count - 1, 0).bit_length()):
        if level:
            for a in range(0, jump.size, chunk):
                np.take(jump, jump[a : a + chunk], out=spare[a : a + chunk])
            jump, spare = spare, jump
        take = ((index >> level) & 1).astype(bool)
        np.copyto(pos, jump.take(pos), where=take)
    pos -= base
    return pos


def tops_at(packed: np.ndarray, pos: np.ndarray, width: int) -> np.ndarray:
    """(R, K) int64: the ``width`` <= 16 bits at bit positions ``pos`` (R, K) of rows of packed
    bytes (R, B), as :func:`tops` gives them for every position, without building all of them."""
    n_rows, n_bytes = packed.shape
    padded = np.zeros((n_rows, n_bytes + 2), np.int64)
    padded[:, :n_bytes] = packed
    byte = pos >> 3
    word = (np.take_along_axis(padded, byte, axis=1) << 16) | (np.take_along_axis(padded, byte + 1, axis=1) << 8)
    word |= np.take_along_axis(padded, byte + 2, axis=1)
    return (word >> (24 - width - (pos & 7))) & ((1 << width) - 1)


class BitFields:
    """Fields gathered for :func:`write_fields`; each ``add`` broadcasts its four arguments."""

    def __init__(self) -> None:
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, row: object, start: object, value: object, width: object) -> None:
        """Fields at (row, bit start) holding the low ``width`` bits of ``value`` (array-likes)."""
        arrays = np.broadcast_arrays(*(np.asarray(a) for a in (row, start, value, width)))
        r, s, v, w = (a.reshape(-1).astype(np.int64) for a in arrays)  # values < 2**32
        self._parts.append((r, s, v, w))

    def bits(self, n_rows: int, row_bits: int) -> np.ndarray:
        """(R, row_bits) uint8 bits of everything added so far."""
        row, start, value, width = (np.concatenate(part) for part in zip(*self._parts, strict=True))
        return write_fields(n_rows, row_bits, row, start, value, width)
