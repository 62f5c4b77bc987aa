"""One module per architecture, each defining ``SPEC`` (an :class:`~splitllm_export.arch.ArchSpec`).

Adding a family: write ``families/<name>.py`` with its SPEC (tensor names, norms, attention,
rotary, sliding windows, fused-kernel use, tiny config, GGUF name) and list it in ``FAMILIES``.
"""

from __future__ import annotations

from splitllm_export.arch import ArchSpec
from splitllm_export.families import gpt2, llama

FAMILIES: tuple[ArchSpec, ...] = (llama.SPEC, gpt2.SPEC)
