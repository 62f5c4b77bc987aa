"""`make demo`: export the built-in model if needed, start a local server, chat through the split.

Runs by itself and exits: two chat turns with SmolLM2-135M-Instruct, the first layers on this
"device" (ONNX Runtime in this process), the rest on a splitllm-server subprocess on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

from splitllm.bundle import MANIFEST, Bundle
from splitllm.chat_ui import status_line
from splitllm.client import SplitClient
from splitllm.errors import SplitLLMError

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is the capital of France?", "Name two famous museums there."]


def ensure_bundle(path: Path) -> None:
    if (path / MANIFEST).is_file():
        return
    print(f"exporting the built-in SmolLM2-135M-Instruct to {path} (about a minute, once) ...", flush=True)
    from splitllm_export.cli import main as export_main

    if export_main(["--builtin", "smollm2", "-o", str(path), "--force"]) != 0:
        raise SystemExit("export failed")


def start_server(bundle: Path, timeout_s: float = 180.0) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "splitllm_server.cli", "--bundle", str(bundle), "--port", "0", "--no-spinning"],
        stdout=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None  # noqa: S101 - Popen with stdout=PIPE always has it
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("listening on "):
            return proc, line.split()[-1]
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit("the server did not start")


async def chat(bundle: Path, url: str, split: int, codec: str) -> None:
    async with SplitClient(bundle, url, split=split, codec=codec) as client:
        session = client.chat()
        for question in QUESTIONS:
            print(f"you> {question}\nbot> ", end="", flush=True)
            async for piece in session.send(question, max_new_tokens=64):
                print(piece.text, end="", flush=True)
            print()
            print(status_line(client), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bundle", default=str(REPO / "bundles" / "smollm2"))
    parser.add_argument("--split", type=int, default=10, help="layers on this device (default 10)")
    parser.add_argument("--codec", default="int8-block64")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    bundle_path = Path(args.bundle)
    ensure_bundle(bundle_path)
    bundle = Bundle.open(bundle_path)
    print(f"bundle {bundle.model_id}: {bundle.num_layers} layers; starting a local server ...", flush=True)
    proc, url = start_server(bundle_path)
    try:
        print(f"server at {url}; split {args.split}: layers 0-{args.split - 1} run here, the rest there\n")
        asyncio.run(chat(bundle_path, url, args.split, args.codec))
    except SplitLLMError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
