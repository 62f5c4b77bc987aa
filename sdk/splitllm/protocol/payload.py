"""What a Run carries and how each side reads it, written once for both.

A range that starts at unit 0 (the embeddings) takes token ids, sent as int32 little-endian;
any other range takes hidden states (1, T, H), sent with the session's activation codec. The
receiver checks the shape from the codec header before decoding allocates anything.
"""

from __future__ import annotations

import numpy as np

from splitllm import codec as codecs
from splitllm.errors import FrameError, InvalidToken
from splitllm.model.bundle import ModelShapes
from splitllm.protocol import wire

__all__ = ["check_shape", "decode_run_input", "encode_run_input"]


def encode_run_input(x: np.ndarray, start: int, codec: str) -> bytes:
    """The Run payload for ``x``: ids (1, T) as int32 from unit 0, else hidden (1, T, H) encoded."""
    if start == 0:
        return np.asarray(x).astype("<i4").tobytes()
    return codecs.encode(x, codec)


def check_shape(what: str, payload: bytes, expected: tuple[int, ...]) -> None:
    """Refuse a payload of the wrong shape from its header, before decoding allocates anything."""
    shape = tuple(codecs.read_header(payload).shape)
    if shape != expected:
        raise FrameError(f"{what} has shape {shape}; expected {expected}")


def decode_run_input(msg: wire.Run, shapes: ModelShapes) -> np.ndarray:
    """The input a Run carries: int64 ids (1, T) from unit 0, else float32 hidden (1, T, H).

    InvalidToken names an id outside the vocabulary; FrameError a payload of the wrong shape.
    """
    if msg.start == 0:
        ids = np.frombuffer(msg.payload, dtype="<i4").astype(np.int64)
        bad = ids[(ids < 0) | (ids >= shapes.vocab_size)]
        if bad.size:
            raise InvalidToken(f"token id {int(bad[0])} is outside the vocabulary of {shapes.vocab_size}")
        return ids.reshape(1, msg.n_tokens)
    expected = (1, msg.n_tokens, shapes.hidden_size)
    check_shape("Run payload", msg.payload, expected)
    return codecs.decode(msg.payload, max_elements=msg.n_tokens * shapes.hidden_size)
