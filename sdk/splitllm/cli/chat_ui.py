"""A terminal chat on a SplitClient: streams tokens, shows where the layers run and how fast.

Commands: /split K, /codec NAME, /reset, /quit. Used by `splitllm chat` and examples/chatbot.py.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from splitllm import codec as codecs
from splitllm.client import GenerationStats, SplitClient
from splitllm.errors import ConfigError, SplitLLMError

HELP = "commands: /split K  /codec NAME  /reset  /quit"


def describe_placement(sides: tuple[str, ...]) -> str:
    """'layers 0-9 here, 10-29 on the server' for the decoder layers of a placement."""
    layers = sides[1:-1]
    here = [i for i, side in enumerate(layers) if side == "client"]
    if len(here) == len(layers):
        return f"all {len(layers)} layers here"
    if not here:
        return "all layers on the server"
    runs: list[str] = []
    start = prev = here[0]
    for i in here[1:] + [None]:
        if i is None or i != prev + 1:
            runs.append(f"{start}" if start == prev else f"{start}-{prev}")
            if i is not None:
                start = i
        if i is not None:
            prev = i
    head = "head here" if sides[-1] == "client" else "head on the server"
    return f"layers {', '.join(runs)} here, the rest on the server, {head}"


def offload_share(client: SplitClient) -> float:
    """Share of a decode step's FLOPs that run on this device (kept off the server)."""
    units = client.bundle.cost.get("units", [])
    flops = [float(u.get("flops_per_token_decode", 0)) for u in units]
    if len(flops) != len(client.placement.sides) or not sum(flops):
        flops = [1.0] * len(client.placement.sides)
    here = sum(f for f, side in zip(flops, client.placement.sides, strict=True) if side == "client")
    return here / sum(flops)


def speed_summary(stats: GenerationStats) -> str:
    """'24 tokens, first in 812 ms, then 11.3 tok/s': the wait for the first token (prompt and
    any first-request loading) apart from the decode speed after it, which a single tokens/s
    figure would mix; the draft model's one-time loading, when this reply paid it, apart too."""
    text = f"{stats.new_tokens} token{'s' if stats.new_tokens != 1 else ''}, first in {stats.ttft_ms:.0f} ms"
    if stats.new_tokens > 1:
        text += f", then {stats.decode_tokens_per_s:.1f} tok/s"
    if stats.draft_load_s >= 0.05:
        text += f" (and {stats.draft_load_s:.1f} s loading the draft model, once)"
    return text


def status_line(client: SplitClient) -> str:
    """Placement, link and speed after a reply, in one line."""
    stats = client.last_stats
    parts = [speed_summary(stats), describe_placement(client.placement.sides),
             f"{offload_share(client):.0%} of the work kept off the server", f"codec {client.codec}"]
    if stats.drafted:
        parts.append(f"{stats.tokens_per_step:.1f} tokens per round trip ({stats.acceptance:.0%} of drafts kept)")
    link = client.link
    if link is not None and link.requests:
        if link.rtt_ms_ewma is not None:
            parts.append(f"rtt {link.rtt_floor_ms:.1f} ms")
        if link.uplink_bps_ewma:
            parts.append(f"uplink {link.uplink_bps_ewma / 1e6:.1f} Mbit/s")
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
    once: str | Sequence[str] | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """The interactive loop, or the turns in ``once`` (one message or several) and exit."""
    loop = asyncio.get_running_loop()
    script = None if once is None else [once] if isinstance(once, str) else list(once)
    async with client:
        chat = client.chat()
        if script is None:
            print(f"SplitLLM chat with {client.bundle.model_id}. {HELP}", file=out, flush=True)
        while True:
            if script is not None:
                if not script:
                    break
                line = script.pop(0)
                print(f"you> {line}", file=out, flush=True)
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
                if script is not None:
                    return 1
                continue
            print(file=out)
            print(status_line(client), file=out, flush=True)
    return 0
