"""Replicas: 3 splitllm-server processes behind HAProxy; one is killed and one drained mid-generation.

Run: ``python benchmarks/replicas.py [--bundle DIR] [--replicas 3] [--clients 16] [--tokens 256]
[--pace-ms 20] [--drain-grace 3] [--max-seconds 600]``

HAProxy (the distribution's package, ``apt-get install haproxy``; the script exits 0 with a
"skipped" line when it is absent) runs ``deploy/haproxy.cfg`` with only its bind address and
``server`` lines rewritten for loopback ports. Every replica serves the same bundle (default: a
4-layer tiny Llama exported to a temporary directory, so the run fits a small shared machine;
``--bundle`` takes any other). ``--clients`` SplitClients (split 1, fp32 codec, greedy,
``ignore_eos``) connect through the balancer and generate ``--tokens`` tokens each, reading one
token every ``--pace-ms`` so the disruptions land mid-generation:

1. an undisturbed run, all replicas up: the reference tokens;
2. the same run again; once every client has a quarter of its tokens, the replica holding the
   most sessions is SIGKILLed; once every client has made progress after that, the replica now
   holding the most sessions gets SIGTERM (graceful drain: /readyz turns 503 at once and HAProxy
   takes it out; after ``--drain-grace`` it finishes the step in flight, sends each client Close
   "server draining; reconnect", exits). Clients reconnect through HAProxy and
   replay their conversation on the remaining replica(s).

Reported: sessions per replica before and after each event (GET /metrics of each replica),
failovers after each event (a client that was on the killed or drained replica fails over once), the time from each event until every client has produced a token again
(``recover_s``), the largest gap between two tokens of a client, the drained replica's exit code,
and whether every client's tokens equal the undisturbed run's. Last line: one JSON object with
``errors``, ``tokens_identical``, ``replicas``, ``killed``, ``drained``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from splitllm import Bundle, SplitClient
from splitllm.errors import SplitLLMError
from splitllm.testing.server import spawn, stop

REPO = Path(__file__).resolve().parents[1]
HAPROXY_CFG = REPO / "deploy" / "haproxy.cfg"
TOPICS = ("the sea", "a robot", "bread", "mountains", "a violin", "rain", "chess", "the moon")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def haproxy_config(ports: list[int], bind_port: int, max_sessions: int) -> str:
    """deploy/haproxy.cfg with the bind address and the server lines set for loopback."""
    text = HAPROXY_CFG.read_text()
    text = re.sub(r"^(\s*)bind .*$", rf"\1bind 127.0.0.1:{bind_port}", text, flags=re.M)
    text = re.sub(r"maxconn 256$", f"maxconn {max_sessions}", text, flags=re.M)
    text = re.sub(r"^\s*log stdout.*\n", "", text, flags=re.M)
    text = re.sub(r"^\s*server .*\n", "", text, flags=re.M)
    servers = "".join(f"    server replica{i + 1} 127.0.0.1:{port}\n" for i, port in enumerate(ports))
    return text.rstrip("\n") + "\n" + servers


async def wait_ready(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(url + "/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit(f"{url} never became ready (/readyz)")


async def sessions(urls: list[str]) -> list[int | None]:
    """splitllm_sessions_active of each replica (None: not answering)."""
    out: list[int | None] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        for url in urls:
            try:
                async with http.get(url + "/metrics") as r:
                    text = await r.text()
                match = re.search(r"^splitllm_sessions_active (\S+)$", text, flags=re.M)
                out.append(int(float(match.group(1))) if match else None)
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
                out.append(None)
    return out


class Run:
    """One round of all clients; records every token's time per client."""

    def __init__(self, bundle: Bundle, url: str, args: argparse.Namespace) -> None:
        self.bundle, self.url, self.args = bundle, url, args
        self.times: list[list[float]] = [[] for _ in range(args.clients)]
        self.ids: list[list[int] | None] = [None] * args.clients
        self.errors: list[str] = []
        self.clients: list[SplitClient] = []

    @property
    def failovers(self) -> int:
        return sum(c.failovers for c in self.clients)

    def progress(self) -> list[int]:
        return [len(t) for t in self.times]

    async def client(self, i: int) -> None:
        prompt = self.bundle.text.encode_chat([{"role": "user", "content": f"Tell me about {TOPICS[i % 8]} ({i})."}])
        try:
            async with SplitClient(self.bundle, self.url, split=1, codec="fp32", threads=1, allow_spinning=False,
                                   failover_timeout_s=60, fallback_local=False, timeout_s=60) as client:
                self.clients.append(client)
                async for _ in client.generate_ids(prompt, max_new_tokens=self.args.tokens, ignore_eos=True):
                    self.times[i].append(time.monotonic())
                    await asyncio.sleep(self.args.pace_ms / 1e3)
                self.ids[i] = list(client.last_stats.new_ids)
        except SplitLLMError as exc:
            self.errors.append(f"client {i}: {type(exc).__name__}: {exc}")

    async def run(self) -> None:
        await asyncio.gather(*(self.client(i) for i in range(self.args.clients)))


