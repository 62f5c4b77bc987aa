"""How long a placement switch takes to move its KV: one request per layer vs one pipelined batch.

Run: ``python benchmarks/kv_move.py [--bundle bundles/smollm2] [--rtt-ms 40] [--mbps 20]
[--prompt-tokens 64] [--layers 10] [--repeats 3]``

A local ``splitllm-server`` runs behind a :class:`~splitllm.testing.netem.ShapedLink` (``--rtt-ms``,
``--mbps`` both ways). One client prefills a prompt at split 5 (fp32 codec), then switches
between split 5 and split ``5 + --layers``: each switch moves the exact (fp32) KV of
``--layers`` decoder layers, down to the device and back up. Every switch is timed twice in
turn: with the requests sent one after another (each waits for its reply: what the client did
before) and pipelined (``Remote.request_many``: every frame out, then the replies, what it does
now). The greedy continuation after the last switch is checked against a run that never
switched. Prints the median time per switch in each mode, the ratio, and one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from splitllm import Bundle, Placement, SplitClient
from splitllm.testing.netem import ShapedLink
from splitllm.testing.server import spawn, stop

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Explain, in a few sentences, how a lighthouse keeper spent a stormy night on the coast."


async def _continuation(client: SplitClient, ids: list[int], tokens: int) -> list[int]:
    async for _ in client.generate_ids(ids, max_new_tokens=tokens, ignore_eos=True):
        pass
    return client.last_stats.new_ids


async def run(args: argparse.Namespace) -> dict:
    bundle = Bundle.open(args.bundle)
    split_a, split_b = 5, 5 + args.layers
    proc, url = spawn(args.bundle, ["--threads", "2"])
    try:
        target = urlsplit(url)
        async with ShapedLink(target.hostname, target.port, uplink_bps=args.mbps * 1e6, downlink_bps=args.mbps * 1e6,
                              rtt_ms=args.rtt_ms) as link:
            async with SplitClient(args.bundle, link.url, split=split_a, codec="fp32") as client:
                text = client.text.encode_chat([{"role": "user", "content": PROMPT}])
                ids = (text * (args.prompt_tokens // len(text) + 1))[: args.prompt_tokens]
                reference = await _continuation(client, ids, 8)  # prefill + 8 tokens at split 5, never switching
                remote = client.remote
                assert remote is not None
                pipelined = remote.request_many

                async def one_by_one(msgs):  # noqa: ANN001, ANN202 - the client before request_many
                    return [await remote.request(m) for m in msgs]

                times: dict[str, list[float]] = {"one by one": [], "pipelined": []}
                for _ in range(args.repeats):
                    for mode, send in (("one by one", one_by_one), ("pipelined", pipelined)):
                        for split in (split_b, split_a):  # down to the device, then back up
                            remote.request_many = send
                            client.set_placement(Placement.for_split(split, bundle.num_units))
                            started = time.perf_counter()
                            await client.apply_placement()
                            times[mode].append(time.perf_counter() - started)
                remote.request_many = pipelined
                # The KV that moved back and forth must still be exact: the same prompt again (its
                # KV reused, now at split 5 after all the moves) gives the same tokens.
                same = await _continuation(client, ids, 8) == reference
    finally:
        stop(proc)
    med = {mode: statistics.median(values) * 1e3 for mode, values in times.items()}
    kv_mb = args.layers * args.prompt_tokens * bundle.shapes.kv_bytes_per_position / 1e6
    return {"rtt_ms": args.rtt_ms, "mbps": args.mbps, "prompt_tokens": args.prompt_tokens, "layers": args.layers,
            "kv_mb_per_switch": round(kv_mb, 3), "switch_ms_median": {k: round(v, 1) for k, v in med.items()},
            "speedup": round(med["one by one"] / med["pipelined"], 2), "tokens_same_as_never_switching": same}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "bundles" / "smollm2")
    parser.add_argument("--rtt-ms", type=float, default=40.0)
    parser.add_argument("--mbps", type=float, default=20.0)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if not (args.bundle / "manifest.json").exists():
        parser.error(f"no bundle at {args.bundle}: run `make demo` (or splitllm-export) first")
    result = asyncio.run(run(args))
    med = result["switch_ms_median"]
    print(f"{result['layers']} layers x {result['prompt_tokens']} positions ({result['kv_mb_per_switch']} MB of KV) "
          f"over {args.mbps:g} Mbit/s, RTT {args.rtt_ms:g} ms: one by one {med['one by one']:.0f} ms, "
          f"pipelined {med['pipelined']:.0f} ms per switch ({result['speedup']:.2f}x); tokens after the switches "
          f"{'equal' if result['tokens_same_as_never_switching'] else 'DIFFERENT'} to a run that never switched")
    print(json.dumps(result))
    return 0 if result["tokens_same_as_never_switching"] else 1


if __name__ == "__main__":
    sys.exit(main())
