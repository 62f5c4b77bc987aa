"""Reading GGUF files: chosen metadata straight from the header (the architecture, the vocabulary),
and one parse shared by a whole load.

Why one parse: transformers' own GGUF loading (``from_pretrained(..., gguf_file=...)`` for the
tokenizer and for the model) runs its converter ``load_gguf_checkpoint`` four times (a config for
each, the tokenizer, the weights), and each run parses the file with ``gguf.GGUFReader``, which
slices a numpy memmap per metadata element: ~26 s per parse for Gemma 3's 262,144-entry vocabulary
on a loaded 2-core machine, against ~6 s through a plain ndarray view of the same mapping.

:class:`GGUFParse` parses once with such a reader and runs transformers' converter against that
parse: the converter takes a path and imports ``GGUFReader`` from ``gguf`` when called, so it is
called through a copy whose ``gguf`` import (and only that one, for that one call) yields the
parse. No module is modified; other code in the process keeps the ``gguf`` it imported. Should a
transformers version import ``gguf`` elsewhere, its converter would parse the file itself: slower,
same result. Nothing here builds a model; :mod:`splitllm_export.sources.gguf_model` does.
"""

from __future__ import annotations

import builtins
import struct
import types
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from splitllm.errors import ModelSourceError

# GGUF metadata value types: the scalars by their numpy type, then string and array.
_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
            12: "<f8"}
_STRING, _ARRAY = 8, 9


def _string(f: BinaryIO) -> bytes:
    (size,) = struct.unpack("<Q", f.read(8))
    data = f.read(size)
    if len(data) != size:
        raise ValueError("a string runs past the end of the file")
    return data


def _value(f: BinaryIO, kind: int, keep: bool) -> Any:
    """Read (``keep``) or skip one metadata value of GGUF type ``kind``."""
    if kind in _SCALARS:
        dtype = np.dtype(_SCALARS[kind])
        raw = f.read(dtype.itemsize)
        return np.frombuffer(raw, dtype)[0].item() if keep else None
    if kind == _STRING:
        data = _string(f)
        return data.decode("utf-8") if keep else None
    if kind == _ARRAY:
        inner, count = struct.unpack("<IQ", f.read(12))
        if inner not in _SCALARS:
            items = [_value(f, inner, keep) for _ in range(count)]
            return items if keep else None
        dtype = np.dtype(_SCALARS[inner])
        if not keep:
            f.seek(dtype.itemsize * count, 1)
            return None
        raw = f.read(dtype.itemsize * count)
        if len(raw) != dtype.itemsize * count:
            raise ValueError("an array runs past the end of the file")
        return np.frombuffer(raw, dtype).copy()
    raise ValueError(f"unknown metadata type {kind}")


def read_gguf_metadata(path: Path, keys: Iterable[str]) -> dict[str, Any]:
    """The values of ``keys`` in a GGUF's metadata (those it has), read straight from its header.

    Under a second even for Gemma 3's 262,144-entry vocabulary (0.5 s here), where a full parse
    takes tens of seconds. Raises ModelSourceError for a file that is not a readable GGUF.
    """
    wanted = set(keys)
    found: dict[str, Any] = {}
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
            if magic != b"GGUF":
                raise ModelSourceError(f"{path} is not a GGUF file (bad magic {magic!r})")
            try:
                _version, _tensors, n_kv = struct.unpack("<IQQ", f.read(20))
                for _ in range(n_kv):
                    key = _string(f).decode("utf-8")
                    (kind,) = struct.unpack("<I", f.read(4))
                    value = _value(f, kind, key in wanted)
                    if key in wanted:
                        found[key] = value
                        if len(found) == len(wanted):
                            break
            except (struct.error, ValueError, UnicodeDecodeError) as exc:
                raise ModelSourceError(f"{path} is a damaged GGUF file: {exc}") from exc
    except OSError as exc:
        raise ModelSourceError(f"cannot read GGUF file {path}: {exc}") from exc
    return found


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF, read from its header without parsing the rest."""
    arch = read_gguf_metadata(path, ["general.architecture"]).get("general.architecture")
    if not isinstance(arch, str):
        raise ModelSourceError(f"{path} is a damaged GGUF file: no general.architecture")
    return arch


class GGUFParse:
    """One parse of the GGUF at ``path``, read as transformers reads it, as often as a load needs.

    ``metadata()`` is transformers' ``config``, ``tokenizer`` and ``tokenizer_config`` dicts;
    ``tensors(skeleton)`` the weights dequantized to fp32 torch tensors under ``skeleton``'s
    parameter names. The file is parsed on the first call only.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._reader: Any = None

    def metadata(self) -> dict[str, Any]:
        return self._convert(return_tensors=False)

    def tensors(self, skeleton: Any) -> dict[str, Any]:
        """``skeleton``: a transformers model of the GGUF's config (meta device: only names are read)."""
        tensors: dict[str, Any] = self._convert(return_tensors=True, model_to_load=skeleton)["tensors"]
        return tensors

    def reader(self) -> Any:
        """The parse: a ``gguf.GGUFReader`` whose data is a plain ndarray over the file's mapping."""
        if self._reader is None:
            self._reader = _plain_reader_class()(self.path)
        return self._reader

    def _convert(self, **kwargs: Any) -> dict[str, Any]:
        """transformers' ``load_gguf_checkpoint`` run against this parse (see the module doc)."""
        import gguf
        from transformers import modeling_gguf_pytorch_utils as hf_gguf

        parse = self.reader()
        view = types.SimpleNamespace(**{**vars(gguf), "GGUFReader": lambda *_args, **_kwargs: parse})

        def scoped_import(name: str, globals_: Any = None, locals_: Any = None, fromlist: Any = (),
                          level: int = 0) -> Any:
            if name == "gguf" and level == 0:
                return view
            return builtins.__import__(name, globals_, locals_, fromlist, level)

        original = hf_gguf.load_gguf_checkpoint
        scope = {**vars(hf_gguf), "__builtins__": {**vars(builtins), "__import__": scoped_import}}
        convert = types.FunctionType(original.__code__, scope, original.__name__, original.__defaults__,
                                     original.__closure__)
        parsed: dict[str, Any] = convert(str(self.path), **kwargs)
        return parsed


def _plain_reader_class() -> type:
    """``gguf.GGUFReader`` reading through a plain ndarray view of its memmap (no per-slice memmaps)."""
    import gguf
    import numpy as np

    class PlainReader(gguf.GGUFReader):  # type: ignore[misc]
        @property
        def data(self) -> Any:
            return self._plain

        @data.setter
        def data(self, value: Any) -> None:
            self._plain = np.asarray(value)

    return PlainReader
