"""Activation codecs: round trips, error bounds, the wire layout, and hostile payloads."""

from __future__ import annotations

import re
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitllm import codec
from splitllm.errors import CodecError, ConfigError, SplitLLMError, UnknownCodec

SHAPES = [(1, 1, 576), (1, 7, 576), (2, 3, 100), (1, 0, 576), (5,), (130,), (3, 4, 5), ()]
BASE = [name for name in codec.CODECS if not name.endswith("+zstd")]
INT_BLOCK = [name for name in BASE if name.startswith("int")]


def _tensor(shape: tuple[int, ...], seed: int = 0, scale: float = 3.0) -> np.ndarray:
    return np.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, dtype=np.float32)


def _payload(
    codec_id: int,
    shape: tuple[int, ...],
    body: bytes,
    *,
    flags: int = 0,
    dtype: int = 1,
    magic: bytes = b"SLA1",
    version: int = 1,
    body_len: int | None = None,
) -> bytes:
    """A payload built from the documented layout, independently of the encoder."""
    head = struct.pack("<4sBBBBB3x", magic, version, codec_id, flags, dtype, len(shape))
    n = len(body) if body_len is None else body_len
    return head + struct.pack(f"<{len(shape)}II", *shape, n) + body


def test_names_and_wire_ids_are_stable():
    assert codec.codec_names() == codec.CODECS
    required = ["fp32", "fp16", "int8-block32", "int8-block64", "int8-block128"]
    for name in required:
        assert name in codec.CODECS and f"{name}+zstd" in codec.CODECS
    ids = {name: codec.get_codec(name).id for name in codec.CODECS}
    assert ids["fp32"] == 1 and ids["fp16"] == 2 and ids["int8-block64"] == 11
    assert ids["int8-block64+zstd"] == 11
    assert len(set(ids[n] for n in BASE)) == len(BASE)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(UnknownCodec) as info:
        codec.get_codec("nope")
    assert "nope" in str(info.value) and "int8-block64+zstd" in str(info.value)
    with pytest.raises(UnknownCodec):
        codec.encode(np.zeros(3, np.float32), "int8")


def test_bits_per_value_and_lossless_flags():
    assert codec.get_codec("int8-block64").bits_per_value == 8.25
    assert codec.get_codec("int8-block32+zstd").bits_per_value == 8.5
    assert codec.get_codec("fp16").bits_per_value == 16
    assert codec.get_codec("fp32").lossless and not codec.get_codec("fp16").lossless
    body = len(codec.encode(_tensor((4, 576)), "int8-block64")) - 24  # 12 fixed, 2 dims, length
    assert body * 8 / (4 * 576) == 8.25


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_round_trip_is_bitwise(shape):
    x = _tensor(shape)
    y = codec.decode(codec.encode(x))
    assert y.dtype == np.float32 and y.shape == x.shape and y.flags.c_contiguous and y.flags.writeable
    assert y.tobytes() == x.tobytes()


@pytest.mark.parametrize("shape", SHAPES)
def test_fp16_error_is_half_an_ulp(shape):
    x = _tensor(shape)
    y = codec.decode(codec.encode(x, "fp16"))
    assert y.shape == x.shape
    assert np.all(np.abs(y - x) <= np.maximum(np.abs(x) * 2.0**-11, 2.0**-25))


