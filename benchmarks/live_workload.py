"""Real clients, real server: server work per generated token under all-server, greedy and the DP.

Run: ``python benchmarks/live_workload.py [--clients 6] [--tokens 32] [--prompts 2] [--rounds 1]
[--max-seconds 900] [--bundle DIR]``. Design, client table and results: docs/adaptive.md.

One ``splitllm-server`` subprocess serves the bundle (SmolLM2-135M by default). For each policy
the same clients (``CLIENTS``: 1-100 Mbit/s, 2-40 ms RTT, devices 4-12x slower than one core
here, tight and loose SLAs) run concurrently, each through its own ShapedLink, each a SlowDevice
that plans with this machine's 1-thread profile scaled by its factor and sleeps to match it.
Each generates ``--tokens`` tokens (``ignore_eos``) for ``--prompts`` prompts, after an
unmeasured setup: connect, plan and two short replies alone (loading sessions starves the
others' bandwidth probes); then, with the server idle again, a fresh policy and one more short
reply each, so policies cannot expire (30 s) mid-run and the server has composed its ranges.

Policies: ``all-server`` (split 0), ``greedy`` (the planner's greedy baseline as a policy, solved
by the server from exactly the inputs the DP gets: ``PlanRequest.algorithm``, followed by the same
client machinery) and ``dp`` (``client.plan``). Measured: server busy seconds (delta of
``splitllm_compute_seconds_total``) per generated token; per client the gaps between streamed
tokens against its token SLA (it *violates* when the p50 is above), steps above the SLA, first
tokens above the TTFT SLA. "Planned" figures evaluate the placements that ran with the
planner's own model, which contention on a shared machine does not move. Last line: one JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from splitllm import Bundle, Placement, Profile, load_or_measure
from splitllm.errors import ServerUnavailable, SplitLLMError
from splitllm.planner import latency_ms, server_work
from splitllm.planner.costs import build_problem
from splitllm.testing.netem import ShapedLink, SlowDevice, scaled_profile
from splitllm.testing.server import spawn

REPO = Path(__file__).resolve().parents[1]
POLICIES = ("all-server", "greedy", "dp")
PROMPTS = ["Explain in two sentences why the sky is blue.", "Write a haiku about a quiet harbour.",
           "List three uses of a paperclip.", "What makes bread rise?"]
WARM_UPS = ("Say hello.", "Say goodbye.", "Say thanks.")  # different: a repeated prompt prefills 1 token
CLIENT_THREADS = 1


@dataclass(frozen=True)
class ClientSpec:
    """One client: its link (bit/s, ms), how much slower its device is than one core here, its SLAs (ms)."""

    name: str
    uplink_bps: float
    downlink_bps: float
    rtt_ms: float
    device_factor: float
    token_ms: float
    ttft_ms: float


CLIENTS = (  # all-local decode as planned: x1 is 24 ms/token here
    ClientSpec("fiber", 100e6, 100e6, 2, 4, 60, 500),  # 96 ms: must offload
    ClientSpec("wifi", 50e6, 100e6, 10, 5, 100, 1000),  # 120 ms: must offload
    ClientSpec("cable", 20e6, 50e6, 20, 6, 200, 2000),  # 144 ms: fits locally
    ClientSpec("lte", 10e6, 30e6, 30, 8, 150, 1500),  # 192 ms: must offload
    ClientSpec("3g", 2e6, 5e6, 40, 10, 300, 3000),  # 240 ms: fits locally
    ClientSpec("rural", 1e6, 2e6, 40, 12, 250, 2500),  # 290 ms: must offload
)


def phase_problem(client: Profile, server: Profile, bundle: Bundle, codec: str, tokens: int | None, *,
                  uplink_bps: float, downlink_bps: float, rtt_ms: float, sla_ms: float, load: float = 1.0) -> Any:
    """The planner problem the server builds (``planning.plan_route``) for a prefill of ``tokens``
    positions, or one decode step (``tokens=None``); server time is scaled by ``load``, work is not."""
    client_ms = client.decode_ms if tokens is None else client.scaled_prefill_ms(tokens)
    server_ms = server.decode_ms if tokens is None else server.scaled_prefill_ms(tokens)
    return build_problem(client_ms=client_ms, server_ms=[ms * load for ms in server_ms], server_work=server_ms,
                         hidden_size=bundle.shapes.hidden_size, tokens=tokens or 1, codec=codec,
                         uplink_bps=uplink_bps, downlink_bps=downlink_bps, rtt_ms=rtt_ms, sla_ms=sla_ms)


@dataclass(frozen=True)
class PlanModel:
    """The planner's own view of a client's placements: load factor 1, the link as set."""

    bundle: Bundle
    device: Profile  # this machine, 1 thread (scaled by each client's factor)
    server: Profile
    codec: str

    def problem(self, spec: ClientSpec, tokens: int | None) -> Any:
        return phase_problem(scaled_profile(self.device, spec.device_factor), self.server, self.bundle, self.codec,
                             tokens, uplink_bps=spec.uplink_bps, downlink_bps=spec.downlink_bps, rtt_ms=spec.rtt_ms,
                             sla_ms=spec.token_ms if tokens is None else spec.ttft_ms)

    def server_ms(self, spec: ClientSpec, placement: tuple[str, ...], tokens: int | None) -> float:
        """Profiled server ms of one prefill of ``tokens`` positions (None: one decode step)."""
        return server_work(self.problem(spec, tokens), placement)


@dataclass
class ClientRun:
    """What one client measured in one policy run (filled in as tokens arrive)."""

    spec: ClientSpec
    tokens: int = 0
    step_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    prefill_placement: tuple[str, ...] = ()
    decode_placement: tuple[str, ...] = ()
    placement_switches: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    measured_uplink_bps: float | None = None
    planned_server_ms: float = 0.0  # what the placements that ran cost the server by its profile
    warm_ranges: set[tuple[int, int]] = field(default_factory=set)  # server ranges used in the warm-up
    ranges: set[tuple[int, int]] = field(default_factory=set)  # ... and in the measured replies

    def summary(self, model: PlanModel) -> dict[str, Any]:
        steps = np.asarray(self.step_ms)
        p50 = float(np.percentile(steps, 50)) if steps.size else None
        return {
            "client": self.spec.name, "tokens": self.tokens,
            "p50_ms": p50, "p95_ms": float(np.percentile(steps, 95)) if steps.size else None,
            "max_ms": float(steps.max()) if steps.size else None,
            "steps": int(steps.size), "steps_over_sla": int((steps > self.spec.token_ms).sum()),
            "violates": p50 is None or p50 > self.spec.token_ms,
            "ttft_ms": self.ttft_ms, "ttft_over_sla": sum(t > self.spec.ttft_ms for t in self.ttft_ms),
            "prefill_placement": describe(self.prefill_placement),
            "decode_placement": describe(self.decode_placement),
            "server_units": sum(s == "server" for s in self.decode_placement),
            "placement_switches": self.placement_switches, "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down, "measured_uplink_bps": self.measured_uplink_bps,
            "planned_decode_ms": latency_ms(model.problem(self.spec, None), self.decode_placement)
            if self.decode_placement else None,
            "planned_server_ms": self.planned_server_ms,
            "spec": asdict(self.spec),
        }


def server_ranges(sides: tuple[str, ...]) -> set[tuple[int, int]]:
    """The unit ranges a placement runs on the server (each one composed session there)."""
    out, start = set(), None
    for unit, side in enumerate((*sides, "client")):
        if side == "server" and start is None:
            start = unit
        elif side != "server" and start is not None:
            out.add((start, unit))
            start = None
    return out


def describe(sides: tuple[str, ...]) -> str:
    """Compact placement: runs of units, e.g. ``C0-11 S12-31`` (0 = embeddings, last = head)."""
    return Placement(sides).compact() if sides else "-"


class BenchClient(SlowDevice):
    """A SlowDevice whose ``plan()`` asks the server for the greedy baseline instead of the DP when
    told to: the server solves it from exactly the inputs the DP would get."""

    def __init__(self, *args: Any, algorithm: str = "dp", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.algorithm = algorithm

    async def plan(self, **kwargs: Any) -> Any:
        return await super().plan(**kwargs, algorithm=self.algorithm)


def _die_with_parent() -> None:
    """In the server child (Linux): get SIGTERM if the benchmark dies, e.g. killed for memory."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_server(bundle: Path) -> tuple[subprocess.Popen[str], str]:
    # 12 composed ranges stay loaded (each holds its layers' weights): composing one takes 1-2 s,
    # so re-composing inside the measurement would distort it.
    return spawn(bundle, ["--segment-cache", "12"],
                 preexec_fn=_die_with_parent if sys.platform == "linux" else None)


