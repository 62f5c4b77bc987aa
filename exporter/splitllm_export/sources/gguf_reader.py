"""Reading GGUF files: the architecture from the header alone, and one shared parse per load.

Nothing here builds a model; :mod:`splitllm_export.sources.gguf_model` does, through transformers.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from splitllm.errors import ModelSourceError

_GGUF_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF, read from its header without parsing the rest.

    (A full parse of the metadata takes tens of seconds for a large vocabulary.)
    """
    def skip(f: Any, kind: int) -> None:
        if kind in _GGUF_SCALAR_BYTES:
            f.seek(_GGUF_SCALAR_BYTES[kind], 1)
        elif kind == _GGUF_STRING:
            f.seek(struct.unpack("<Q", f.read(8))[0], 1)
        elif kind == _GGUF_ARRAY:
            inner, count = struct.unpack("<IQ", f.read(12))
            if inner in _GGUF_SCALAR_BYTES:
                f.seek(_GGUF_SCALAR_BYTES[inner] * count, 1)
            else:
                for _ in range(count):
                    skip(f, inner)
        else:
            raise ValueError(f"unknown metadata type {kind}")

    try:
        with open(path, "rb") as f:
            magic = f.read(4)
            if magic != b"GGUF":
                raise ModelSourceError(f"{path} is not a GGUF file (bad magic {magic!r})")
            try:
                _version, _tensors, n_kv = struct.unpack("<IQQ", f.read(20))
                for _ in range(n_kv):
                    key = f.read(struct.unpack("<Q", f.read(8))[0]).decode("utf-8")
                    kind = struct.unpack("<I", f.read(4))[0]
                    if key == "general.architecture" and kind == _GGUF_STRING:
                        return f.read(struct.unpack("<Q", f.read(8))[0]).decode("utf-8")
                    skip(f, kind)
            except (struct.error, ValueError, UnicodeDecodeError) as exc:
                raise ModelSourceError(f"{path} is a damaged GGUF file: {exc}") from exc
    except OSError as exc:
        raise ModelSourceError(f"cannot read GGUF file {path}: {exc}") from exc
    raise ModelSourceError(f"{path} is a damaged GGUF file: no general.architecture")


@contextmanager
def one_gguf_parse() -> Iterator[None]:
    """Inside: every ``gguf.GGUFReader(path)`` returns one shared, faster reader per file.

    transformers parses a GGUF's metadata from scratch for the config, the tokenizer, the model's
    config and the weights (four parses), and the ``gguf`` reader slices a numpy memmap per
    field element, which costs ~130 s for Gemma 3's 262,144-entry vocabulary on a loaded 2-core
    machine. Reading through a plain ndarray view of the same mapping takes ~30 s, and sharing
    one reader makes it one parse. Scoped to one load: the original class is restored after.
    """
    import gguf
    import numpy as np

    original = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    class _PlainReader(original):  # type: ignore[misc, valid-type]
        @property
        def data(self) -> Any:
            return self._plain

        @data.setter
        def data(self, value: Any) -> None:
            self._plain = np.asarray(value)  # the memmap's buffer, without per-slice memmap objects

    def reader(path: Any, mode: str = "r") -> Any:
        key = (str(path), mode)
        if key not in readers:
            readers[key] = _PlainReader(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original
