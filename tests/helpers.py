"""Small helpers shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def chat_ids(source, text: str) -> list[int]:
    """Token ids of one user message through the model's chat template (transformers' own)."""
    return source.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                                add_generation_prompt=True)


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported as module ``name`` (registered in sys.modules first:
    dataclasses look their module up while the file executes, and a benchmark that imports a
    sibling, such as capacity's ``from live_workload import ...``, finds it once it is loaded)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"no benchmark {name!r} under {BENCHMARKS}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


async def until(condition: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition") -> None:
    """Wait until ``condition()`` holds, polling every 20 ms; fail after ``timeout_s``. Tests wait
    on what they mean, never on a fixed sleep: a loaded machine only makes this slower."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not met within {timeout_s:g} s")
        await asyncio.sleep(0.02)