async def metrics(url: str) -> dict[str, float]:
    """The server's counters (/metrics), unlabelled series only."""
    try:
        async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as resp:
            text = await resp.text()
    except (aiohttp.ClientError, OSError) as exc:
        raise ServerUnavailable(f"GET {url}/metrics failed: {exc}") from exc
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and not line.startswith("#") and "{" not in parts[0]:
            out[parts[0]] = float(parts[1])
    return out


async def wait_until_idle(url: str, max_wait_s: float = 15.0) -> float:
    """Wait for the server's load factor (10 s window) to decay, so one policy's load does not
    leak into the next one's plans. Returns the last load factor seen."""
    deadline = time.monotonic() + max_wait_s
    while True:
        load = (await metrics(url))["splitllm_load_factor"]
        if load <= 1.05 or time.monotonic() > deadline:
            return load
        await asyncio.sleep(1.0)


async def run_client(spec: ClientSpec, policy: str, args: argparse.Namespace, port: int, model: PlanModel,
                     result: ClientRun, setup: asyncio.Lock, gates: list[tuple[asyncio.Event, asyncio.Event]],
                     prompts: list[str]) -> None:
    """Set up and warm up (alone: loading sessions starves the others' probes); at the first gate
    fetch a fresh policy (alone) and warm up once more, so every client measures with a policy
    younger than its 30 s validity; at the second gate, measure. A gate is (arrived, open)."""
    base = model.device
    async with ShapedLink("127.0.0.1", port, uplink_bps=spec.uplink_bps, downlink_bps=spec.downlink_bps,
                          rtt_ms=spec.rtt_ms) as link:
        client = BenchClient(args.bundle, link.url, split=0, codec=args.codec, threads=CLIENT_THREADS,
                             device_factor=spec.device_factor, base_profile=base, algorithm=policy)
        client.device.max_segments = 3  # prefill + up to two decode runs; six clients' weights must fit in memory
        # Plan for the prefill the measured replies run: the chat template's system prefix is cached
        # from the reply before, so only the rest is new (the SDK asks for a new policy whenever a
        # prefill is not within 0.5-2x the planned length).
        ids = client.text.encode_chat([{"role": "user", "content": prompts[0]}])
        warm = client.text.encode_chat([{"role": "user", "content": WARM_UPS[-1]}])
        shared = next((i for i, (a, b) in enumerate(zip(ids, warm, strict=False)) if a != b), min(len(ids), len(warm)))
        plan_args = {"ttft_ms": spec.ttft_ms, "token_ms": spec.token_ms, "prompt_tokens": len(ids) - shared,
                     "profile": scaled_profile(base, spec.device_factor)}

        async def warm_up(prompt: str) -> None:
            async for _ in client.generate(prompt, max_new_tokens=4, ignore_eos=True):
                result.warm_ranges |= server_ranges(client.placement.sides)

        try:
            async with setup:
                await client.connect()
                if policy != "all-server":
                    await client.plan(**plan_args)
                for prompt in WARM_UPS[:-1]:  # the first reply's frames move the uplink estimate
                    await warm_up(prompt)
            gates[0][0].set()
            await gates[0][1].wait()
            if policy != "all-server":
                async with setup:
                    await client.plan(**plan_args)
            await warm_up(WARM_UPS[-1])
            gates[1][0].set()
            await gates[1][1].wait()
            switches, up, down = client.placements_used, link.counters.bytes_up, link.counters.bytes_down
            for prompt in prompts:
                last, first = time.perf_counter(), True
                async for piece in client.generate(prompt, max_new_tokens=args.tokens, ignore_eos=True):
                    if piece.token_id < 0:
                        continue  # the decoder's flushed tail, not a step
                    now = time.perf_counter()
                    placement = client.placement.sides  # the placement this token was computed with
                    result.ranges |= server_ranges(placement)
                    if first:
                        result.ttft_ms.append((now - last) * 1e3)
                        result.prefill_placement = placement
                        tokens: int | None = client.last_stats.prefill_tokens
                    else:
                        result.step_ms.append((now - last) * 1e3)
                        tokens = None
                    result.planned_server_ms += model.server_ms(spec, placement, tokens)
                    result.tokens += 1
                    last, first = now, False
                result.decode_placement = client.placement.sides
                result.placement_switches = client.placements_used - switches
                result.bytes_up = link.counters.bytes_up - up
                result.bytes_down = link.counters.bytes_down - down
                result.measured_uplink_bps = client.link.uplink_bps_ewma
        finally:
            await client.close()


