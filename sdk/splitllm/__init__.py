"""SplitLLM client SDK: run the first layers of an LLM here, the rest on a server.

This module is the SDK's only public door; everything else is an implementation detail::

    import splitllm

    async with splitllm.SplitClient("bundles/smollm2", "http://127.0.0.1:8765", split=10) as client:
        async for piece in client.generate("Hello!"):
            print(piece.text, end="")
"""

from __future__ import annotations

from splitllm import errors
from splitllm.client import ChatSession, GenerationStats, Placement, SplitClient, TokenPiece
from splitllm.codec import codec_names, decode, encode, get_codec
from splitllm.errors import SplitLLMError
from splitllm.model.bundle import Bundle
from splitllm.model.runtime import RuntimeOptions
from splitllm.model.sampling import SamplingParams
from splitllm.planner import Plan, Policy, Problem, make_policy, solve
from splitllm.planner.profile import Profile

__version__ = "0.1.0"

__all__ = [
    "Bundle",
    "ChatSession",
    "GenerationStats",
    "Placement",
    "Plan",
    "Policy",
    "Problem",
    "Profile",
    "RuntimeOptions",
    "SamplingParams",
    "SplitClient",
    "SplitLLMError",
    "TokenPiece",
    "__version__",
    "codec_names",
    "decode",
    "encode",
    "errors",
    "get_codec",
    "make_policy",
    "solve",
]
