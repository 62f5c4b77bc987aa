"""``ec{bits}`` codecs: rotated rows, uniform quantisation, Huffman codes, a fixed byte budget per row.

Why: a fixed-rate code spends the same bits on every value, but after the rotation the values
of a row are close to Gaussian, and a Gaussian quantised with step D needs only about
h(X) - log2(D) bits per value when its codes are entropy coded: 0.5-1 bit less than int-b at
the same error. zstd cannot find that on a 576-value decode step (too little data per frame for zstd's own framing and tables), so the codes use
static Huffman tables built from integers. The encoder then spends *exactly* its budget: it
picks, per row, the finest step whose codes fit in ``ceil(bits * C / 8)`` bytes. Payload sizes
are therefore fixed by the shape, as for every other codec, and ``ec5`` on a (1, 1, 576) decode
step is 28 + 360 bytes: 6.01x smaller than fp32, header included.

One row of C values becomes ``row_bytes`` bytes, an MSB-first bit stream::

    bits        field
    3           kind: 0..3 = entropy coded with table t = kind; 4 = fixed-rate fallback
    4           EC: b, the raw low bits per value (0..15);  fallback: m - 1, bits per code
    16 | 32     EC: r, float16 (rounded up) RMS of the rotated row;  fallback: float32 max |z|
    k * (w+16)  the k outliers (see splitllm.codec.rotate): index in w = bitlen(C - 1) bits
                (at least 1), float16 value; indices increasing
    P * b       EC: the low b bits of every code q_i
    ...         EC: Huffman code of every high part h_i = q_i >> b, in order; the escape symbol
                is followed by h_i + hb + 1 in E = bitlen(2 hb + 1) bits, hb = ceil(sqrt(P) s_t) + 1
                fallback: P codes of m bits
    n           EC: refinement bits, n = min(P, bits left in the row): one more bit of q_0..q_n-1
    ...         zero bits up to row_bytes * 8

EC quantisation (z: the rotated row of P values, r = RMS(z) >= 0 rounded up to float16,
s_t = 2 * 2**(t/4)): the step of the high part is D = r / s_t, the step of q is D / 2**b, and
q_i = floor(z_i * 2**b / D); the decoder returns (q_i + 1/2) * D / 2**b, so |error| <= D / 2**(b+1),
or, for the first n values, whose refinement bit e_i = floor(z_i * 2**(b+1) / D) mod 2 is sent,
(2 q_i + e_i + 1/2) * D / 2**(b+1). Since |z_i| <= sqrt(P) r, |h_i| <= sqrt(P) s_t: the escape
field always suffices. Encoders pick (t, b) maximising s_t * 2**b among those that fit the
budget; the refinement bits then spend what the coarse choice of (t, b) left over.

Table t: symbols h in [-A, A-1] and an escape, A = (n_t + 1) / 2, with integer weights
max(C(n_t, h + A), 2**(n_t - 12)) (escape: 2**(n_t - 12)); n_t = 17, 23, 33, 45 makes the
centred Binomial(n_t, 1/2) match the bins of a unit Gaussian quantised with step 1/s_t. Codes
are canonical Huffman codes of those weights (ties broken by symbol order, escape last), so
both ends build identical tables from integers alone.

Rows hold at most :data:`MAX_ROW_VALUES` values (hidden sizes; not the logits of large
vocabularies): the decoder follows the chain of codes for every bit position of a row at once,
which costs ~40 bytes of temporaries per bit, and rows are decoded in batches of ~16k values.

Fallback (never taken on real activations, but it makes every finite row encodable within the
budget): m = min(8, bits left / P) bits per value, step 2 zmax / 2**m, codes floor(z / step) +
2**(m-1) clipped to [0, 2**m - 1], decoded as (code - 2**(m-1) + 1/2) * step.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from splitllm.codec.base import F16_MAX, Codec
from splitllm.codec.huffman import (
    WINDOW,
    BitFields,
    binomial_table,
    follow_chains,
    read_codes,
    read_field,
    tops,
    tops_at,
)
from splitllm.codec.rotate import (
    batch_rows,
    check_outliers,
    check_row,
    padded_width,
    rotate,
    split_outliers,
    unrotate,
)
from splitllm.errors import CodecError, ConfigError

__all__ = ["MAX_ROW_VALUES", "SIGMAS", "TABLES", "EntropyCodec"]

SIGMAS = (2.0, 2.378414230005442, 2.8284271247461903, 3.363585661014858)  # 2 * 2**(t/4)
_BINOMIAL_N = (17, 23, 33, 45)
_MAX_B = 15
_KIND_FALLBACK = 4
_VALUES_PER_BATCH = 1 << 14  # rows are coded in batches of about this many values (memory)
_LOOKUP_CHUNK = 1 << 15  # bit positions looked up at once while building a batch's chain
MAX_ROW_VALUES = 1 << 16  # longer rows are refused: one row's decoder temporaries stay ~20 MiB


TABLES = tuple(binomial_table(n) for n in _BINOMIAL_N)
_LUT_BITS = max(t.lut_bits for t in TABLES)
if _LUT_BITS + (2 * math.ceil(math.sqrt(MAX_ROW_VALUES) * SIGMAS[-1]) + 3).bit_length() > WINDOW:
    raise ConfigError("the longest code plus the longest escape field must fit the decoder's window")
# Every table's lookup widened to _LUT_BITS index bits, stacked: (4, 2**_LUT_BITS)
_LUT_SYMBOL = np.stack([np.repeat(t.lut_symbol, 1 << (_LUT_BITS - t.lut_bits)) for t in TABLES])
_LUT_LENGTH = np.stack([np.repeat(t.lut_length, 1 << (_LUT_BITS - t.lut_bits)) for t in TABLES])


@lru_cache(maxsize=64)
def _step_table(t: int, width: int) -> np.ndarray:
    """(2**_LUT_BITS,) uint8: bits taken by the code of table t that the lookup bits start, its
    escape field included for rows of ``width`` values (at most WINDOW: checked at import)."""
    table = _LUT_LENGTH[t].copy()
    table[_LUT_SYMBOL[t] == TABLES[t].escape] += np.uint8(_escape_bound(width, t)[1])
    return table


def _escape_bound(width: int, t: int) -> tuple[int, int]:
    """(hb, E): high parts lie in [-hb - 1, hb]; an escaped one takes E bits."""
    hb = math.ceil(math.sqrt(width) * SIGMAS[t]) + 1
    return hb, (2 * hb + 1).bit_length()


def _add_outliers(fields: BitFields, rows: np.ndarray, idx: np.ndarray, vals: np.ndarray, start: int,
                  idx_bits: int) -> None:
    """Index and float16 value of the k outliers (n, k) of rows (n,), from bit ``start``."""
    slot = start + np.arange(idx.shape[1])[None, :] * (idx_bits + 16)
    fields.add(rows[:, None], slot, idx, idx_bits)
    fields.add(rows[:, None], slot + idx_bits, vals.view(np.uint16), 16)


def _add_huffman(fields: BitFields, rows: np.ndarray, t_r: np.ndarray, h: np.ndarray, start: np.ndarray
                 ) -> np.ndarray:
    """Codes of high parts h (n, P) with tables t_r (n,) from bit start (n,); returns their end (n,)."""
    lengths = np.zeros(h.shape, np.int64)
    values = np.zeros(h.shape, np.int64)
    for t, table in enumerate(TABLES):
        sel = t_r == t
        if sel.any():
            hb, esc_bits = _escape_bound(h.shape[1], t)
            ht = h[sel]
            direct = (ht >= -table.half) & (ht < table.half)
            sym = np.where(direct, ht + table.half, table.escape)
            code, ln = table.codes[sym].astype(np.int64), table.lengths[sym].astype(np.int64)
            lengths[sel] = np.where(direct, ln, ln + esc_bits)
            values[sel] = np.where(direct, code, (code << esc_bits) | (ht + hb + 1))
    fields.add(rows[:, None], start[:, None] + np.cumsum(lengths, axis=1) - lengths, values, lengths)
    return start + lengths.sum(axis=1)


class EntropyCodec(Codec):
    """Rotated, uniformly quantised, Huffman-coded rows of exactly ``row_bytes(C)`` bytes.

    ``bits`` is the budget per value (the body of a C-value row is ceil(bits * C / 8) bytes,
    raised for very short rows to what the fallback needs); ``outliers`` values per row are
    sent as float16 first. See the module docstring for the format.
    """

    lossless = False

    def __init__(self, bits: float, codec_id: int, *, outliers: int = 2, zstd_level: int | None = None) -> None:
        tenths = round(bits * 10)
        if not 30 <= tenths <= 160 or abs(tenths - bits * 10) > 1e-9 or outliers < 0:
            raise ConfigError(f"ec codec needs 3 <= bits <= 16 in tenths and outliers >= 0, got {bits}, {outliers}")
        super().__init__(f"ec{bits:g}" + ("" if outliers == 2 else f"-o{outliers}"), codec_id, zstd_level)
        self._tenths = tenths
        self.outliers = outliers
        self.bits_per_value = tenths / 10

    # ------------------------------------------------------------------ layout

    def _layout(self, shape: tuple[int, ...]) -> tuple[int, int, int, int, int]:
        """(rows, C, P, k, index bits)."""
        rows, cols = (math.prod(shape[:-1]), shape[-1]) if shape else (1, 1)
        return rows, cols, padded_width(cols), min(self.outliers, cols), max(1, (cols - 1).bit_length())

    def _side_bits(self, k: int, idx_bits: int, fallback: bool) -> int:
        return 7 + (32 if fallback else 16) + k * (idx_bits + 16)

    def row_bytes(self, cols: int) -> int:
        """Body bytes per row of ``cols`` values (0 for empty rows)."""
        if cols == 0:
            return 0
        _, _, width, k, idx_bits = self._layout((cols,))
        fallback_min = self._side_bits(k, idx_bits, True) + 2 * width
        return max(-(-self._tenths * cols // 80), -(-fallback_min // 8))

    def raw_size(self, shape: tuple[int, ...]) -> int:
        rows, cols, *_ = self._layout(shape)
        return rows * self.row_bytes(cols)

    # ------------------------------------------------------------------ encode

    def _batch_rows(self, width: int) -> int:
        return max(1, _VALUES_PER_BATCH // max(width, 1))

    def _encode_raw(self, x: np.ndarray) -> bytes:
        rows, cols, width, *_ = self._layout(x.shape)
        check_row(cols, self.name, MAX_ROW_VALUES)
        flat = x.reshape(rows, cols)
        step = self._batch_rows(width)
        return b"".join(self._encode_rows(flat[a : a + step]) for a in range(0, rows if cols else 0, step))

    def _encode_rows(self, x: np.ndarray) -> bytes:
        """Body of rows x (R, C), R >= 1, C >= 1."""
        rows, cols, width, k, idx_bits = self._layout(x.shape)
        row_bits = self.row_bytes(cols) * 8
        idx, out_vals, rest = split_outliers(x, k)
        z = rotate(rest).astype(np.float64)  # (R, P)
        if not np.isfinite(z).all():
            raise CodecError(f"{self.name}: input values too large to rotate in float32")
        rms = np.sqrt((z * z).mean(axis=1))  # (R,)
        r16 = rms.astype(np.float16)
        low = r16.astype(np.float64) < rms
        r16[low] = np.nextafter(r16[low], np.float16(np.inf))  # round up: |z| <= sqrt(P) r
        usable = r16.astype(np.float64) <= F16_MAX  # else the row's RMS needs the fallback
        t_r, b_r, u = self._choose_steps(z, np.where(usable, r16.astype(np.float64), 0.0),
                                         row_bits - self._side_bits(k, idx_bits, False))
        ec = usable & (b_r >= 0)
        fields = BitFields()
        fields.add(np.arange(rows), 0, np.where(ec, t_r, _KIND_FALLBACK), 3)
        if ec.any():
            er = np.flatnonzero(ec)
            self._add_ec(fields, er, t_r[ec], b_r[ec], r16[ec], u[ec], idx[ec], out_vals[ec], row_bits, idx_bits)
        if not ec.all():
            fr = np.flatnonzero(~ec)
            self._add_fallback(fields, fr, z[fr], idx[fr], out_vals[fr], row_bits, idx_bits)
        return np.packbits(fields.bits(rows, row_bits), axis=1).tobytes()

    @staticmethod
    def _choose_steps(z: np.ndarray, r: np.ndarray, avail: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row: the table t and low bits b of the finest step whose codes fit ``avail`` bits
        (b = -1 when none does), and z in units of the chosen high step (R, P)."""
        rows, width = z.shape
        best_t = np.zeros(rows, np.int64)
        best_b = np.full(rows, -1, np.int64)
        best_u = np.zeros_like(z)
        for t, table in enumerate(TABLES):
            hb, esc_bits = _escape_bound(width, t)
            step = r / SIGMAS[t]  # (R,) step of the high part
            u = np.divide(z, step[:, None], out=np.zeros_like(z), where=step[:, None] > 0)
            h = np.clip(np.floor(u), -hb - 1, hb).astype(np.int64)  # (R, P)
            direct = (h >= -table.half) & (h < table.half)
            sym = np.where(direct, h + table.half, table.escape)
            cost = table.lengths[sym].astype(np.int64).sum(axis=1) + esc_bits * (~direct).sum(axis=1)
            b = np.minimum((avail - cost) // width, _MAX_B)  # (R,)
            better = (b >= 0) & (4 * b + t > 4 * best_b + best_t)
            best_t[better], best_b[better], best_u[better] = t, b[better], u[better]
        return best_t, best_b, best_u

    def _add_ec(self, fields: BitFields, rows: np.ndarray, t_r: np.ndarray, b_r: np.ndarray, r16: np.ndarray,
                u: np.ndarray, idx: np.ndarray, vals: np.ndarray, row_bits: int, idx_bits: int) -> None:
        """Fields of entropy-coded rows (indices ``rows`` (n,)); u (n, P) is z in high steps."""
        width = u.shape[1]
        fields.add(rows, 3, b_r, 4)
        fields.add(rows, 7, r16.view(np.uint16), 16)
        _add_outliers(fields, rows, idx, vals, 23, idx_bits)
        side = 23 + idx.shape[1] * (idx_bits + 16)
        fine = b_r[:, None] + 1  # one bit finer than b: the refinement bit
        hb = np.array([_escape_bound(width, t)[0] for t in range(len(TABLES))])[t_r][:, None]
        qf = np.clip(np.floor(u * np.exp2(fine)).astype(np.int64), (-hb - 1) << fine, ((hb + 1) << fine) - 1)
        q = qf >> 1  # (n, P): floor(z * 2**b / D), clipped as h is
        col = np.arange(width)[None, :]
        fields.add(rows[:, None], side + col * b_r[:, None], q & ((1 << b_r[:, None]) - 1), b_r[:, None])
        end = _add_huffman(fields, rows, t_r, q >> b_r[:, None], side + width * b_r)
        refined = col < np.minimum(width, row_bits - end)[:, None]  # the leftover bits
        fields.add(np.broadcast_to(rows[:, None], q.shape)[refined], (end[:, None] + col)[refined],
                   (qf & 1)[refined], 1)

    def _add_fallback(self, fields: BitFields, rows: np.ndarray, z: np.ndarray, idx: np.ndarray,
                      vals: np.ndarray, row_bits: int, idx_bits: int) -> None:
        """Fields of fixed-rate fallback rows (indices ``rows`` (n,)) of rotated values z (n, P)."""
        width = z.shape[1]
        side = self._side_bits(idx.shape[1], idx_bits, True)
        m = min(8, (row_bits - side) // width)
        peak = np.abs(z).max(axis=1)
        zmax = peak.astype(np.float32)  # (n,) rounded up: no code is clipped
        small = zmax.astype(np.float64) < peak
        zmax[small] = np.nextafter(zmax[small], np.float32(np.inf))
        step = 2 * zmax.astype(np.float64) / 2**m
        u = np.divide(z, step[:, None], out=np.zeros_like(z), where=step[:, None] > 0)
        codes = np.clip(np.floor(u) + 2 ** (m - 1), 0, 2**m - 1).astype(np.int64)
        fields.add(rows, 3, m - 1, 4)
        fields.add(rows, 7, zmax.view(np.uint32), 32)
        _add_outliers(fields, rows, idx, vals, 39, idx_bits)
        fields.add(rows[:, None], side + np.arange(width)[None, :] * m, codes, m)

    # ------------------------------------------------------------------ decode

    def check_shape(self, shape: tuple[int, ...]) -> None:
        check_row(shape[-1] if shape else 1, self.name, MAX_ROW_VALUES)

    def _decode_raw(self, raw: bytes | memoryview, shape: tuple[int, ...]) -> np.ndarray:
        rows, cols, width, *_ = self._layout(shape)
        body = np.frombuffer(raw, np.uint8).reshape(rows, self.row_bytes(cols))
        step = batch_rows(rows, cols, width)
        if step >= rows:  # one batch: its rows are the tensor
            return self._decode_rows(body, cols).reshape(shape)
        out = np.empty((rows, cols), np.float32)
        for a in range(0, rows, step):
            out[a : a + step] = self._decode_rows(body[a : a + step], cols)
        return out.reshape(shape)

    def _decode_rows(self, packed: np.ndarray, cols: int) -> np.ndarray:
        """Rows (R, C) float32 from their packed bodies (R, row_bytes)."""
        bits = np.unpackbits(packed, axis=1)
        rows, row_bits = bits.shape
        _, _, width, k, idx_bits = self._layout((cols,))
        kind = read_field(bits, 0, 3)
        if (kind > _KIND_FALLBACK).any():
            raise CodecError(f"{self.name}: row kind {int(kind.max())} is not 0..4")
        z: np.ndarray | None = None  # (R, P) float64, allocated once the chains are followed
        idx = np.zeros((rows, k), np.intp)
        vals = np.zeros((rows, k), np.float16)
        end = np.zeros(rows, np.int64)  # first bit after the last field, per row
        ec = kind < _KIND_FALLBACK
        for sel, fallback in ((ec, False), (~ec, True)):
            if sel.any():
                every = bool(sel.all())  # the usual case: no copy of the rows' bits
                part, part_packed = (bits, packed) if every else (bits[sel], packed[sel])
                side = self._side_bits(k, idx_bits, fallback)
                start = 39 if fallback else 23
                for j in range(k):
                    slot = start + j * (idx_bits + 16)
                    idx[sel, j] = read_field(part, slot, idx_bits)
                    vals[sel, j] = read_field(part, slot + idx_bits, 16).astype(np.uint16).view(np.float16)
                if fallback:
                    z_sel, end[sel] = self._decode_fallback(part, side, width, row_bits)
                else:
                    z_sel, end[sel] = self._decode_ec(part, part_packed, kind[sel], side, width)
                del part, part_packed
                if every:
                    z = z_sel
                else:
                    z = np.zeros((rows, width), np.float64) if z is None else z
                    z[sel] = z_sel
        check_outliers(idx, vals, cols, self.name)
        reverse = bits[:, ::-1]  # the last 1 bit of every row must come before its end
        if (reverse.any(axis=1) & (row_bits - 1 - reverse.argmax(axis=1) >= end)).any():
            raise CodecError(f"{self.name}: padding bits after the last code are not zero")
        del bits, reverse
        if z is None:  # every row is ec or fallback and a batch has rows: never taken
            raise CodecError(f"{self.name}: internal error, no row decoded")
        out = unrotate(z.astype(np.float32), cols)
        np.put_along_axis(out, idx, vals.astype(np.float32), axis=1)
        if not np.isfinite(out).all():
            raise CodecError(f"{self.name}: decoded values overflow float32")
        return out

    def _decode_ec(self, bits: np.ndarray, packed: np.ndarray, t_r: np.ndarray, side: int, width: int
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Rotated rows (n, P) and end bit (n,) of entropy-coded rows ``bits`` (n, row_bits), whose
        packed bytes are ``packed``. Every field that sizes work is checked before it is used:
        b against the row, each code's end against the row, escapes against the table's range."""
        n, row_bits = bits.shape
        b_r = read_field(bits, 3, 4)
        r16 = read_field(bits, 7, 16).astype(np.uint16)
        if (r16 >= 0x7C00).any():  # sign bit set, inf or NaN
            raise CodecError(f"{self.name}: corrupt row scale (NaN, inf or negative)")
        start = side + width * b_r  # (n,) where the Huffman codes begin
        if (start > row_bits).any():
            raise CodecError(f"{self.name}: {int(b_r.max())} low bits per value do not fit the row")
        # Per row and bit position: where a code starting there ends (the chain's next link).
        top = tops(packed, _LUT_BITS)  # (n, row_bits) uint16
        sentinel = row_bits + WINDOW  # absorbing: a chain that runs off the row stays there
        nxt = np.full((n, sentinel + 1), sentinel, np.int32)
        for t in np.unique(t_r):
            rows_t = np.flatnonzero(t_r == t)
            table = _step_table(int(t), width)
            for a in range(0, len(rows_t), max(1, _LOOKUP_CHUNK // row_bits)):  # bounds the int64 index copy
                part = rows_t[a : a + max(1, _LOOKUP_CHUNK // row_bits)]
                nxt[part, :row_bits] = table.take(top[part])
        del top
        nxt[:, :row_bits] += np.arange(row_bits, dtype=np.int32)  # <= row_bits - 1 + WINDOW < sentinel
        pos = follow_chains(nxt, start, width)  # (n, P): where code i starts
        del nxt
        last = pos[:, -1]
        if (last >= row_bits).any():
            raise CodecError(f"{self.name}: Huffman codes run past the end of the row")
        top_at = tops_at(packed, pos, _LUT_BITS)  # (n, P): the lookup bits of every code
        lows = np.zeros((n, width), np.int64)
        for b in np.unique(b_r):
            if b:
                sel = b_r == b
                lows[sel] = read_codes(bits[sel], side, width, int(b))
        code = _LUT_SYMBOL[t_r[:, None], top_at].astype(np.int64)  # (n, P)
        step_at = np.zeros(pos.shape, np.int64)
        for t in np.unique(t_r):
            sel = t_r == t
            step_at[sel] = _step_table(int(t), width)[top_at[sel]]
        end = last + step_at[:, -1]
        if (end > row_bits).any():
            raise CodecError(f"{self.name}: Huffman codes run past the end of the row")
        bounds = np.array([_escape_bound(width, t) for t in range(len(TABLES))])[t_r]  # (n, 2): hb, E
        escape = np.array([t.escape for t in TABLES], np.int64)[t_r][:, None]
        half = np.array([t.half for t in TABLES])[t_r][:, None]
        h = code - half
        er, ec = np.nonzero(code == escape)  # escaped values: read their E-bit fields
        if er.size:
            esc_bits = bounds[er, 1]
            at = pos[er, ec] + step_at[er, ec] - esc_bits  # field start
            j = np.arange(int(esc_bits.max()))[None, :]
            raw_bits = np.where(j < esc_bits[:, None], bits[er[:, None], np.minimum(at[:, None] + j, row_bits - 1)], 0)
            field = (raw_bits.astype(np.int64) << np.maximum(esc_bits[:, None] - 1 - j, 0)).sum(axis=1)
            escaped_h = field - bounds[er, 0] - 1
            direct = (escaped_h >= -half[er, 0]) & (escaped_h < half[er, 0])
            if (direct | (escaped_h > bounds[er, 0])).any():
                raise CodecError(f"{self.name}: escaped value that the table codes directly or out of range")
            h[er, ec] = escaped_h
        # The bits left after the codes refine the first min(P, left) values by one bit each.
        extra = np.minimum(width, row_bits - end)  # (n,)
        col = np.arange(width)[None, :]
        refined = col < extra[:, None]
        at = np.minimum(end[:, None] + col, row_bits - 1)
        refine_bit = np.where(refined, np.take_along_axis(bits, at, axis=1), 0).astype(np.int64)
        scale = r16.view(np.float16).astype(np.float64) / np.array(SIGMAS)[t_r] / np.exp2(b_r + 1)  # (n,)
        qf = (((h << b_r[:, None]) | lows) << 1) + np.where(refined, refine_bit, 1)  # the fine code, or the mid
        return (qf + np.where(refined, 0.5, 0.0)) * scale[:, None], end + extra

    def _decode_fallback(self, bits: np.ndarray, side: int, width: int, row_bits: int
                         ) -> tuple[np.ndarray, np.ndarray]:
        """Rotated rows (n, P) and end bit (n,) of fixed-rate fallback rows ``bits`` (n, row_bits)."""
        m = read_field(bits, 3, 4) + 1
        zmax = read_field(bits, 7, 32).astype(np.uint32).view(np.float32)
        if not (np.isfinite(zmax) & (zmax >= 0)).all():
            raise CodecError(f"{self.name}: corrupt fallback scale (NaN, inf or negative)")
        end = side + width * m
        if (end > row_bits).any():
            raise CodecError(f"{self.name}: {int(m.max())}-bit fallback codes do not fit the row")
        z = np.zeros((len(bits), width), np.float64)
        for mm in np.unique(m):
            sel = m == mm
            codes = read_codes(bits[sel], side, width, int(mm))
            step = 2 * zmax[sel].astype(np.float64) / 2.0**mm
            z[sel] = (codes - 2 ** (int(mm) - 1) + 0.5) * step[:, None]
        return z, end
