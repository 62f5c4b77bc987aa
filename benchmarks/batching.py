"""Batching: the serial engine (``--max-batch 1``) against continuous batching, side by side.

Run: ``python benchmarks/batching.py [--bundle bundles/smollm2] [--clients 8,32,64] [--tokens 64]
[--split 2] [--lone-repeats 3] [--server-args '...'] [--devices real|phantom] [--before REV [--repeats 3]]``

For each client count, one load run (``benchmarks/load.py``: every client in this process, each
with its own prefix, WebSocket and KV, all generating at once) against a fresh server with
``--max-batch 1`` and one against a fresh server with the default batching, fp32 server
weights (``--devices phantom``: the clients' layers take their profiled time asleep instead of
computing on the cores the server uses, as a server's real clients would). Then a lone client,
alternating between the two servers ``--lone-repeats`` times: batching must not cost a single
client anything. Prints a table; the last line is JSON with the
ratios (batched / serial): ``throughput_ratio`` and ``p50_ratio`` per client count,
``lone_ratio``, ``errors``, and ``long_prompt``: ``--long-clients`` clients decode, and once each
has its first token one more client sends a ``--long-prompt``-position prompt; their per-token
p50 and p99 from then on (the p99 should stay within 2x the p50: the prompt runs in chunks
between their steps).

``--before REV``: instead, the server of git revision REV against this tree's, both batching, at
each client count: REV's ``sdk/``, ``exporter/`` and ``server_stub/`` are extracted (``git
archive``) into a temporary directory and its server runs with them first on ``PYTHONPATH``;
the clients are this tree's in both. ``--repeats`` rounds, the order alternating (before, now;
now, before; ...) so drift on a shared machine falls on both alike. Prints each run's tokens/s,
the medians and their ratio (now / before); the last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from load import DEFAULT_BUNDLE, TOPICS, Server, ensure_bundle, run

from splitllm import Bundle, SplitClient

SERIAL = ["--max-batch", "1"]


def _load(bundle: Path, clients: int, tokens: int, split: int, codec: str, server_args: list[str],
          max_seconds: float, devices: str = "real", tree: Path | None = None) -> dict:
    with _server_code(tree):
        server = Server(bundle, server_args)
    try:
        ns = argparse.Namespace(bundle=bundle, clients=clients, tokens=tokens, split=split, codec=codec,
                                max_seconds=max_seconds, speculate="off", devices=devices)
        return asyncio.run(run(ns, server))
    finally:
        server.stop()


def _materialise(rev: str, into: Path) -> Path:
    """REV's ``sdk/``, ``exporter/`` and ``server_stub/`` written under ``into`` (``git archive``)."""
    repo = Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "-C", str(repo), "archive", rev, "sdk", "exporter", "server_stub"],
                             capture_output=True, check=True, timeout=120).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


@contextlib.contextmanager
def _server_code(tree: Path | None) -> Iterator[None]:
    """Servers spawned inside run ``tree``'s code (its packages first on PYTHONPATH); None: this tree's."""
    if tree is None:
        yield
        return
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(str(tree / d) for d in ("sdk", "exporter", "server_stub"))
    try:
        yield
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


def _before_and_now(args: argparse.Namespace, extra: list[str], counts: list[int]) -> int:
    """``--before``: REV's server against this tree's, interleaved; returns the errors seen."""
    errors = 0
    summary: dict[int, dict] = {}
    with tempfile.TemporaryDirectory(prefix="splitllm-before-") as tmp:
        old = _materialise(args.before, Path(tmp))
        for n in counts:
            tok_s: dict[str, list[float]] = {"before": [], "now": []}
            for k in range(args.repeats):
                order = (("before", old), ("now", None)) if k % 2 == 0 else (("now", None), ("before", old))
                for name, tree in order:
                    r = _load(args.bundle, n, args.tokens, args.split, args.codec, extra, args.max_seconds,
                              args.devices, tree)
                    errors += r["errors"] + r["client_failovers"]
                    tok_s[name].append(r["throughput_tok_s"])
                    print(f"{n:3d} clients  {name:6s} ({args.before if tree else 'this tree'}) "
                          f"{r['throughput_tok_s']:8.1f} tok/s   p50 {r['token_latency_p50_ms']} ms   "
                          f"errors {r['errors']}", flush=True)
            med = {k: statistics.median(v) for k, v in tok_s.items()}
            ratio = med["now"] / med["before"] if med["before"] else 0.0
            print(f"{n:3d} clients  median tok/s: before {med['before']:.1f}, now {med['now']:.1f}, "
                  f"ratio {ratio:.3f}", flush=True)
            summary[n] = {"tok_s": tok_s, "median_tok_s": med, "ratio": round(ratio, 3)}
    print(json.dumps({"before": args.before, "runs": summary, "errors": errors, "tokens": args.tokens,
                      "split": args.split, "codec": args.codec, "devices": args.devices}))
    return errors


