"""The server's KV memory: one slot per session in a preallocated pool per decoder layer.

Why a slot pool: ONNX Runtime's GroupQueryAttention reads a batch's past keys and values from one
(B, KV, capacity, D) tensor and, with past and present bound to the same buffer, appends the new
positions in place. Steps of several sessions can therefore run as one batch only if their caches
are rows of one tensor. Each layer gets a pool of shape (max_sessions, KV, max_context, D); a
session owns the same row (its *slot*) in every layer, so a batch over slots [lo, hi] is the
contiguous view ``pool[lo:hi + 1]``: no cache is copied, ever, to form a batch.

Memory: each pool is an anonymous memory map, which the kernel fills with zero pages lazily, so
it reserves address space for ``max_sessions * max_context`` positions per layer but the resident
memory follows the positions actually written (a page of 4 KiB per head at a time). Not
``np.zeros``: numpy asks the kernel for transparent huge pages on large arrays, and one position
written per slot and head then costs 2 MiB (measured: 20 pools of 64 slots with 100 positions
each, 7.6 GB resident instead of 137 MB). Resident memory is at most

    max_sessions * max_context * layers * 2 * kv_heads * head_dim * 4 bytes

(``ModelShapes.kv_bytes_per_position * layers`` per position), and in practice the sum over
sessions of their longest context, rounded up to pages. A slot that a session leaves keeps its
pages for the next session that takes it.

Rows in a batch's span whose session has no step in that batch are *idle rows*: they compute on
zeros and write one position at their layer's current length, which is past every valid
position and is overwritten by that session's next real step, so they change nothing anyone reads.
"""

from __future__ import annotations

import heapq
import mmap
from typing import Protocol

import numpy as np

from splitllm.errors import ConfigError, ContextTooLong, SessionStateError, TooManySessions
from splitllm.model.bundle import ModelShapes

__all__ = ["KVPool", "PooledKV", "SessionKV"]


class SessionKV(Protocol):
    """One session's KV store on the server, per decoder layer (*unit*): a :class:`PooledKV`
    (fused layers, batched over pool rows) or the SDK's ``KVCache`` (exported layer graphs)."""

    def length(self, unit: int) -> int:
        """Positions ``unit`` holds."""
        ...

    def get(self, unit: int) -> tuple[np.ndarray, np.ndarray]:
        """(1, KV, length, D) keys and values of ``unit``."""
        ...

    def set(self, unit: int, key: np.ndarray, value: np.ndarray) -> None:
        """Replace ``unit``'s KV with (1, KV, P, D) arrays."""
        ...

    def units(self) -> list[int]: ...

    def truncate(self, length: int, units: range | None = None) -> None:
        """Keep the first ``length`` positions of ``units`` (all by default)."""
        ...

    def drop(self, units: range) -> None: ...

    def nbytes(self) -> int:
        """Bytes the store holds for the session."""
        ...


def _lazy_zeros(shape: tuple[int, ...]) -> np.ndarray:
    """A zeroed float32 array whose pages the kernel provides only when they are written."""
    size = int(np.prod(shape)) * 4
    try:
        return np.frombuffer(mmap.mmap(-1, size), dtype=np.float32).reshape(shape)
    except (OSError, ValueError, MemoryError) as exc:
        raise ConfigError(f"cannot reserve {size / 2**30:.1f} GiB of address space for a KV pool {shape}: {exc}; "
                          "lower --max-sessions or --max-context") from exc


class KVPool:
    """Per-layer (slots, KV, positions, D) key and value pools and the valid length of every slot."""

    def __init__(self, shapes: ModelShapes, max_sessions: int, max_context: int) -> None:
        if max_sessions < 1 or max_context < 1:
            raise ConfigError(f"a KV pool needs >= 1 slot and position, got {max_sessions}, {max_context}")
        self.shapes = shapes
        self.slots = max_sessions
        # One spare position: an idle row of a full slot still has somewhere harmless to write.
        self.capacity = max_context + 1
        self.max_context = max_context
        self.lengths = np.zeros((max_sessions, shapes.num_layers + 2), dtype=np.int64)  # (slot, unit)
        self._pools: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._free = list(range(max_sessions))
        heapq.heapify(self._free)

    def pool(self, unit: int) -> tuple[np.ndarray, np.ndarray]:
        """The key and value pools of decoder layer ``unit`` (reserved on first use)."""
        held = self._pools.get(unit)
        if held is None:
            if not 1 <= unit <= self.shapes.num_layers:
                raise SessionStateError(f"unit {unit} is not a decoder layer; only layers hold KV")
            shape = (self.slots, self.shapes.num_kv_heads, self.capacity, self.shapes.head_dim)
            held = self._pools[unit] = (_lazy_zeros(shape), _lazy_zeros(shape))
        return held

    def take(self) -> int:
        """The lowest free slot, emptied (lowest first keeps live sessions close: short batch spans)."""
        if not self._free:
            raise TooManySessions(f"all {self.slots} KV slots are in use; try again later")
        slot = heapq.heappop(self._free)
        self.lengths[slot] = 0
        return slot

    def give_back(self, slot: int) -> None:
        self.lengths[slot] = 0
        heapq.heappush(self._free, slot)


class PooledKV:
    """One session's KV in its slot of a :class:`KVPool`, with the interface of ``KVCache``.

    Views returned by :meth:`get` alias the pool: they stay valid until the session's next step
    or truncation changes them, and they must not be kept across one.
    """

    def __init__(self, pool: KVPool, slot: int) -> None:
        self.pool = pool
        self.slot = slot
        self.shapes = pool.shapes

    def length(self, unit: int) -> int:
        return int(self.pool.lengths[self.slot, unit])

    def get(self, unit: int) -> tuple[np.ndarray, np.ndarray]:
        """(1, KV, length, D) views of ``unit``'s keys and values."""
        n = self.length(unit)
        if n == 0 and unit not in self.pool._pools:  # noqa: SLF001 - nothing reserved yet
            empty = np.zeros((1, self.shapes.num_kv_heads, 0, self.shapes.head_dim), dtype=np.float32)
            return empty, empty
        key, value = self.pool.pool(unit)
        return key[self.slot:self.slot + 1, :, :n], value[self.slot:self.slot + 1, :, :n]

    def set(self, unit: int, key: np.ndarray, value: np.ndarray) -> None:
        """Replace ``unit``'s KV with (1, KV, P, D) arrays (a layer moving to the server)."""
        n = int(key.shape[2])
        if n > self.pool.max_context:
            raise ContextTooLong(f"KV of {n} positions exceeds the server's context of {self.pool.max_context}")
        kpool, vpool = self.pool.pool(unit)
        kpool[self.slot, :, :n] = key[0]
        vpool[self.slot, :, :n] = value[0]
        self.pool.lengths[self.slot, unit] = n

    def units(self) -> list[int]:
        return [int(u) for u in np.nonzero(self.pool.lengths[self.slot])[0]]

    def truncate(self, length: int, units: range | None = None) -> None:
        row = self.pool.lengths[self.slot]
        if units is None:
            np.minimum(row, length, out=row)
            return
        for unit in units:
            if 0 <= unit < row.shape[0]:
                row[unit] = min(row[unit], length)

    def drop(self, units: range) -> None:
        for unit in units:
            self.pool.lengths[self.slot, unit] = 0

    def nbytes(self) -> int:
        return int(self.pool.lengths[self.slot].sum()) * self.shapes.kv_bytes_per_position