async def run_policy(policy: str, specs: list[ClientSpec], args: argparse.Namespace, url: str, model: PlanModel,
                     budget_s: float) -> dict[str, Any]:
    port = int(url.rsplit(":", 1)[1])
    await wait_until_idle(url)
    results = [ClientRun(spec) for spec in specs]
    gates = [[(asyncio.Event(), asyncio.Event()) for _ in specs] for _ in range(2)]  # per gate, per client
    setup = asyncio.Lock()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    tasks = [asyncio.ensure_future(run_client(s, policy, args, port, model, r, setup, [g[i] for g in gates], prompts))
             for i, (s, r) in enumerate(zip(specs, results, strict=True))]
    started = time.monotonic()
    arrivals = [asyncio.gather(*(arrived.wait() for arrived, _ in gate)) for gate in gates]
    try:
        for n, arrived in enumerate(arrivals):
            left = max(budget_s - (time.monotonic() - started), 1.0)
            await asyncio.wait([arrived, *tasks], timeout=left, return_when=asyncio.FIRST_COMPLETED)
            for t in tasks:
                if t.done():
                    t.result()  # a client failed before the measurement: raise its error
            if not arrived.done():
                raise ServerUnavailable(f"{policy}: the clients were not ready within {budget_s:.0f} s")
            if n == 0:
                await wait_until_idle(url)  # the warm-ups' load must not weigh on the fresh policies
            else:
                before, load_before = await metrics(url), os.getloadavg()[0]
            for _, open_ in gates[n]:
                open_.set()
        measured_at = time.perf_counter()
        done, pending = await asyncio.wait(tasks, timeout=max(budget_s - (time.monotonic() - started), 1.0))
        for t in done:
            t.result()
        wall_s = time.perf_counter() - measured_at
        after = await metrics(url)
    finally:
        for t in (*arrivals, *tasks):
            t.cancel()
        await asyncio.gather(*arrivals, *tasks, return_exceptions=True)
    tokens = sum(r.tokens for r in results)
    busy_s = after["splitllm_compute_seconds_total"] - before["splitllm_compute_seconds_total"]
    clients = [r.summary(model) for r in results]
    planned = sum(c["planned_server_ms"] for c in clients)
    return {
        "policy": policy, "complete": not pending, "wall_s": wall_s,
        "machine_load_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)], "tokens": tokens, "server_busy_s": busy_s,
        "server_ms_per_token": busy_s * 1e3 / tokens if tokens else None,
        "planned_server_ms_per_token": planned / tokens if tokens else None,
        "server_runs": int(after["splitllm_runs_total"] - before["splitllm_runs_total"]),
        "plan_requests": int(after["splitllm_plans_total"] - before["splitllm_plans_total"]),
        # Server ranges first used after the warm-up: each was composed (1-2 s, counted as compute).
        "new_server_ranges": len(set().union(*(r.ranges for r in results))
                                 - set().union(*(r.warm_ranges for r in results))),
        "violating_clients": sum(c["violates"] for c in clients),
        "steps_over_sla": sum(c["steps_over_sla"] for c in clients), "steps": sum(c["steps"] for c in clients),
        "ttft_over_sla": sum(c["ttft_over_sla"] for c in clients), "clients": clients,
    }