async def _long_prompt(bundle_path: Path, url: str, clients: int, tokens: int, split: int, codec: str,
                       prompt_tokens: int) -> dict:
    """``clients`` decode; once each has its first token (their own short prompts are through), one
    more client sends a ``prompt_tokens`` prompt.

    Returns the decoding clients' per-token gaps from then on, and during the long prefill."""
    bundle = Bundle.open(bundle_path)
    make = lambda k: SplitClient(bundle, url, split=k, codec=codec, threads=1, fallback_local=False,  # noqa: E731
                                 speculate="off")
    decoders = [make(split) for _ in range(clients)]
    # The long prompt's own device layers would run on the cores the server and the others share
    # and stall them all: it keeps only the embeddings here, so what is measured is the server's
    # scheduling of its prompt between the others' steps.
    long_client = make(0)
    for c in [*decoders, long_client]:
        await c.connect()
    text = " ".join(f"Paragraph {k} is about {TOPICS[k % len(TOPICS)]}." for k in range(prompt_tokens))
    long_ids = long_client.text.encode_chat([{"role": "user", "content": text}])[:prompt_tokens]
    gaps: list[tuple[float, float]] = []  # (end time, gap s)
    window: list[float] = []
    decoding = asyncio.Semaphore(0)

    async def decode(c: SplitClient, i: int) -> None:
        ids = c.text.encode_chat([{"role": "user", "content": f"Write about {TOPICS[i % len(TOPICS)]}, part {i}."}])
        last = None
        async for piece in c.generate_ids(ids, max_new_tokens=tokens, ignore_eos=True):
            now = time.perf_counter()
            if piece.token_id < 0:
                continue
            if last is None:
                decoding.release()
            elif window:
                gaps.append((now, now - last))
            last = now

    async def long() -> None:
        for _ in range(clients):  # every decoder is past its own prompt
            await decoding.acquire()
        window.append(time.perf_counter())
        async for _ in long_client.generate_ids(long_ids, max_new_tokens=1, ignore_eos=True):
            pass
        window.append(time.perf_counter())

    try:
        await asyncio.gather(long(), *(decode(c, i) for i, c in enumerate(decoders)))
    finally:
        for c in [*decoders, long_client]:
            await c.close()
    all_ms = np.array([g for end, g in gaps if end - g >= window[0]]) * 1e3
    during = np.array([g for end, g in gaps if window[0] <= end - g and end <= window[1]]) * 1e3
    return {"p50_ms": float(np.percentile(all_ms, 50)), "p99_ms": float(np.percentile(all_ms, 99)),
            "during_prefill_p50_ms": float(np.percentile(during, 50)) if during.size else None,
            "during_prefill_p99_ms": float(np.percentile(during, 99)) if during.size else None,
            "during_prefill_max_ms": float(during.max()) if during.size else None,
            "prefill_s": window[1] - window[0], "gaps": int(all_ms.size), "gaps_during_prefill": int(during.size)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    p.add_argument("--clients", default="8,32,64", help="comma-separated client counts")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--split", type=int, default=2)
    p.add_argument("--codec", default="int8-block64")
    p.add_argument("--lone-repeats", type=int, default=3)
    p.add_argument("--long-prompt", type=int, default=2000, help="positions of the long prompt (0: skip)")
    p.add_argument("--long-clients", type=int, default=8, help="clients decoding while the long prompt runs")
    p.add_argument("--long-only", action="store_true", help="only the long-prompt measurement")
    p.add_argument("--max-seconds", type=float, default=600.0, help="per load run")
    p.add_argument("--server-args", default="", help="extra splitllm-server arguments for both engines")
    p.add_argument("--devices", choices=("real", "phantom"), default="real",
                   help="the load runs' clients: computing here (real) or asleep for their time (phantom; load.py)")
    p.add_argument("--before", default=None, metavar="REV",
                   help="compare git revision REV's server with this tree's (both batching) instead")
    p.add_argument("--repeats", type=int, default=3, help="with --before: rounds of one run each")
    args = p.parse_args(argv)
    ensure_bundle(args.bundle)
    extra = shlex.split(args.server_args)
    counts = [] if args.long_only else [int(c) for c in args.clients.split(",") if c]
    if args.before is not None:
        return 1 if _before_and_now(args, extra, counts) else 0
    rows = []
    errors = 0
    for n in counts:
        pair = {}
        for name, server_args in (("serial", SERIAL + extra), ("batched", extra)):
            r = _load(args.bundle, n, args.tokens, args.split, args.codec, server_args, args.max_seconds, args.devices)
            errors += r["errors"] + r["client_failovers"]
            pair[name] = r
            print(f"{n:3d} clients  {name:8s} {r['throughput_tok_s']:8.1f} tok/s   p50 {r['token_latency_p50_ms']} ms"
                  f"   p99 {r['token_latency_p99_ms']} ms   TTFT p50 {r['first_token_p50_ms']} ms   "
                  f"errors {r['errors']}", flush=True)
        rows.append((n, pair))
    lone: dict[str, list[float]] = {"serial": [], "batched": []}
    for _ in range(0 if args.long_only else args.lone_repeats):
        for name, server_args in (("serial", SERIAL + extra), ("batched", extra)):
            r = _load(args.bundle, 1, args.tokens, args.split, args.codec, server_args, args.max_seconds, args.devices)
            errors += r["errors"]
            lone[name].append(r["throughput_tok_s"])
    lone_med = {k: statistics.median(v) if v else 0.0 for k, v in lone.items()}
    long_report = None
    if args.long_prompt:
        server = Server(args.bundle, extra)
        try:
            long_report = asyncio.run(_long_prompt(args.bundle, server.url, args.long_clients, args.tokens, args.split,
                                                   args.codec, args.long_prompt))
        finally:
            server.stop()
        long_report["p99_over_p50"] = round(long_report["p99_ms"] / long_report["p50_ms"], 3)
        print(f"\n{args.long_clients} clients decoding while one sends a {args.long_prompt}-token prompt "
              f"(prefill {long_report['prefill_s']:.2f} s): per-token p50 {long_report['p50_ms']:.1f} ms, "
              f"p99 {long_report['p99_ms']:.1f} ms (p99/p50 {long_report['p99_over_p50']:.2f}); during the "
              f"prefill p50 {long_report['during_prefill_p50_ms']} ms, max {long_report['during_prefill_max_ms']} ms")
    print(f"\n{'clients':>7} {'serial tok/s':>13} {'batched tok/s':>14} {'ratio':>6} {'p50 serial':>11} "
          f"{'p50 batched':>12} {'p50 ratio':>9}")
    summary = {"throughput_ratio": {}, "p50_ratio": {}, "throughput_tok_s": {}, "token_latency_p50_ms": {}}
    for n, pair in rows:
        s, b = pair["serial"], pair["batched"]
        ratio = b["throughput_tok_s"] / s["throughput_tok_s"] if s["throughput_tok_s"] else 0.0
        p50 = (b["token_latency_p50_ms"] or 0) / (s["token_latency_p50_ms"] or 1)
        summary["throughput_ratio"][n] = round(ratio, 3)
        summary["p50_ratio"][n] = round(p50, 3)
        summary["throughput_tok_s"][n] = {"serial": s["throughput_tok_s"], "batched": b["throughput_tok_s"]}
        summary["token_latency_p50_ms"][n] = {"serial": s["token_latency_p50_ms"], "batched": b["token_latency_p50_ms"]}
        print(f"{n:7d} {s['throughput_tok_s']:13.1f} {b['throughput_tok_s']:14.1f} {ratio:6.2f} "
              f"{s['token_latency_p50_ms']:11} {b['token_latency_p50_ms']:12} {p50:9.2f}")
    lone_ratio = lone_med["batched"] / lone_med["serial"] if lone_med["serial"] else 0.0
    print(f"\nlone client: serial {lone['serial']} tok/s, batched {lone['batched']} tok/s, "
          f"median ratio {lone_ratio:.3f}")
    print(json.dumps({**summary, "lone_tok_s": lone, "lone_ratio": round(lone_ratio, 3), "errors": errors,
                      "long_prompt": long_report,
                      "tokens": args.tokens, "split": args.split, "codec": args.codec, "devices": args.devices}))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
