"""Load: many concurrent SplitClients against one splitllm-server on loopback.

Run: ``python benchmarks/load.py [--bundle bundles/smollm2] [--clients 32] [--tokens 64] [--split 2]
[--codec int8-block64] [--max-seconds 900]``

One server subprocess (``splitllm-server --port 0 --no-spinning``, ORT threads = all cores) and
every client in this one process, sharing one opened Bundle: each SplitClient still has its own ORT
session for its prefix, its own KV cache and its own WebSocket. On a 2-core machine that is
bounded by giving clients a small prefix (``--split 2``: embeddings + 2 layers on the device) and
one ORT intra-op thread each, without spinning (``threads=1``). Clients connect one after another,
then all generate at once (greedy, ``ignore_eos=True``, so each makes exactly ``--tokens``
tokens) from distinct short prompts. ``--devices phantom``: the clients' layers take their
profiled one-thread time asleep (``splitllm.testing.PhantomDevice``) instead of computing on the
cores the server uses; the server's work is the same, the tokens are not.

Measured: errors by class (must be 0); per-token latency = time between a client's consecutive
tokens (p50/p99 over all gaps of all clients), time to first token; aggregate throughput = all
tokens / wall time of the generation phase; peak server RSS (VmHWM of the server process, and
``splitllm_peak_rss_bytes`` from GET /metrics); server metrics before and after. Everything stops
by ``--max-seconds`` (unfinished clients are counted as errors). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import shlex
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import numpy as np

from splitllm import Bundle, SplitClient, load_or_measure
from splitllm.errors import SplitLLMError
from splitllm.testing import PhantomDevice
from splitllm.testing.server import spawn, stop

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = REPO / "bundles" / "smollm2"
TOPICS = ("the sea", "a robot", "bread", "mountains", "a violin", "rain", "chess", "the moon")


def _tool(name: str, module: str) -> list[str]:
    exe = Path(sys.executable).with_name(name)
    return [str(exe)] if exe.exists() else [sys.executable, "-m", module]


def ensure_bundle(path: Path) -> None:
    """Export the built-in model to the default path if it is missing (~75 s)."""
    if (path / "manifest.json").is_file():
        return
    if path.resolve() != DEFAULT_BUNDLE.resolve():
        raise SystemExit(f"no bundle at {path}; export one with splitllm-export -o {path}")
    print(f"exporting the built-in model to {path} (about 75 s) ...", flush=True)
    subprocess.run([*_tool("splitllm-export", "splitllm_export.cli"), "-q", "-o", str(path)], check=True,
                   timeout=1800)


class Server:
    def __init__(self, bundle: Path, extra_args: Sequence[str] = ()) -> None:
        try:
            self.proc, self.url = spawn(bundle, extra_args, stderr=subprocess.PIPE)
        except SplitLLMError as exc:
            raise SystemExit(str(exc)) from exc

    def vm_hwm_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> str:
        stop(self.proc)
        return self.proc.stderr.read() if self.proc.stderr else ""


_SAMPLE = re.compile(r'^(\w+)(?:\{code="([^"]+)"\})?\s+(\S+)$')


async def metrics(url: str) -> dict[str, float]:
    """GET /metrics as {name or name:code: value} (unit-labelled series left out)."""
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/metrics") as r:
            text = await r.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            out[m.group(1) + (f":{m.group(2)}" if m.group(2) else "")] = float(m.group(3))
    return out


class Result:
    def __init__(self) -> None:
        self.gaps_s: list[float] = []
        self.first_s: list[float] = []
        self.tokens = 0
        self.errors: Counter[str] = Counter()
        self.finished = 0


async def one_client(client: SplitClient, index: int, tokens: int, go: asyncio.Event, res: Result) -> None:
    prompt = client.text.encode_chat([{"role": "user", "content": f"Write about {TOPICS[index % len(TOPICS)]}, "
                                                                  f"part {index}."}])
    await go.wait()
    started = last = time.perf_counter()
    made = 0
    try:
        async for piece in client.generate_ids(prompt, max_new_tokens=tokens, ignore_eos=True):
            if piece.token_id < 0:  # the decoder's final flush, not a token
                continue
            now = time.perf_counter()
            if made == 0:
                res.first_s.append(now - started)
            else:
                res.gaps_s.append(now - last)
            last, made = now, made + 1
        if made != tokens:
            res.errors[f"made {made} of {tokens} tokens"] += 1
        else:
            res.finished += 1
    except Exception as exc:  # noqa: BLE001 - every failure is counted by class
        res.errors[type(exc).__name__] += 1
        print(f"client {index}: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        res.tokens += made


async def run(args: argparse.Namespace, server: Server) -> dict:
    deadline = time.monotonic() + args.max_seconds
    bundle = Bundle.open(args.bundle)
    before = await metrics(server.url)
    clients: list[SplitClient] = []
    res = Result()
    phantom_profile = None
    if getattr(args, "devices", "real") == "phantom":
        # Devices elsewhere: each takes this machine's one-thread time for its layers, asleep,
        # instead of computing on the cores the server uses (the tokens become meaningless).
        phantom_profile = load_or_measure(bundle, threads=1)
    began = time.perf_counter()
    try:
        for _ in range(args.clients):  # one after another: 32 sessions built at once would spike memory
            # No local fallback: a client that lost its server must count as an error, not go on
            # silently with every layer here.
            device = None if phantom_profile is None else PhantomDevice(bundle, phantom_profile)
            c = SplitClient(bundle, server.url, split=args.split, codec=args.codec, threads=1, fallback_local=False,
                            speculate=args.speculate, device=device)
            clients.append(c)
            await asyncio.wait_for(c.connect(), timeout=max(deadline - time.monotonic(), 1))
        connect_s = time.perf_counter() - began
        go = asyncio.Event()
        tasks = [asyncio.create_task(one_client(c, i, args.tokens, go, res)) for i, c in enumerate(clients)]
        t0, cpu0 = time.perf_counter(), time.process_time()
        go.set()
        done, pending = await asyncio.wait(tasks, timeout=max(deadline - time.monotonic(), 1))
        wall_s = time.perf_counter() - t0
        client_cpu_s = time.process_time() - cpu0
        for task in pending:
            task.cancel()
        if pending:
            res.errors["timeout (--max-seconds)"] += len(pending)
        await asyncio.gather(*pending, return_exceptions=True)
    except (asyncio.TimeoutError, Exception) as exc:  # noqa: BLE001 - a failed connect is an error too
        res.errors[f"connect: {type(exc).__name__}"] += 1
        print(f"connect failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        connect_s, wall_s, client_cpu_s = time.perf_counter() - began, 0.0, 0.0
    finally:
        failovers = sum(c.failovers for c in clients)
        for c in clients:
            await c.close()
    await asyncio.sleep(0.2)  # let the server notice the closed sockets
    after = await metrics(server.url)
    gaps_ms = np.array(res.gaps_s) * 1e3
    first_ms = np.array(res.first_s) * 1e3
    pct = lambda a, q: round(float(np.percentile(a, q)), 2) if a.size else None  # noqa: E731
    return {
        "clients": args.clients, "tokens_per_client": args.tokens, "split": args.split, "codec": args.codec,
        "bundle": bundle.model_id, "errors": sum(res.errors.values()), "errors_by_class": dict(res.errors),
        "clients_finished": res.finished, "client_failovers": failovers, "tokens": res.tokens, "connect_s": round(connect_s, 2),
        "wall_s": round(wall_s, 2), "throughput_tok_s": round(res.tokens / wall_s, 2) if wall_s else 0.0,
        "token_latency_p50_ms": pct(gaps_ms, 50), "token_latency_p99_ms": pct(gaps_ms, 99),
        "token_latency_max_ms": round(float(gaps_ms.max()), 2) if gaps_ms.size else None,
        "first_token_p50_ms": pct(first_ms, 50), "first_token_p99_ms": pct(first_ms, 99),
        "server_vm_hwm_bytes": server.vm_hwm_bytes(), "server_peak_rss_bytes": int(after.get("splitllm_peak_rss_bytes", 0)),
        "client_process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        # CPU seconds of this process (every client: device layers, codec, protocol) while they
        # generated: on a small machine they compete with the server for its cores.
        "client_cpu_s": round(client_cpu_s, 2),
        "metrics_before": before, "metrics_after": after,
    }


def print_report(r: dict) -> None:
    print(f"\n== {r['clients']} clients x {r['tokens_per_client']} tokens, split {r['split']}, codec {r['codec']}, "
          f"{r['bundle']}")
    print(f"  errors                      {r['errors']}  {r['errors_by_class'] or ''}")
    print(f"  clients finished            {r['clients_finished']} / {r['clients']} "
          f"(failovers: {r['client_failovers']})")
    print(f"  connect (sequential)        {r['connect_s']:.1f} s")
    print(f"  generation wall time        {r['wall_s']:.1f} s for {r['tokens']} tokens")
    print(f"  aggregate throughput        {r['throughput_tok_s']:.1f} tokens/s")
    print(f"  per-token latency           p50 {r['token_latency_p50_ms']} ms, p99 {r['token_latency_p99_ms']} ms, "
          f"max {r['token_latency_max_ms']} ms")
    print(f"  time to first token         p50 {r['first_token_p50_ms']} ms, p99 {r['first_token_p99_ms']} ms")
    print(f"  server peak RSS             VmHWM {r['server_vm_hwm_bytes'] / 2**20:.0f} MiB, /metrics "
          f"{r['server_peak_rss_bytes'] / 2**20:.0f} MiB")
    print(f"  client process peak RSS     {r['client_process_peak_rss_bytes'] / 2**20:.0f} MiB")
    b, a = r["metrics_before"], r["metrics_after"]
    codes = {k.split(":", 1)[1]: a[k] - b.get(k, 0.0) for k in a if k.startswith("splitllm_errors_total:")}
    print(f"  server errors by code       {codes or 'none'}")
    print(f"\n  {'server metric':42} {'before':>14} {'after':>14} {'delta':>14}")
    for key in sorted(set(b) | set(a)):
        if key.startswith(("splitllm_sessions", "splitllm_tokens", "splitllm_bytes", "splitllm_compute", "splitllm_runs",
                           "splitllm_errors", "splitllm_kv", "splitllm_peak", "splitllm_load")):
            x, y = b.get(key, 0.0), a.get(key, 0.0)
            print(f"  {key:42} {x:14.6g} {y:14.6g} {y - x:14.6g}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--tokens", type=int, default=64, help="tokens per client (exactly: ignore_eos)")
    p.add_argument("--split", type=int, default=2, help="layers on each client (small: 32 prefixes share 2 cores)")
    p.add_argument("--codec", default="int8-block64")
    p.add_argument("--max-seconds", type=float, default=900.0, help="stop connecting and generating by then")
    p.add_argument("--server-args", default="", help="extra splitllm-server arguments, e.g. '--chunk-units 0'")
    p.add_argument("--devices", choices=("real", "phantom"), default="real",
                   help="real: every client computes its layers in this process, on the server's cores; "
                        "phantom: each sleeps its one-thread profiled time instead (a load test of the server)")
    p.add_argument("--speculate", default="off",
                   help="the clients' speculation (default off: one token per step, what the server's batching sees)")
    args = p.parse_args(argv)
    ensure_bundle(args.bundle)
    server = Server(args.bundle, shlex.split(args.server_args))
    try:
        report = asyncio.run(run(args, server))
        alive = server.proc.poll() is None
    finally:
        stderr = server.stop()
    if not alive:
        report["errors_by_class"]["server exited"] = 1
        report["errors"] += 1
    if "Traceback" in stderr:
        report["server_tracebacks"] = stderr.count("Traceback")
        print(stderr[-3000:], file=sys.stderr)
    print_report(report)
    slim = {k: v for k, v in report.items() if not k.startswith("metrics_")}
    delta = {k: report["metrics_after"].get(k, 0) - report["metrics_before"].get(k, 0)
             for k in report["metrics_after"] if k.startswith(("splitllm_tokens", "splitllm_bytes", "splitllm_runs",
                                                              "splitllm_compute", "splitllm_errors", "splitllm_sessions_opened"))}
    print(json.dumps({**slim, "server_metrics_delta": delta}))
    return 1 if report["errors"] or report["client_failovers"] else 0


if __name__ == "__main__":
    sys.exit(main())