def print_policy(res: dict[str, Any]) -> None:
    per_tok = res["server_ms_per_token"]
    planned = res["planned_server_ms_per_token"]
    print(f"\n== {res['policy']}: server busy {res['server_busy_s']:.2f} s for {res['tokens']} tokens = "
          f"{per_tok if per_tok is None else round(per_tok, 2)} ms/token (planned "
          f"{planned if planned is None else round(planned, 2)}); wall {res['wall_s']:.1f} s; "
          f"{res['violating_clients']} of {len(res['clients'])} clients violate (p50 > SLA); steps over SLA "
          f"{res['steps_over_sla']}/{res['steps']}; TTFT over SLA {res['ttft_over_sla']}; {res['server_runs']} server "
          f"runs, {res['new_server_ranges']} server ranges first used after the warm-up, {res['plan_requests']} re-plans; "
          f"machine load "
          f"{res['machine_load_1min'][0]:.1f} -> {res['machine_load_1min'][1]:.1f}"
          + ("" if res["complete"] else "  [INCOMPLETE: --max-seconds hit]"))
    print(f"{'client':7} {'up/down Mbit/s':>14} {'RTT':>4} {'dev':>4} {'SLA ms':>6} {'p50 ms':>7} {'p95 ms':>7} "
          f"{'max ms':>7} {'>SLA':>6} {'TTFT ms':>13} {'srv units':>9} {'moves':>5} {'MB up/dn':>10} "
          f"{'est up':>7} {'plan ms':>7}  placement: prefill | decode (C client, S server; units 0..L+1)")
    for c in res["clients"]:
        s = c["spec"]
        ttft = "/".join(f"{t:.0f}" for t in c["ttft_ms"])
        est = c["measured_uplink_bps"]
        print(f"{c['client']:7} {s['uplink_bps'] / 1e6:>6g}/{s['downlink_bps'] / 1e6:<7g} {s['rtt_ms']:>4g} "
              f"x{s['device_factor']:<3g} {s['token_ms']:>6g} {c['p50_ms'] or 0:>7.1f} {c['p95_ms'] or 0:>7.1f} "
              f"{c['max_ms'] or 0:>7.0f} {c['steps_over_sla']:>3}/{c['steps']:<2} {ttft:>13} "
              f"{c['server_units']:>9} {c['placement_switches']:>5} "
              f"{c['bytes_up'] / 1e6:>4.2f}/{c['bytes_down'] / 1e6:<5.2f} "
              f"{'-' if est is None else f'{est / 1e6:.3g}':>7} {c['planned_decode_ms'] or 0:>7.1f}  {c['prefill_placement']} | {c['decode_placement']}"
              + ("  VIOLATES" if c["violates"] else ""))


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    bundle = Bundle.open(args.bundle)
    specs = [CLIENTS[i % len(CLIENTS)] for i in range(args.clients)]
    specs = [s if i < len(CLIENTS) else ClientSpec(f"{s.name}{i // len(CLIENTS)}", *list(asdict(s).values())[1:])
             for i, s in enumerate(specs)]
    base = load_or_measure(bundle, threads=CLIENT_THREADS)  # this machine, 1 thread: the x1 device
    server = load_or_measure(bundle, threads=0)  # the server's profile, cached before the server needs it
    model = PlanModel(bundle, base, server, args.codec)
    print(f"bundle {bundle.model_id}: {bundle.num_units} units; device x1 decode {sum(base.decode_ms):.1f} ms/token, "
          f"prefill {sum(base.prefill_ms):.0f} ms for {base.prefill_tokens} tokens", flush=True)
    deadline = time.monotonic() + args.max_seconds
    proc, url = start_server(Path(args.bundle))
    results: list[dict[str, Any]] = []
    try:
        order = [p for r in range(args.rounds) for p in (POLICIES if r % 2 == 0 else POLICIES[::-1])]
        for i, policy in enumerate(order):
            budget = (deadline - time.monotonic()) / (len(order) - i)
            if budget < 10:
                print(f"skipping {policy}: --max-seconds reached", flush=True)
                continue
            res = await run_policy(policy, specs, args, url, model, budget)
            print_policy(res)
            results.append(res)
            gc.collect()  # the policy's clients and their sessions go before the next ones load
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return summarise(results, args)


