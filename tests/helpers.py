"""Small helpers shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import socket


def chat_ids(source, text: str) -> list[int]:
    """Token ids of one user message through the model's chat template (transformers' own)."""
    return source.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                                add_generation_prompt=True)


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