async def until(condition, timeout_s: float) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.01)
    return False


def recover_s(run: Run, at: float) -> float | None:
    """Seconds from ``at`` until every unfinished client has produced a token after it."""
    firsts = []
    for times in run.times:
        if times and times[-1] <= at and len(times) >= run.args.tokens:
            continue  # it had finished already
        after = [t for t in times if t > at]
        if not after:
            return None
        firsts.append(after[0])
    return round(max(firsts) - at, 3) if firsts else 0.0


async def main_async(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="splitllm-replicas-") as tmp:
        bundle_path = Path(args.bundle) if args.bundle else Path(tmp) / "tiny"
        if not args.bundle:
            print("exporting a tiny 4-layer Llama bundle ...", flush=True)
            subprocess.run([sys.executable, "-m", "splitllm_export.cli", "--tiny", "llama", "--layers", "4",
                            "-q", "-o", str(bundle_path)], check=True, timeout=600, stdout=subprocess.DEVNULL)
        bundle = Bundle.open(bundle_path)
        ports = [free_port() for _ in range(args.replicas)]
        lb_port = free_port()
        max_sessions = 2 * args.clients
        procs = []
        for port in ports:
            proc, _ = spawn(bundle_path, ["--port", str(port), "--threads", "1", "--no-verify",
                                          "--max-sessions", str(max_sessions), "--trusted-proxy", "127.0.0.1",
                                          "--drain-timeout", "10", "--drain-grace", str(args.drain_grace)], stderr=subprocess.DEVNULL)
            procs.append(proc)
        # spawn passes --port 0 first; our --port comes later and wins.
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        cfg = Path(tmp) / "haproxy.cfg"
        cfg.write_text(haproxy_config(ports, lb_port, max_sessions))
        lb = subprocess.Popen([args.haproxy, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        lb_url = f"http://127.0.0.1:{lb_port}"
        try:
            for url in urls:
                await wait_ready(url)
            await wait_ready(lb_url)
            await asyncio.sleep(2.5)  # HAProxy's checks (inter 1s, rise 2) see every replica up
            started = time.monotonic()
            reference = Run(bundle, lb_url, args)
            await asyncio.wait_for(reference.run(), args.max_seconds)
            reference_s = time.monotonic() - started
            print(f"undisturbed run: {args.clients} clients x {args.tokens} tokens in {reference_s:.1f} s, "
                  f"errors {len(reference.errors)}", flush=True)

            run = Run(bundle, lb_url, args)
            task = asyncio.create_task(run.run())
            report: dict = {"spread": {}}
            quarter = max(1, args.tokens // 4)
            await until(lambda: min(run.progress()) >= quarter, args.max_seconds)
            spread = await sessions(urls)
            report["spread"]["before"] = spread
            victim = max(range(len(urls)), key=lambda i: spread[i] or 0)
            killed_at = time.monotonic()
            procs[victim].send_signal(signal.SIGKILL)
            procs[victim].wait()
            print(f"SIGKILL replica {victim + 1} holding {spread[victim]} sessions (spread {spread})", flush=True)
            mark = run.progress()
            await until(lambda: all(p > m or p >= args.tokens for p, m in zip(run.progress(), mark, strict=True)),
                        args.max_seconds)
            spread = await sessions(urls)
            report["spread"]["after_kill"] = spread
            alive = [i for i in range(len(urls)) if i != victim]
            drained = max(alive, key=lambda i: spread[i] or 0)
            failovers_before_drain = run.failovers
            drained_at = time.monotonic()
            procs[drained].send_signal(signal.SIGTERM)
            print(f"SIGTERM replica {drained + 1} holding {spread[drained]} sessions (spread {spread})", flush=True)
            await asyncio.wait_for(task, args.max_seconds)
            drain_exit = procs[drained].wait(timeout=60)
            report["spread"]["after_drain"] = await sessions(urls)
        finally:
            lb.terminate()
            lb.wait(timeout=30)
            for proc in procs:
                stop(proc)

    identical = [a == b for a, b in zip(run.ids, reference.ids, strict=True)]
    gaps = [max((b - a for a, b in zip(t, t[1:], strict=False)), default=0.0) for t in run.times]
    return {
        "replicas": args.replicas, "clients": args.clients, "tokens_per_client": args.tokens,
        "bundle": bundle.model_id, "codec": "fp32",
        "killed": 1, "drained": 1, "killed_replica": victim + 1, "drained_replica": drained + 1,
        "drained_exit_code": drain_exit,
        "errors": len(run.errors) + len(reference.errors), "error_messages": (reference.errors + run.errors)[:5],
        "tokens_identical": all(identical) and all(ids is not None for ids in run.ids),
        "clients_identical": sum(identical), "failovers": run.failovers,
        "failovers_after_kill": failovers_before_drain, "failovers_after_drain": run.failovers - failovers_before_drain,
        "recover_after_kill_s": recover_s(run, killed_at),
        "recover_after_drain_s": recover_s(run, drained_at + args.drain_grace),  # the Closes go out then
        "max_token_gap_s": round(max(gaps), 3), "undisturbed_s": round(reference_s, 2),
        "sessions_per_replica": report["spread"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", default=None, help="bundle directory (default: a tiny Llama exported to a temp dir)")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--pace-ms", type=float, default=20.0, help="each client's pause after every token")
    p.add_argument("--max-seconds", type=float, default=600.0)
    p.add_argument("--drain-grace", type=float, default=3.0,
                   help="the replicas' --drain-grace: HAProxy's checks (inter 1 s, fall 2) need about 2 s")
    p.add_argument("--haproxy", default=shutil.which("haproxy") or "/usr/sbin/haproxy")
    args = p.parse_args()
    if args.replicas < 3:
        raise SystemExit("--replicas must be >= 3 (one is killed, one drained, one must stay)")
    if not Path(args.haproxy).is_file():
        print("replicas benchmark skipped: haproxy is not installed (apt-get install haproxy; .ci/run does)")
        print(json.dumps({"skipped": "haproxy not installed", "errors": None, "tokens_identical": None,
                          "replicas": args.replicas, "killed": 0, "drained": 0}))
        return 0
    report = asyncio.run(main_async(args))
    print(f"sessions per replica: {report['sessions_per_replica']}")
    print(f"killed replica {report['killed_replica']}: every client produced again after "
          f"{report['recover_after_kill_s']} s; drained replica {report['drained_replica']} (exit "
          f"{report['drained_exit_code']}): after {report['recover_after_drain_s']} s; "
          f"failovers {report['failovers_after_kill']} + {report['failovers_after_drain']}, "
          f"largest token gap {report['max_token_gap_s']} s")
    print(f"tokens identical to the undisturbed run: {report['clients_identical']}/{report['clients']}; "
          f"errors {report['errors']}")
    print(json.dumps(report))
    return 0 if report["tokens_identical"] and report["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