def summarise(results: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    per_policy: dict[str, dict[str, Any]] = {}
    for p in POLICIES:
        runs = [r for r in results if r["policy"] == p and r["tokens"]]
        if runs:
            tokens = sum(r["tokens"] for r in runs)
            per_policy[p] = {
                "server_ms_per_token": sum(r["server_busy_s"] for r in runs) * 1e3 / tokens,
                "planned_server_ms_per_token": sum(r["planned_server_ms_per_token"] * r["tokens"] for r in runs) / tokens,
                "tokens": tokens, "violating_clients": [r["violating_clients"] for r in runs],
                **{k: sum(r[k] for r in runs) for k in ("steps_over_sla", "steps", "ttft_over_sla")},
            }

    def reduction(a: str, b: str, key: str) -> float | None:
        if a in per_policy and b in per_policy and per_policy[b][key] > 0:
            return 1 - per_policy[a][key] / per_policy[b][key]
        return None

    out = {"bench": "live_workload", "clients": args.clients, "tokens": args.tokens, "prompts": args.prompts,
           "rounds": args.rounds, "codec": args.codec, "per_policy": per_policy}
    for key, label in (("server_ms_per_token", "measured server busy"),
                       ("planned_server_ms_per_token", "planned (profile) server")):
        print(f"\n{label} ms per generated token: "
              + ", ".join(f"{p} {v[key]:.2f}" for p, v in per_policy.items()))
        red_all, red_greedy = reduction("dp", "all-server", key), reduction("dp", "greedy", key)
        if red_all is not None or red_greedy is not None:
            print(" ".join(f"DP vs {b}: {100 * r:.1f}% less." for b, r in (("all-server", red_all), ("greedy", red_greedy))
                           if r is not None))
        out[f"dp_vs_all_server_{key}"], out[f"dp_vs_greedy_{key}"] = red_all, red_greedy
    out["runs"] = results
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=str(REPO / "bundles" / "smollm2"))
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=32, help="tokens generated per prompt")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per client and policy")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the policies, alternating their order")
    parser.add_argument("--codec", default="int8-block64")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="whole run, server start included")
    args = parser.parse_args()
    if args.clients < 1 or args.tokens < 2 or args.prompts < 1 or args.rounds < 1:
        parser.error("--clients, --prompts and --rounds must be >= 1 and --tokens >= 2")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        out = asyncio.run(bench(args))
    except SplitLLMError as exc:
        print(f"live_workload: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
