"""Block quantisation numerics of the device weight variants (see splitllm_export.variants.quantize).

Every function takes a float weight (K, N) as a MatMul multiplies it (x @ W) and returns it in
MatMulNBits' layout: one row per output column, blocks of ``block`` values along K.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = ["dequantize_sym", "dequantize_zp", "quantize_asym", "quantize_sym", "quantize_sym8", "quantize_zp"]

def _by_block(w_kn: np.ndarray, block: int) -> np.ndarray:
    """(K, N) weight -> (N, K/block, block): the MatMulNBits layout, one row per output column."""
    k, n = w_kn.shape
    return np.ascontiguousarray(w_kn.T, dtype=np.float32).reshape(n, k // block, block)


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Codes along the last axis, two 4-bit codes per byte, low nibble first (8-bit codes as they are)."""
    return q[..., 0::2] | (q[..., 1::2] << 4) if bits == 4 else q


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """The codes :func:`_pack` stored, along the last axis."""
    if bits != 4:
        return packed
    return np.stack([packed & 15, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def _dequantize(q: np.ndarray, z: np.ndarray, d: np.ndarray, k: int) -> np.ndarray:
    """(K, N) float32 from codes q (N, K/block, block), zero points z and scales d (N, K/block)."""
    n = d.shape[0]
    return np.ascontiguousarray(((q.astype(np.float32) - z[..., None]) * d[..., None]).reshape(n, k).T)


def quantize_sym8(w_kn: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0-style: q = round(w / d), d = max|w| / 127 per block. Returns (B uint8 q+128, d (N, K/block))."""
    x = _by_block(w_kn, block)
    d = np.abs(x).max(axis=-1) / np.float32(127)
    inv = np.divide(1, d, out=np.zeros_like(d), where=d > 0)
    q = np.clip(np.rint(x * inv[..., None]), -127, 127)
    return (q + 128).astype(np.uint8), d.astype(np.float32)


def quantize_asym(w_kn: np.ndarray, block: int, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1-style: q = round((w - m) / d), m = block min, d = (max - min) / (2**bits - 1).

    Returns (B (N, K/block, block*bits/8) uint8, 4-bit codes two per byte, low nibble first;
    d (N, K/block); offsets m + 2**(bits-1) d (N, K/block): the term that MatMulNBits' implicit
    zero point 2**(bits-1) leaves out). A Q4_1 block is exact in both widths (q8 = 17 q4).
    """
    x = _by_block(w_kn, block)
    lo, hi = x.min(axis=-1), x.max(axis=-1)
    d = (hi - lo) / np.float32(2**bits - 1)
    inv = np.divide(1, d, out=np.zeros_like(d), where=d > 0)
    q = np.clip(np.rint((x - lo[..., None]) * inv[..., None]), 0, 2**bits - 1).astype(np.uint8)
    return _pack(q, bits), d.astype(np.float32), (lo + 2 ** (bits - 1) * d).astype(np.float32)


def _least_error(x: np.ndarray, weight: np.ndarray,
                 grids: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Of candidate grids per block, the one with the least ``weight``-ed squared error.

    Each candidate is (scale d, integer levels c with w ~ d * c, stored codes q, zero points z),
    arrays over (N, K/block, ...); each is tried with its own scale and with the least-squares
    scale for its levels. Returns the winners' (d (N, K/block, 1), q (N, K/block, block) uint8,
    z (N, K/block, 1)).
    """
    best_err = np.full(x.shape[:-1] + (1,), np.inf)
    best_d = np.zeros_like(best_err)
    best_z = np.zeros_like(best_err)
    best_q = np.zeros(x.shape, np.uint8)
    for d, c, q, z in grids:
        denom = (weight * c * c).sum(axis=-1, keepdims=True)
        d_ls = np.where(denom > 0, (weight * x * c).sum(axis=-1, keepdims=True) / np.where(denom > 0, denom, 1), d)
        for scale in (d, d_ls):
            err = (weight * (scale * c - x) ** 2).sum(axis=-1, keepdims=True)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_d = np.where(better, scale, best_d)
            best_z = np.where(better, z, best_z)
            best_q = np.where(better, q, best_q).astype(np.uint8)
    return best_d, best_q, best_z


def quantize_zp(w_kn: np.ndarray, block: int, bits: int,
                importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric with an integer zero point: w ~ d * (q - z), q and z in 0..2**bits - 1.

    Per block, candidate scales (max - min) / (levels - 1 + delta) are tried, each with its best
    zero point and a least-squares refit of the scale for the codes it gives; the pair with the
    least squared error wins. On a Q4_1 GGUF (blocks m + d q) plain min/max rounding would shift
    every weight of a block by the same up-to-d/2; the search finds grids that fit better.
    ``importance`` (K,), when given, weights each input row's squared error (E[A_k^2] of the
    activations that multiply it), so the search favours the rows that move the output most.
    Returns (B packed as quantize_asym, d (N, K/block) float32, zero points packed two per byte
    low nibble first for 4 bits, (N, ceil(K/block / 2)) uint8; one per byte for 8 bits).
    """
    x = _by_block(w_kn, block).astype(np.float64)  # (N, nb, block)
    weight = np.ones(x.shape[1:]) if importance is None else np.asarray(importance, np.float64).reshape(x.shape[1:])
    top = 2**bits - 1
    lo, hi = x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)

    def grids() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        for delta in (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0):
            d = (hi - lo) / (top + delta)
            d = np.where(d > 0, d, 1.0)
            z = np.clip(np.rint(-lo / d), 0, top)
            q = np.clip(np.rint(x / d) + z, 0, top)
            yield d, q - z, q, z

    best_d, q, best_z = _least_error(x, weight, grids())
    z = best_z[..., 0].astype(np.uint8)  # (N, nb)
    if bits == 4 and z.shape[1] % 2:
        z = np.concatenate([z, np.zeros((z.shape[0], 1), np.uint8)], axis=1)
    return _pack(q, bits), best_d[..., 0].astype(np.float32), np.ascontiguousarray(_pack(z, bits))


def quantize_sym(w_kn: np.ndarray, block: int, bits: int,
                 importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric: w ~ d * (q - 2**(bits-1)), q in 0..2**bits - 1, MatMulNBits' implicit zero point.

    Why: a zero-point input costs ONNX Runtime's int4 kernel (accuracy level 4) up to a tenth of
    a decode step (``benchmarks/local_step.py``, docs/bundle.md), and a block of real weights
    is nearly centred. Per block, scales max|w| / (2**(bits-1) - 1 + delta) are tried with a
    least-squares refit for the codes each gives, the least (``importance``-weighted, as in
    :func:`quantize_zp`) squared error wins. Returns (B packed as quantize_asym, d (N, K/block)).
    """
    x = _by_block(w_kn, block).astype(np.float64)
    weight = np.ones(x.shape[1:]) if importance is None else np.asarray(importance, np.float64).reshape(x.shape[1:])
    half = 2 ** (bits - 1)
    amax = np.abs(x).max(axis=-1, keepdims=True)
    zero = np.zeros_like(amax)

    def grids() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        for delta in (-0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0):
            d = amax / (half - 1 + delta)
            d = np.where(d > 0, d, 1.0)
            c = np.clip(np.rint(x / d), -half, half - 1)
            yield d, c, c + half, zero

    best_d, q, _ = _least_error(x, weight, grids())
    return np.ascontiguousarray(_pack(q, bits)), best_d[..., 0].astype(np.float32)


def dequantize_sym(packed: np.ndarray, d: np.ndarray, k: int, bits: int) -> np.ndarray:
    """The (K, N) float32 weight that quantize_sym's output stands for."""
    return _dequantize(_unpack(packed, bits), np.full(d.shape, 2 ** (bits - 1), np.float32), d, k)


def dequantize_zp(packed: np.ndarray, d: np.ndarray, zp: np.ndarray, k: int, bits: int) -> np.ndarray:
    """The (K, N) float32 weight that quantize_zp's output stands for."""
    return _dequantize(_unpack(packed, bits), _unpack(zp, bits)[:, :d.shape[1]], d, k)
