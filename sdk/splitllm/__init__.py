"""SplitLLM client SDK: run the first layers of an LLM here, the rest on a server.

This module is the SDK's only public door; every other ``splitllm.<module>`` is an implementation
detail that may change without notice (``splitllm.errors`` and ``splitllm.testing`` are public
too)::

    import splitllm

    async with splitllm.SplitClient("bundles/smollm2", "http://127.0.0.1:8765", split=10) as client:
        async for piece in client.generate("Hello!"):
            print(piece.text, end="")
        stats = client.last_stats
        print(f"first token {stats.ttft_ms:.0f} ms, then {stats.decode_tokens_per_s:.1f} tok/s")

The names, by what they are for:

- Generating: :class:`SplitClient` (one conversation whose layers run here and on a server),
  :class:`ChatSession` (``client.chat()``: turns that keep their KV on both sides),
  :class:`TokenPiece` (what a generation yields), :class:`GenerationStats` (``client.last_stats``:
  tokens, ``ttft_ms``, ``decode_tokens_per_s``, the placement it ended with),
  :class:`SamplingParams`, :class:`RuntimeOptions` (ONNX Runtime threads and providers).
- The model: :class:`Bundle` (``Bundle.open(path)``: an exported model, hashed and checked).
- Where layers run: :class:`Placement` (a side per unit; ``Placement.for_split(k, units)``),
  :func:`load_or_measure` (this device's :class:`Profile` of unit timings, cached), and the
  planner's :class:`Problem`, :func:`solve`, :class:`Plan`, :class:`Policy`, :func:`make_policy`.
- Activation codecs: :func:`codec_names`, :func:`get_codec`, :func:`encode`, :func:`decode`.
- A terminal UI: :func:`run_chat` (what ``splitllm chat`` and ``examples/chatbot.py`` run).
- Errors: :mod:`errors` (one tree, rooted at :class:`SplitLLMError`).

Test tools (an emulated link or device, a server subprocess) are in ``splitllm.testing``.
"""

from __future__ import annotations

from splitllm import errors
from splitllm.cli.chat_ui import run_chat
from splitllm.client import ChatSession, GenerationStats, Placement, SplitClient, TokenPiece
from splitllm.codec import codec_names, decode, encode, get_codec
from splitllm.errors import SplitLLMError
from splitllm.model.bundle import Bundle
from splitllm.model.runtime import RuntimeOptions
from splitllm.model.sampling import SamplingParams
from splitllm.planner import Plan, Policy, Problem, make_policy, solve
from splitllm.planner.profile import Profile, load_or_measure

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
    "load_or_measure",
    "make_policy",
    "run_chat",
    "solve",
]
