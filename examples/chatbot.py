"""A terminal chat through a split: the first layers here, the rest on a SplitLLM server.

    python examples/chatbot.py                       # built-in SmolLM2, starts a local server
    python examples/chatbot.py --server http://HOST:8765 --bundle bundles/smollm2
    python examples/chatbot.py --once "Hi!" --once "And then?"   # scripted turns, then exit

Streams tokens as they come and, after each reply, shows the time to its first token (prompt
and any loading included) and the decode speed after it, where the layers ran, the share of the
work kept off the server, the codec, and the measured RTT and uplink. Commands:
/split K, /codec NAME, /reset, /quit. With --sla-token-ms the planner picks the split.
`make demo` runs this with two scripted turns against a local server on the built-in model.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from pathlib import Path

from splitllm import Bundle, SplitClient, SplitLLMError, errors, run_chat
from splitllm.testing import spawn_server, stop_server

REPO = Path(__file__).resolve().parents[1]


def ensure_bundle(path: Path, model: str = "smollm2") -> None:
    """Export the built-in ``model`` to ``path`` (the ``splitllm-export`` command) unless a bundle
    is already there."""
    try:
        Bundle.open(path, verify=False)
        return
    except errors.BundleNotFound:
        pass
    print(f"exporting the built-in {model} to {path} (once: a minute for SmolLM2, a few for the others) ...",
          flush=True)
    export = [sys.executable, "-m", "splitllm_export.cli", "--builtin", model, "-o", str(path), "--force"]
    if subprocess.run(export, check=False).returncode != 0:
        raise SystemExit("export failed")


async def chat(args: argparse.Namespace, url: str) -> int:
    client = SplitClient(args.bundle, url, split=args.split, codec=args.codec, token=args.token)
    if args.sla_token_ms:
        await client.connect()
        await client.plan(ttft_ms=args.sla_ttft_ms, token_ms=args.sla_token_ms)
    sampling = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed}
    return await run_chat(client, sampling, once=args.once)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2",
                        help="built-in model to export if --bundle is missing: smollm2 (default), qwen2.5-coder-0.5b, "
                             "gemma3-270m (the last two need `make models`)")
    parser.add_argument("--bundle", default=None, help="bundle directory (default: bundles/<model>)")
    parser.add_argument("--server", default=None, help="server URL (default: start a local server)")
    parser.add_argument("--token", default=None)
    parser.add_argument("--split", type=int, default=None, help="layers on this device (default: a third)")
    parser.add_argument("--codec", default="int8-block64")
    parser.add_argument("--once", action="append", default=None, metavar="PROMPT",
                        help="answer this message (repeat for more turns), then exit")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sla-token-ms", type=float, default=None, help="per-token SLA: let the planner split")
    parser.add_argument("--sla-ttft-ms", type=float, default=2000.0, help="time-to-first-token SLA (with --sla-token-ms)")
    args = parser.parse_args(argv)
    args.bundle = args.bundle or str(REPO / "bundles" / args.model)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = None
    try:
        url = args.server
        if url is None:
            ensure_bundle(Path(args.bundle), args.model)
            print("starting a local splitllm-server ...", flush=True)
            proc, url = spawn_server(Path(args.bundle))
            print(f"server at {url}", flush=True)
        return asyncio.run(chat(args, url))
    except SplitLLMError as exc:
        print(f"chatbot: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if proc is not None:
            stop_server(proc)


if __name__ == "__main__":
    sys.exit(main())
