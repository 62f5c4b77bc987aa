"""SplitLLM client SDK: run the first layers of an LLM here, the rest on a server.

This module is the SDK's only public door; everything else is an implementation detail.
"""

from __future__ import annotations

from splitllm import errors
from splitllm.errors import SplitLLMError

__version__ = "0.1.0"

__all__ = [
    "SplitLLMError",
    "__version__",
    "errors",
]
