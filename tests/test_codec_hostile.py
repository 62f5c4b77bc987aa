"""Hostile activation payloads: every input benchmarks/fuzz.py ever found, and the bounds that
make a small payload cost at most a small multiple of the tensor it declares.

The two hex inputs are the fuzzer's seeds 2 and 7 (docs/codec-limits.md): shapes with a zero dim
and 2**32 or more rows, which the old rotated decoder looped over for seconds and then asked
32 GiB (2 EiB) of. Memory is measured with tracemalloc, which numpy reports to.
"""

from __future__ import annotations

import struct
import time
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
from helpers import load_benchmark

from splitllm import codec
from splitllm.errors import CodecError

fuzz = load_benchmark("fuzz")

SEED_2 = bytes.fromhex("534c41310128000205000000010000000000010000000100010000000000000000000000")
SEED_7 = bytes.fromhex("534c4131013200010400000001000000ffffffff000000040000000000000000")
BASE_CODECS = [name for name in codec.CODECS if not name.endswith("+zstd")]


def _peak_bytes(call: Callable[[], object]) -> tuple[object, int]:
    tracemalloc.start()
    try:
        result = call()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _header(codec_id: int, shape: tuple[int, ...], body: bytes = b"", flags: int = 0) -> bytes:
    fixed = struct.pack("<4sBBBBB3s", b"SLA1", 1, codec_id, flags, 1, len(shape), b"\0\0\0")
    return fixed + struct.pack(f"<{len(shape)}II", *shape, len(body)) + body


@pytest.mark.parametrize(("payload", "shape"), [(SEED_2, (1, 65536, 65536, 1, 0)),
                                                (SEED_7, (1, 2**32 - 1, 2**26, 0))])
def test_found_inputs_decode_to_empty_tensors_at_once(payload, shape):
    began = time.perf_counter()
    out, peak = _peak_bytes(lambda: codec.decode(payload))
    assert isinstance(out, np.ndarray) and out.shape == shape and out.dtype == np.float32
    assert peak < 2**16, peak  # nothing sized by the 2**32 rows
    assert time.perf_counter() - began < 5.0  # was 9-15 s, then a MemoryError


@pytest.mark.parametrize("name", BASE_CODECS)
@pytest.mark.parametrize("shape", [(2**32 - 1, 2**16, 0), (2**16, 2**16, 0, 1), (0, 2**32 - 1, 64)])
def test_empty_tensors_with_huge_other_dims_cost_nothing_in_every_codec(name, shape):
    payload = _header(codec.get_codec(name).id, shape)
    out, peak = _peak_bytes(lambda: codec.decode(payload))
    assert isinstance(out, np.ndarray) and out.shape == shape
    assert peak < 2**16, (name, shape, peak)


def test_the_issues_amplification_case_stays_within_16x():
    """A 115-byte hadamard-int5-block64-o2+zstd payload of a (16384, 1) tensor peaked at 13.8 MiB
    (221x): its rows are padded to 64 values and were decoded all at once."""
    payload = codec.encode(np.zeros((16384, 1), np.float32), "hadamard-int5-block64-o2+zstd")
    assert len(payload) == 115
    out, peak = _peak_bytes(lambda: codec.decode(payload))
    assert isinstance(out, np.ndarray)
    assert peak <= 16 * (out.nbytes + len(payload)), peak / (out.nbytes + len(payload))


def test_every_codec_and_shape_within_its_amplification_limit():
    """16x for every codec but ec*, whose stated limit is 48x (fuzz.amplification says why)."""
    table, tally = fuzz.amplification(limit=16.0, rows=4096)
    assert not [f.show() for f in tally.findings.values()]
    assert {r["limit"] for r in table if not r["codec"].startswith("ec")} == {16.0}
    assert {r["limit"] for r in table if r["codec"].startswith("ec")} == {fuzz.EC_AMPLIFICATION_LIMIT}


@pytest.mark.parametrize("name", ["hadamard-int6-block64+zstd", "ec5+zstd", "int4-block64-o2+zstd"])
def test_decode_memory_grows_linearly_with_the_declared_tensor(name):
    """Padded rows decoded a batch at a time: 16x the rows costs about 16x the memory, not more."""
    peaks = []
    for rows in (4096, 65536):
        payload = codec.encode(np.zeros((rows, 1), np.float32), name)
        peaks.append(_peak_bytes(lambda payload=payload: codec.decode(payload))[1])
    assert peaks[1] <= 20 * peaks[0], peaks


def test_a_row_longer_than_the_codec_takes_is_refused_before_zstd_runs():
    too_long = codec.get_codec("hadamard-int5-block64").id
    payload = _header(too_long, (1, 2**18 + 1), b"\x28\xb5\x2f\xfd" + bytes(8), flags=1)
    with pytest.raises(CodecError, match="at most"):
        codec.decode(payload)


def test_unsigned_outlier_indices_out_of_order_are_refused():
    """Indices are read as uint16: a decreasing pair must not wrap around to look increasing."""
    good = bytearray(codec.encode(np.arange(1, 129, dtype=np.float32).reshape(1, 128), "hadamard-int5-block64-o2"))
    head = len(good) - codec.get_codec("hadamard-int5-block64-o2").raw_size((1, 128))
    good[head : head + 4] = struct.pack("<HH", 9, 3)
    with pytest.raises(CodecError, match="outlier indices"):
        codec.decode(bytes(good))
