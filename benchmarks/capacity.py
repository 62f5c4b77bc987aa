"""Capacity: how many clients one server carries within their SLA, under all-server, greedy and the DP.

Run: ``python benchmarks/capacity.py [--bundle bundles/smollm2] [--counts 2,4,6,8,10,12,16,20,24,32]
[--tokens 32] [--policies all-server,greedy,dp] [--max-seconds 1200] [--plot capacity.png] [--seed 0]
[--repeats 1] [--sla-scale 1] [--classes fiber,wifi,cable,lte,3g,rural]``

A mixed population (live_workload's client classes: fiber, wifi, cable, LTE, 3G, rural, in that
order and proportion) connects to one ``splitllm-server``, each client through its own emulated
link, on an emulated device slower than this machine, with its own token and TTFT SLAs. For each
policy the client count rises step by step; at each step every client connects, plans (DP or
greedy, asked from the server with the same inputs: ``PlanRequest.algorithm``; all-server runs
split 0 without a plan), warms up, then all generate ``--tokens`` tokens at once. A client is
within its SLA when its median gap between tokens is within its token SLA and its first token
within its TTFT SLA. Capacity = the largest count at which at least 95% of the clients are within
(in every one of ``--repeats`` steps at that count).

So that the measurement is about the server and not this 2-core machine:

- the server runs on core 0 (one ORT thread, batching on) and the benchmark, every client and
  every link on core 1 (``sched_setaffinity``);
- devices are *phantoms*: a local run sleeps the time the client's device would take (this
  machine's 1-thread profile x the device factor) and hands on zeros of the right shape instead
  of computing (the server's work does not depend on the values, and token correctness is tested
  elsewhere), so the clients' core only moves frames;
- the report shows, per step, the server's utilisation (its compute seconds / wall time, from its
  /metrics) and the benchmark process's CPU share of core 1.

First it prints each class's decode plan on the planner's own model (greedy's and the DP's
units on the server and their work, no load): where the two are the same plan, no live run can
show the DP carrying more clients than greedy. ``--classes lte-flagship`` runs the scenario in
which that model says the DP needs none of the server and greedy half of it (``MORE_CLIENTS``).

Prints a table per policy, ``--plot`` draws the curves (matplotlib), and the last line is JSON with
``capacity`` per policy and ``dp_vs_all_server`` / ``dp_vs_greedy`` ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from live_workload import CLIENTS, ClientSpec, metrics, phase_problem

from splitllm import Bundle, Profile, SplitClient, load_or_measure
from splitllm.errors import SplitLLMError
from splitllm.planner import dp, greedy
from splitllm.testing import PhantomDevice, ShapedLink, scaled_profile, spawn_server, stop_server

REPO = Path(__file__).resolve().parents[1]
POLICIES = ("all-server", "greedy", "dp")
TOPICS = ("the sea", "a robot", "bread", "mountains", "a violin", "rain", "chess", "the moon", "tea", "a bridge")
WITHIN = 0.95  # the share of clients within SLA that a count must reach to count as carried
# A class outside live_workload's six, for the scenario in which the planner's own model says the
# DP needs far less of the server than greedy (docs/capacity.md): a phone 3x slower than one core
# here on LTE with a 50 ms round trip. Its device alone meets the 110 ms token SLA, but every
# single split pays the round trip, so greedy, growing the device's prefix from all-server, stops
# at the first prefix that breaks the SLA with about half the model on the server; the DP finds
# all-device. (On the six classes the two plans cost the server within 5% of each other.)
MORE_CLIENTS = (ClientSpec("lte-flagship", 10e6, 30e6, 50, 3, 110, 1100),)
KNOWN = {c.name: c for c in CLIENTS + MORE_CLIENTS}


def _pin(cpu: int) -> None:
    try:
        os.sched_setaffinity(0, {cpu})
    except (AttributeError, OSError, ValueError):
        pass


def _compute_s(m: dict[str, float]) -> float:
    for key in ("splitllm_compute_seconds_total", "splitllm_compute_seconds"):
        if key in m:
            return m[key]
    return 0.0


async def run_step(policy: str, count: int, args: argparse.Namespace, url: str, base: Profile, bundle: Bundle,
                   rng: random.Random) -> dict[str, Any]:
    classes = [KNOWN[name] for name in args.classes]
    specs = [ClientSpec(c.name, c.uplink_bps, c.downlink_bps, c.rtt_ms, c.device_factor, c.token_ms * args.sla_scale,
                        c.ttft_ms * args.sla_scale) for c in (classes[i % len(classes)] for i in range(count))]
    host, port = url.rsplit("/", 1)[-1].split(":")
    links = [ShapedLink(host, int(port), uplink_bps=s.uplink_bps, downlink_bps=s.downlink_bps, rtt_ms=s.rtt_ms)
             for s in specs]
    clients: list[SplitClient] = []
    errors: list[str] = []
    ttft: list[float | None] = [None] * count
    gaps: list[list[float]] = [[] for _ in range(count)]
    tokens = 0
    try:
        for link in links:
            await link.start()
        for spec, link in zip(specs, links, strict=True):
            device = PhantomDevice(bundle, scaled_profile(base, spec.device_factor))
            clients.append(SplitClient(bundle, link.url, split=0, codec=args.codec, speculate="off", device=device,
                                       fallback_local=False, failover_timeout_s=0))
        await asyncio.gather(*(c.connect() for c in clients))
        prompts = [f"Write about {rng.choice(TOPICS)}, part {i}." for i in range(count)]
        ids = [c.text.encode_chat([{"role": "user", "content": p}]) for c, p in zip(clients, prompts, strict=True)]
        if policy != "all-server":
            await asyncio.gather(*(c.plan(ttft_ms=s.ttft_ms, token_ms=s.token_ms, prompt_tokens=len(i),
                                          profile=c.device.profile, algorithm=policy)  # type: ignore[attr-defined]
                                   for c, s, i in zip(clients, specs, ids, strict=True)))

        async def warm(c: SplitClient) -> None:
            # Long enough for a planned client's follower to measure its model error and re-plan.
            async for _ in c.generate("Say hello.", max_new_tokens=args.warmup_tokens, ignore_eos=True):
                pass

        await asyncio.gather(*(warm(c) for c in clients))
        before, cpu0, t0 = await metrics(url), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()

        async def one(i: int, c: SplitClient) -> None:
            nonlocal tokens
            started = last = time.perf_counter()
            try:
                async for piece in c.generate_ids(ids[i], max_new_tokens=args.tokens, ignore_eos=True):
                    if piece.token_id < 0:
                        continue
                    now = time.perf_counter()
                    if ttft[i] is None:
                        ttft[i] = (now - started) * 1e3
                    else:
                        gaps[i].append((now - last) * 1e3)
                    last = now
                    tokens += 1
            except SplitLLMError as exc:
                errors.append(f"{specs[i].name}: {type(exc).__name__}: {exc}")

        await asyncio.wait_for(asyncio.gather(*(one(i, c) for i, c in enumerate(clients))), args.step_seconds)
        wall = time.perf_counter() - t0
        after, cpu1 = await metrics(url), resource.getrusage(resource.RUSAGE_SELF)
    except (SplitLLMError, asyncio.TimeoutError) as exc:
        errors.append(f"step: {type(exc).__name__}: {exc}")
        wall, before, after, cpu0, cpu1 = 0.0, {}, {}, None, None
    finally:
        for c in clients:
            await c.close()
        for link in links:
            await link.close()
    within = []
    per_client = []
    for i, spec in enumerate(specs):
        p50 = float(np.percentile(gaps[i], 50)) if gaps[i] else None
        ok = p50 is not None and p50 <= spec.token_ms and ttft[i] is not None and ttft[i] <= spec.ttft_ms
        within.append(ok)
        follower = clients[i].follower
        per_client.append({"client": spec.name, "p50_ms": p50, "ttft_ms": ttft[i], "within": ok,
                           "server_units": sum(s == "server" for s in clients[i].placement.sides),
                           "model_error_ms": follower.model_error_ms if follower is not None else None})
    busy = _compute_s(after) - _compute_s(before) if after else 0.0
    client_cpu = ((cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)) if cpu0 and cpu1 else 0.0
    plans = after.get("splitllm_plans_total", 0.0) - before.get("splitllm_plans_total", 0.0) if after else 0.0
    return {"policy": policy, "clients": count, "within_sla": sum(within) / count, "errors": len(errors),
            "plans_during_step": int(plans),
            "error_samples": errors[:3], "tokens": tokens, "wall_s": wall,
            "tok_s": tokens / wall if wall else 0.0, "server_ms_per_token": busy * 1e3 / tokens if tokens else None,
            "server_utilisation": busy / wall if wall else None,
            "client_core_share": client_cpu / wall if wall else None, "per_client": per_client}


def _merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One count's repeated steps as one: carried only if every repeat was (the least share within
    SLA counts), errors summed, rates averaged, every client of every repeat listed."""
    if len(runs) == 1:
        return runs[0]
    merged = dict(runs[0])
    merged["within_sla"] = min(r["within_sla"] for r in runs)
    merged["within_sla_runs"] = [r["within_sla"] for r in runs]
    merged["errors"] = sum(r["errors"] for r in runs)
    merged["error_samples"] = [e for r in runs for e in r["error_samples"]][:3]
    merged["tokens"] = sum(r["tokens"] for r in runs)
    merged["plans_during_step"] = sum(r["plans_during_step"] for r in runs)
    for key in ("tok_s", "server_ms_per_token", "server_utilisation", "client_core_share"):
        values = [r[key] for r in runs if r[key] is not None]
        merged[key] = sum(values) / len(values) if values else None
    merged["per_client"] = [c for r in runs for c in r["per_client"]]
    return merged


