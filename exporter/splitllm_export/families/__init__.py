"""One module per architecture, each defining ``SPEC`` (an :class:`~splitllm_export.graphs.arch.ArchSpec`).

Adding a family: write ``families/<name>.py`` with its SPEC (tensor names, norms, attention,
rotary, sliding windows, fused-kernel use, tiny config, GGUF name) and list it in ``FAMILIES``.
"""

from __future__ import annotations

from splitllm_export.families import gemma3, gpt2, llama, mistral, phi3, qwen2, qwen3
from splitllm_export.graphs.arch import ArchSpec

FAMILIES: tuple[ArchSpec, ...] = (llama.SPEC, gpt2.SPEC, qwen2.SPEC, qwen3.SPEC, mistral.SPEC, phi3.SPEC, gemma3.SPEC)
