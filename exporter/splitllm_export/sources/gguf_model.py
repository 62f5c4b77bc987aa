"""A model from a GGUF file (the built-in models are GGUF files too), dequantized to fp32."""

from __future__ import annotations

import os
from pathlib import Path

from splitllm.errors import ModelSourceError
from splitllm_export.graphs.registry import check_gguf_arch, spec_for
from splitllm_export.sources import Source
from splitllm_export.sources.gguf_reader import gguf_architecture, one_gguf_parse


def load_gguf(path: str | os.PathLike[str], model_id: str | None = None) -> Source:
    """A GGUF of a registered family as an fp32 transformers model and its tokenizer.

    ``model_id`` (default: the file's stem) is the manifest's model id. UnsupportedArchitecture
    for an unregistered ``general.architecture``; ModelSourceError for anything unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelSourceError(f"no GGUF file at {path}")
    arch = gguf_architecture(path)
    check_gguf_arch(arch)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        with one_gguf_parse():
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for unreadable checkpoints
        raise ModelSourceError(f"transformers could not load GGUF {path}: {exc}") from exc
    spec_for(model.config)
    model.eval()
    return Source(model, tokenizer, {"kind": "gguf", "file": path.name, "id": model_id or path.stem})
