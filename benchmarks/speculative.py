"""Speculative decoding across the split: tokens/s with and without it, through emulated links.

Run: ``python benchmarks/speculative.py [--bundle bundles/smollm2-variants] [--split 10]
[--codec int8-block64] [--rtts 10,40,100] [--mbps 10] [--tokens 64]``

One ``splitllm-server`` on loopback behind a :class:`~splitllm.testing.ShapedLink` per round-trip
time (``--mbps`` both ways). For each RTT and each prompt kind (a chat answer, a piece of code),
one client with ``speculate="off"`` and one with ``speculate="auto"`` (drafts from a long n-gram
match of the context, else from the whole model here in the bundle's int4 weights) each generate
``--tokens`` greedy tokens, after a short warm-up generation that loads their segments and lets
the adaptive client measure its link. Reported per run: tokens/s (prefill included), round trips,
tokens per round trip, the share of drafts kept, and the server's compute per generated token
(rejected drafts cost server work too: that is the price). The tokens of both clients must be
identical. Last line JSON: ``speedup`` per RTT (median over prompts), ``server_work_ratio`` per
RTT, ``identical``.

Needs a bundle with an int4 variant: ``splitllm-export -q --client-weights fp16,int8,int4 -o
bundles/smollm2-variants``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path
from urllib.parse import urlsplit

from splitllm import Bundle, SplitClient
from splitllm.testing import ShapedLink, spawn_server, stop_server

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = REPO / "bundles" / "smollm2-variants"
PROMPTS = {
    "chat": "Explain in a few sentences why the sky is blue, then give one practical tip for photographing it.",
    "code": "Write a Python function that returns the n-th Fibonacci number iteratively, with a docstring, "
            "and then a second function that returns the first n Fibonacci numbers as a list.",
}
WARM_UP = "Say hello in three languages."


async def _run(bundle: Path, url: str, split: int, codec: str, speculate: str, prompt: str, tokens: int) -> dict:
    async with SplitClient(bundle, url, split=split, codec=codec, speculate=speculate) as client:
        async for _ in client.generate(WARM_UP, max_new_tokens=16, ignore_eos=True):
            pass
        server_ms = client.link.server_ms if client.link else 0.0
        async for _ in client.generate(prompt, max_new_tokens=tokens, ignore_eos=True):
            pass
        stats = client.last_stats
        work_ms = (client.link.server_ms if client.link else 0.0) - server_ms
        return {"tok_s": stats.tokens_per_s, "steps": stats.steps, "tokens_per_round_trip": stats.tokens_per_step,
                "drafted": stats.drafted, "accepted": stats.accepted, "server_ms_per_token": work_ms / stats.new_tokens,
                "ids": stats.new_ids}


async def run(args: argparse.Namespace, url: str) -> dict:
    target = urlsplit(url)
    rows = []
    for rtt in args.rtts:
        async with ShapedLink(target.hostname, target.port, uplink_bps=args.mbps * 1e6, downlink_bps=args.mbps * 1e6,
                              rtt_ms=rtt) as link:
            for kind, prompt in PROMPTS.items():
                off = await _run(args.bundle, link.url, args.split, args.codec, "off", prompt, args.tokens)
                spec = await _run(args.bundle, link.url, args.split, args.codec, "auto", prompt, args.tokens)
                rows.append({"rtt_ms": rtt, "prompt": kind, "off": off, "spec": spec,
                             "speedup": spec["tok_s"] / off["tok_s"],
                             "server_work_ratio": spec["server_ms_per_token"] / off["server_ms_per_token"],
                             "identical": spec["ids"] == off["ids"]})
                r = rows[-1]
                print(f"rtt {rtt:4d} ms {kind:5s}  off {off['tok_s']:6.1f} tok/s  spec {spec['tok_s']:6.1f} tok/s  "
                      f"x{r['speedup']:.2f}  {spec['tokens_per_round_trip']:.2f} tok/round trip  "
                      f"drafts kept {spec['accepted']}/{spec['drafted']}  server ms/token "
                      f"{off['server_ms_per_token']:.2f} -> {spec['server_ms_per_token']:.2f} "
                      f"(x{r['server_work_ratio']:.2f})  identical {r['identical']}", flush=True)
    speedup = {rtt: round(statistics.median(r["speedup"] for r in rows if r["rtt_ms"] == rtt), 3) for rtt in args.rtts}
    work = {rtt: round(statistics.median(r["server_work_ratio"] for r in rows if r["rtt_ms"] == rtt), 3)
            for rtt in args.rtts}
    slim = [{k: v for k, v in r.items() if k not in ("off", "spec")} | {
        "off": {k: v for k, v in r["off"].items() if k != "ids"}, "spec": {k: v for k, v in r["spec"].items() if k != "ids"}}
        for r in rows]
    return {"speedup": speedup, "server_work_ratio": work, "identical": all(r["identical"] for r in rows),
            "rows": slim, "split": args.split, "codec": args.codec, "mbps": args.mbps, "tokens": args.tokens}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    p.add_argument("--split", type=int, default=10)
    p.add_argument("--codec", default="int8-block64")
    p.add_argument("--rtts", type=lambda s: [int(x) for x in s.split(",")], default=[10, 40, 100])
    p.add_argument("--mbps", type=float, default=10.0)
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args(argv)
    if not (args.bundle / "manifest.json").is_file():
        raise SystemExit(f"no bundle at {args.bundle}: splitllm-export -q --client-weights fp16,int8,int4 -o {args.bundle}")
    if "int4" not in Bundle.open(args.bundle).variants:
        print(f"{args.bundle} has no int4 variant: the model drafter runs the client's own weights", file=sys.stderr)
    proc, url = spawn_server(args.bundle)
    try:
        report = asyncio.run(run(args, url))
    finally:
        stop_server(proc)
    print(json.dumps(report))
    return 0 if report["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