def _block_bound(x: np.ndarray, block: int, qmax: int) -> np.ndarray:
    """Per-value error bound: half the block's scale, scale rounded up to float16."""
    cols = x.shape[-1] if x.ndim else 1
    rows = x.reshape(x.size // cols if cols else 0, cols)
    width = -(-rows.shape[1] // block) * block
    padded = np.zeros((rows.shape[0], width), np.float32)
    padded[:, : rows.shape[1]] = rows
    amax = np.abs(padded.reshape(rows.shape[0], width // block, block)).max(axis=-1, initial=0)
    scale = amax / qmax * (1 + 2.0**-10) + 2.0**-24  # fp16 rounding up (+ subnormal step)
    per_value = np.repeat(scale, block, axis=1)[:, : rows.shape[1]]
    return (per_value / 2 * (1 + 1e-6)).reshape(x.shape)


@pytest.mark.parametrize("name", INT_BLOCK)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("magnitude", [3.0, 1e-6])  # 1e-6: subnormal float16 scales
def test_int_block_error_is_within_half_a_scale(name, shape, magnitude):
    c = codec.get_codec(name)
    x = _tensor(shape, seed=1, scale=magnitude)
    x.reshape(-1)[:3] *= 50  # an outlier block next to ordinary ones
    y = c.decode(c.encode(x))
    assert y.shape == x.shape and y.dtype == np.float32 and y.flags.c_contiguous and y.flags.writeable
    assert np.all(np.abs(y - x) <= _block_bound(x, c.block, c.qmax))


@pytest.mark.parametrize("name", INT_BLOCK)
def test_zero_blocks_decode_to_zeros_not_nan(name):
    x = np.zeros((2, 200), np.float32)
    x[1, 150:] = 1.5
    y = codec.decode(codec.encode(x, name))
    assert np.isfinite(y).all()
    assert not y[0].any() and not y[1, :128].any()


@pytest.mark.parametrize("name", BASE)
@pytest.mark.parametrize("shape", SHAPES)
def test_zstd_decodes_equal_and_sizes_hold(name, shape):
    x = _tensor(shape, seed=2)
    plain, packed = codec.encode(x, name), codec.encode(x, f"{name}+zstd")
    assert codec.decode(packed).tobytes() == codec.decode(plain).tobytes()
    assert codec.get_codec(name).encoded_size(shape) == len(plain)
    assert codec.get_codec(f"{name}+zstd").encoded_size(shape) >= len(packed)


def test_encoded_size_rejects_bad_shapes():
    assert codec.get_codec("fp16").encoded_size(np.array([2, 3])) == 12 + 8 + 4 + 12
    for bad in [(-1, 4), (1,) * 9, (2**32,), (1.5,)]:
        with pytest.raises(ConfigError):
            codec.get_codec("fp16").encoded_size(bad)


def test_input_dtypes_and_layouts():
    x = _tensor((3, 70))
    for variant in (x.astype(np.float64), x.astype(">f4"), np.asfortranarray(x), x[:, ::-1].copy()):
        assert codec.decode(codec.encode(variant)).tobytes() == variant.astype(np.float32).tobytes()
    assert codec.read_header(codec.encode(x.astype(np.float16), "fp16")).dtype == "float16"
    header = codec.read_header(codec.encode(x, "int8-block64+zstd"))
    assert header.codec == "int8-block64+zstd" and header.shape == (3, 70)


@pytest.mark.parametrize("name", ["fp32", "fp16", "int8-block64", "int4-block64+zstd"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_refused(name, bad):
    x = _tensor((1, 1, 576))
    x[0, 0, 7] = bad
    with pytest.raises(CodecError, match=re.escape(name) + ".*non-finite"):
        codec.encode(x, name)


def test_unrepresentable_input_is_refused():
    with pytest.raises(CodecError, match="fp32.*non-finite"):
        codec.encode(np.array([1e300]), "fp32")  # float64 beyond float32 range
    with pytest.raises(CodecError, match="float16 range"):
        codec.encode(np.array([7e4], np.float32), "fp16")
    with pytest.raises(CodecError, match="scale"):
        codec.encode(np.array([1e10], np.float32), "int8-block64")
    for not_float in (np.arange(4), [1.0, 2.0], np.zeros((1,) * 9, np.float32)):
        with pytest.raises(CodecError):
            codec.encode(not_float)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["fp32", "fp16+zstd", "int8-block64", "int8-block64+zstd", "int6-block64"])
def test_every_truncation_is_refused(name):
    payload = codec.encode(_tensor((2, 3, 100)), name)
    for n in range(len(payload)):
        with pytest.raises(CodecError):
            codec.decode(payload[:n])


def test_header_corruptions_are_refused_with_reasons():
    good = codec.encode(_tensor((1, 1, 576)), "int8-block64")
    with pytest.raises(CodecError, match="magic"):
        codec.decode(b"XLA1" + good[4:])
    with pytest.raises(CodecError, match="version"):
        codec.decode(good[:4] + b"\x02" + good[5:])
    with pytest.raises(CodecError, match="flags"):
        codec.decode(good[:6] + b"\x80" + good[7:])
    with pytest.raises(CodecError, match="reserved"):
        codec.decode(good[:10] + b"\x01" + good[11:])
    with pytest.raises(CodecError, match="trailing bytes: header says 594 body bytes, got 595"):
        codec.decode(good + b"\0")
    with pytest.raises(CodecError, match="truncated payload: header says 594 body bytes, got 100"):
        codec.decode(good[:-494])
    with pytest.raises(UnknownCodec, match="99.*11=int8-block64"):
        codec.decode(_payload(99, (4,), bytes(16)))
    with pytest.raises(CodecError, match="dtype"):
        codec.decode(_payload(1, (4,), bytes(16), dtype=9))
    with pytest.raises(CodecError, match="dims"):
        codec.decode(_payload(1, (1,) * 9, bytes(4)))
    with pytest.raises(CodecError):
        codec.decode("not bytes")  # type: ignore[arg-type]


def test_size_claims_are_checked_before_allocating():
    with pytest.raises(CodecError, match="needs 4294967292 body bytes"):
        codec.decode(_payload(1, (2**30 - 1, 1), bytes(16)), max_elements=2**31)
    with pytest.raises(CodecError, match="limit"):
        codec.decode(_payload(1, (2**32 - 1,) * 8, bytes(16)))
    with pytest.raises(CodecError, match="limit is 100"):
        codec.decode(codec.encode(_tensor((1, 2, 64))), max_elements=100)
    assert codec.decode(codec.encode(_tensor((1, 2, 50))), max_elements=100).shape == (1, 2, 50)
    with pytest.raises(ConfigError):
        codec.decode(codec.encode(_tensor((3,))), max_elements=-1)


def test_zstd_bodies_are_checked():
    zstd = zstandard.ZstdCompressor(level=3)
    with pytest.raises(CodecError, match="zstd"):
        codec.decode(_payload(1, (4,), b"\x28\xb5\x2f\xfd garbage", flags=1))
    bomb = zstd.compress(bytes(50_000_000))  # 1.5 kB
    with pytest.raises(CodecError, match="needs 16 body bytes, header says"):
        codec.decode(_payload(1, (4,), bomb, flags=1))  # longer than zstd's bound for 16 bytes
    with pytest.raises(CodecError, match="declares 50000000 bytes, the header's shape needs 4000"):
        codec.decode(_payload(1, (1000,), bomb, flags=1))
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(16))
    with pytest.raises(CodecError, match="declares"):
        codec.decode(_payload(1, (4,), unsized, flags=1))
    frame = zstd.compress(bytes(16))
    with pytest.raises(CodecError, match="one frame"):
        codec.decode(_payload(1, (4,), frame + frame, flags=1))
    assert not codec.decode(_payload(1, (4,), frame, flags=1)).any()


def test_body_values_no_encoder_writes_are_refused():
    nan32 = struct.pack("<4f", 1, 2, float("nan"), 4)
    with pytest.raises(CodecError, match="NaN"):
        codec.decode(_payload(1, (4,), nan32))
    with pytest.raises(CodecError, match="NaN"):
        codec.decode(_payload(2, (2,), struct.pack("<2e", 1, float("inf"))))
    scales = {"inf": b"\x00\x7c", "nan": b"\x00\x7e", "negative": b"\x00\xbc"}
    for bad in scales.values():
        with pytest.raises(CodecError, match="scales"):
            codec.decode(_payload(11, (4,), bad + bytes([127] * 4)))
    with pytest.raises(CodecError, match="code 255 out of range"):
        codec.decode(_payload(11, (4,), b"\x00\x3c" + bytes([127, 255, 0, 1])))
    with pytest.raises(CodecError, match="padding bits"):
        codec.decode(_payload(30, (3,), b"\x00\x3c" + bytes([0x77, 0x71])))
    assert codec.decode(_payload(30, (3,), b"\x00\x3c" + bytes([0x77, 0x70]))).tolist() == [0, 0, 0]


def test_codec_object_decode_insists_on_its_own_format():
    c = codec.get_codec("int8-block64")
    x = _tensor((1, 1, 64))
    assert c.decode(c.encode(x)).shape == x.shape
    with pytest.raises(CodecError, match="encoded with int8-block64\\+zstd"):
        c.decode(codec.encode(x, "int8-block64+zstd"))
    assert codec.decode(bytearray(c.encode(x))).shape == x.shape
    assert codec.decode(memoryview(c.encode(x))).shape == x.shape


def test_zstd_from_many_threads():
    x = _tensor((1, 5, 576))

    def round_trip(i: int) -> bool:
        name = ("fp16+zstd", "int8-block64+zstd")[i % 2]
        return codec.decode(codec.encode(x + i, name)).shape == x.shape

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(round_trip, range(200)))


def _check_decode_never_misbehaves(data: bytes) -> None:
    try:
        y = codec.decode(data, max_elements=1 << 16)
    except SplitLLMError:
        return
    assert y.dtype == np.float32 and y.flags.c_contiguous and np.isfinite(y).all()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data):
    _check_decode_never_misbehaves(data)
    _check_decode_never_misbehaves(b"SLA1\x01" + data)


_VALID = [codec.encode(_tensor((1, 3, 70), seed=9), name) for name in codec.CODECS]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(_VALID),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.sampled_from("sid")), max_size=4),
)
def test_fuzz_mutated_payloads(payload, edits):
    data = bytearray(payload)
    for pos, value, kind in edits:
        at = pos % (len(data) + 1)
        if kind == "s" and at < len(data):
            data[at] = value
        elif kind == "i":
            data.insert(at, value)
        elif kind == "d" and at < len(data):
            del data[at]
    _check_decode_never_misbehaves(bytes(data))
