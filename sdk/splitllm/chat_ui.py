"""A terminal chat on a SplitClient: streams tokens, shows where the layers run and how fast.

Commands: /split K, /codec NAME, /reset, /quit. Used by `splitllm chat` and examples/chatbot.py.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any, TextIO

from splitllm import codec as codecs
from splitllm.client import SplitClient
from splitllm.errors import ConfigError, SplitLLMError

HELP = "commands: /split K  /codec NAME  /reset  /quit"


def status_line(client: SplitClient) -> str:
    """Placement, link and speed after a reply, in one line."""
    stats = client.last_stats
    num_layers = client.bundle.num_layers
    if client.local:
        where = f"all {num_layers} layers here"
        offload = 1.0
    else:
        here = sum(1 for side in client.placement.sides[1:-1] if side == "client")
        where = f"layers 0-{here - 1} here, {here}-{num_layers - 1} on the server" if here else "all layers on the server"
        offload = here / num_layers
    parts = [f"{stats.new_tokens} tokens", f"{stats.tokens_per_s:.1f} tok/s", where,
             f"{offload:.0%} of the layers kept off the server", f"codec {client.codec}"]
    link = client.link
    if link is not None and link.requests:
        if link.rtt_ms_ewma is not None:
            parts.append(f"rtt {link.rtt_ms_ewma:.1f} ms")
        wall_s = link.round_trip_ms / 1e3
        if wall_s > 0:
            parts.append(f"{(link.bytes_up + link.bytes_down) * 8 / wall_s / 1e6:.1f} Mbit/s used")
    return "[" + ", ".join(parts) + "]"


async def _command(client: SplitClient, chat: Any, line: str, out: TextIO) -> bool:
    """Handle a /command; False means quit."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/quit", "/exit"):
        return False
    if name == "/reset":
        chat.reset()
        print("(conversation cleared)", file=out)
    elif name == "/split":
        if client.local:
            print("(local mode: every layer runs here)", file=out)
        else:
            try:
                client.set_split(int(arg))
                print(f"(split {arg}: layers 0-{int(arg) - 1} run here)", file=out)
            except (ValueError, ConfigError) as exc:
                print(f"(cannot split at {arg!r}: {exc})", file=out)
    elif name == "/codec":
        try:
            codecs.get_codec(arg)
            client.codec = arg
            print(f"(codec {arg})", file=out)
        except SplitLLMError as exc:
            print(f"({exc})", file=out)
    else:
        print(HELP, file=out)
    return True


async def run_chat(
    client: SplitClient,
    sampling: dict[str, Any],
    *,
    once: str | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """The interactive loop (or a single answer with ``once``)."""
    loop = asyncio.get_running_loop()
    async with client:
        chat = client.chat()
        if once is None:
            print(f"SplitLLM chat with {client.bundle.model_id}. {HELP}", file=out, flush=True)
        while True:
            if once is not None:
                line = once
            else:
                try:
                    line = (await loop.run_in_executor(None, input, "you> ")).strip()
                except EOFError:
                    break
            if not line:
                continue
            if line.startswith("/"):
                if not await _command(client, chat, line, out):
                    break
                continue
            print("bot> ", end="", file=out, flush=True)
            try:
                async for piece in chat.send(line, **sampling):
                    print(piece.text, end="", file=out, flush=True)
            except SplitLLMError as exc:
                print(f"\n(error: {exc})", file=out, flush=True)
                if once is not None:
                    return 1
                continue
            print(file=out)
            print(status_line(client), file=out, flush=True)
            if once is not None:
                break
    return 0
