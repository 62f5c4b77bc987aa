"""A model from a transformers checkpoint directory (config.json, weights, tokenizer files)."""

from __future__ import annotations

import os
from pathlib import Path

from splitllm.errors import ModelSourceError
from splitllm_export.graphs.registry import spec_for
from splitllm_export.sources import Source


def load_hf(directory: str | os.PathLike[str]) -> Source:
    """A transformers checkpoint directory of a registered family, in fp32 (the family checked first)."""
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