def planner_view(bundle: Bundle, base: Profile, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each class's decode plan on the planner's own model (the server's 1-thread profile, no load,
    no model error): what greedy and the DP would place on the server and the work it costs."""
    rows = []
    for name in dict.fromkeys(args.classes):
        c = KNOWN[name]
        device = scaled_profile(base, c.device_factor)
        problem = phase_problem(device, base, bundle, args.codec, None, uplink_bps=c.uplink_bps,
                                downlink_bps=c.downlink_bps, rtt_ms=c.rtt_ms, sla_ms=c.token_ms * args.sla_scale)
        g, d = greedy(problem), dp(problem)
        rows.append({"class": name, "device_ms": sum(device.decode_ms), "sla_ms": problem.sla_ms,
                     "greedy_units": sum(s == "server" for s in g.placement), "greedy_work": g.server_work,
                     "dp_units": sum(s == "server" for s in d.placement), "dp_work": d.server_work})
    print("the planner's own model, one decode step per class (server work in ms of its 1-thread profile):")
    for r in rows:
        print(f"  {r['class']:13s} all on device {r['device_ms']:6.1f} ms, SLA {r['sla_ms']:6.1f} ms: greedy "
              f"{r['greedy_units']:2d} units on the server ({r['greedy_work']:5.2f}), DP {r['dp_units']:2d} "
              f"({r['dp_work']:5.2f})")
    return rows


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    bundle = Bundle.open(args.bundle)
    base = load_or_measure(bundle, threads=1)  # this machine, 1 thread: the x1 device
    view = planner_view(bundle, base, args)
    rng = random.Random(args.seed)
    proc, url = spawn_server(args.bundle, ["--threads", "1", "--segment-cache", "12", *args.server_args.split()],
                             preexec_fn=(lambda: _pin(0)))
    _pin(1)
    deadline = time.monotonic() + args.max_seconds
    steps: list[dict[str, Any]] = []
    try:
        for policy in args.policies:
            below = 0
            for count in args.counts:
                if time.monotonic() > deadline:
                    print(f"--max-seconds reached: stopping at {policy} x {count}", flush=True)
                    break
                runs = [await run_step(policy, count, args, url, base, bundle, rng) for _ in range(args.repeats)]
                res = _merge(runs)
                steps.append(res)
                shares = " / ".join(f"{100 * r['within_sla']:.1f}" for r in runs)
                print(f"{policy:10s} {count:3d} clients: {shares}% within SLA, "
                      f"{res['tok_s']:6.1f} tok/s, server {res['server_ms_per_token'] or 0:6.2f} ms/token, "
                      f"server busy {100 * (res['server_utilisation'] or 0):5.1f}%, client core "
                      f"{100 * (res['client_core_share'] or 0):5.1f}%, plans {res['plans_during_step']}, "
                      f"TTFT max {max((c['ttft_ms'] or 0) for c in res['per_client']):5.0f} ms, errors {res['errors']}",
                      flush=True)
                below = below + 1 if res["within_sla"] < WITHIN else 0
                if below >= 2:
                    break  # two counts in a row past capacity: the curve has turned
    finally:
        stop_server(proc)
    capacity = {}
    for policy in args.policies:
        ok = [s["clients"] for s in steps if s["policy"] == policy and s["within_sla"] >= WITHIN and not s["errors"]]
        capacity[policy] = max(ok) if ok else 0
    ratio = lambda a, b: round(capacity[a] / capacity[b], 3) if capacity.get(b) else None  # noqa: E731
    return {"capacity": capacity, "dp_vs_all_server": ratio("dp", "all-server") if "dp" in capacity else None,
            "dp_vs_greedy": ratio("dp", "greedy") if "dp" in capacity else None,
            "errors": sum(s["errors"] for s in steps), "steps": steps, "tokens": args.tokens, "codec": args.codec,
            "seed": args.seed, "sla_scale": args.sla_scale, "repeats": args.repeats, "classes": args.classes,
            "planner_view": view}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for policy in report["capacity"]:
        rows = [s for s in report["steps"] if s["policy"] == policy]
        ax1.plot([r["clients"] for r in rows], [100 * r["within_sla"] for r in rows], marker="o", label=policy)
        ax2.plot([r["clients"] for r in rows], [r["tok_s"] for r in rows], marker="o", label=policy)
    ax1.axhline(100 * WITHIN, color="grey", linestyle="--", linewidth=1)
    ax1.set(xlabel="concurrent clients", ylabel="% of clients within SLA", title="Clients within SLA")
    ax2.set(xlabel="concurrent clients", ylabel="tokens/s (all clients)", title="Aggregate throughput")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, default=REPO / "bundles" / "smollm2")
    p.add_argument("--counts", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4, 6, 8, 10, 12, 16, 20, 24, 32])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--warmup-tokens", type=int, default=16, help="tokens each client generates before the step")
    p.add_argument("--repeats", type=int, default=1,
                   help="steps per count; a count is carried only if every repeat is (one client's miss "
                        "at a small count moves its share by 25-50%%)")
    p.add_argument("--policies", type=lambda s: s.split(","), default=list(POLICIES))
    p.add_argument("--codec", default="int8-block64")
    p.add_argument("--max-seconds", type=float, default=1200.0, help="whole run")
    p.add_argument("--step-seconds", type=float, default=180.0, help="one step's generation")
    p.add_argument("--server-args", default="", help="extra splitllm-server arguments")
    p.add_argument("--plot", type=Path, default=None, help="write the curves to this PNG")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sla-scale", type=float, default=1.0,
                   help="multiply every client class's SLAs (live_workload's) by this factor")
    p.add_argument("--classes", type=lambda s: s.split(","), default=[c.name for c in CLIENTS],
                   help="the client classes of the population, in turn (default: live_workload's six; "
                        "also: " + ", ".join(c.name for c in MORE_CLIENTS) + ")")
    p.add_argument("--planner-only", action="store_true",
                   help="print the planner's own view of each class's decode plan and stop (no server)")
    args = p.parse_args(argv)
    unknown = sorted(set(args.classes) - set(KNOWN))
    if unknown:
        p.error(f"unknown client classes {unknown}; known: {', '.join(KNOWN)}")
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if not (args.bundle / "manifest.json").is_file():
        raise SystemExit(f"no bundle at {args.bundle}: splitllm-export -q -o {args.bundle}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.planner_only:
        bundle = Bundle.open(args.bundle)
        print(json.dumps({"planner_view": planner_view(bundle, load_or_measure(bundle, threads=1), args),
                          "sla_scale": args.sla_scale}))
        return 0
    report = asyncio.run(bench(args))
    print("\ncapacity (clients within SLA at >= 95%): "
          + ", ".join(f"{k} {v}" for k, v in report["capacity"].items())
          + f"; DP / all-server {report['dp_vs_all_server']}, DP / greedy {report['dp_vs_greedy']}")
    if args.plot:
        plot(report, args.plot)
        print(f"curves: {args.plot}")
    print(json.dumps(report))
    return 0 if report["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
