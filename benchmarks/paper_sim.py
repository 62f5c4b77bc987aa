"""Server workload of all-server, greedy and the DP on a simulated client population.

Checks the SplitLLM paper's claim (arXiv 2410.10759): the DP placement needs about 1/3 less
server work than serving everything, and 19% less than a greedy placement. Whatever comes out
is printed; the distributions below were fixed before looking at the results.

Run: ``python benchmarks/paper_sim.py [--clients 2000] [--seed 0] [--bundle DIR]``

Models (cost tables derived from public shapes; FLOPs count a multiply-add as 2; one request
is one forward pass; the embedding and the head are units like the layers):

- transformer-base: d 512, ff 2048, 6 encoder + 6 decoder layers, vocab 37,000; 32 source and
  32 target tokens, decoder run teacher-forced in one pass. Units: src-embed, enc.0-5,
  tgt-embed, dec.0-5, head. After the target embedding the chain carries target states *and*
  the encoder memory (the decoder's cross-attention needs both), so those boundaries are bigger.
- bert-base: d 768, ff 3072, 12 layers, 128 tokens; head = pooler + 2-way classifier.
- gpt2-small: d 768, ff 3072, 12 layers, vocab 50,257, a 256-token prompt (prefill).
- vit-base/16: 224x224 RGB image (150,528 input bytes), 196 patches + CLS, d 768, ff 3072,
  12 layers, 1,000 classes.

Layer FLOPs: T (8 d^2 + 4 d ff) + 4 T^2 d (+ cross-attention for decoder layers); the head
runs on every position it would in a plain forward pass. Activations cross the wire as fp16
(2 bytes/value, the codec's lossless rung); token-id inputs are 4 bytes per token. The head's
output is the sampled token ids / class id (4 bytes per output position): sampling happens
where the head runs, so a plan that keeps the head on the client receives hidden states instead.

Client population (independent draws per client, seeded):

- device effective compute: log-uniform 10 GFLOP/s .. 1 TFLOP/s (phone CPU .. laptop GPU);
- uplink: log-uniform 1 .. 100 Mbit/s; downlink = uplink x uniform(1, 10);
- RTT: uniform 10 .. 100 ms;
- SLA: log-uniform 100 ms .. 2 s (interactive request budgets).

Server: effective 20 TFLOP/s for one request at a time, so server_ms = FLOPs / 2e13 s and the
server work of a layer is its FLOPs. Queueing: one FIFO server per model, Poisson arrivals at
the rate that puts the all-server policy at utilisation 0.8, the same arrival times for every
policy; a request's service time is the server time of its plan (requests with no server layer
skip the queue). The planner's latency model does not include queueing; "SLA+wait" counts
requests whose planned latency plus queue wait exceeds the SLA.

``--bundle DIR`` adds the cost table of a SplitLLM bundle (``DIR/manifest.json``, key ``cost``)
for a prefill of ``--bundle-tokens`` tokens, using ``flops_per_token_prefill`` and fp16 wire
activations (half of ``out_bytes_per_token``); the head's output is the 4-byte sampled token.

Last line: one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from splitllm.planner import Layer, Plan, Problem, all_server, dp, greedy

FP16_BYTES = 2
TOKEN_BYTES = 4
SERVER_FLOPS_PER_S = 20e12
CAPACITY_WITHIN = 0.95  # as benchmarks/capacity.py: a rate counts if 95% of requests meet their SLA
UTILISATION = 0.8
POLICIES = ("all-server", "greedy", "dp")


@dataclass(frozen=True)
class Unit:
    name: str
    flops: float
    out_bytes: float


@dataclass(frozen=True)
class CostTable:
    name: str
    units: tuple[Unit, ...]
    input_bytes: float


def block_flops(tokens: int, d: int, ff: int, context: int | None = None) -> float:
    """One encoder/decoder self-attention block over ``tokens`` positions attending to ``context``."""
    ctx = tokens if context is None else context
    return tokens * (8 * d * d + 4 * d * ff) + 4 * tokens * ctx * d


def encoder_stack(prefix: str, layers: int, tokens: int, d: int, ff: int) -> list[Unit]:
    return [Unit(f"{prefix}.{i}", block_flops(tokens, d, ff), tokens * d * FP16_BYTES) for i in range(layers)]


def transformer_base(src: int = 32, tgt: int = 32) -> CostTable:
    d, ff, vocab = 512, 2048, 37_000
    carried = (src + tgt) * d * FP16_BYTES  # decoder states + encoder memory
    cross = tgt * 4 * d * d + src * 4 * d * d + 4 * tgt * src * d  # Q,O on targets, K,V on memory, scores
    units = [Unit("src-embed", src * d, src * d * FP16_BYTES), *encoder_stack("enc", 6, src, d, ff)]
    units.append(Unit("tgt-embed", tgt * d, carried))
    units += [Unit(f"dec.{i}", block_flops(tgt, d, ff) + cross, carried) for i in range(6)]
    units.append(Unit("head", 2 * tgt * d * vocab, tgt * TOKEN_BYTES))
    return CostTable("transformer-base", tuple(units), (src + tgt) * TOKEN_BYTES)


def bert_base(tokens: int = 128) -> CostTable:
    d, ff = 768, 3072
    units = [Unit("embed", tokens * d, tokens * d * FP16_BYTES), *encoder_stack("layer", 12, tokens, d, ff)]
    units.append(Unit("head", 2 * d * d + 2 * d * 2, TOKEN_BYTES))
    return CostTable("bert-base", tuple(units), tokens * TOKEN_BYTES)


def gpt2_small(tokens: int = 256) -> CostTable:
    d, ff, vocab = 768, 3072, 50_257
    units = [Unit("embed", tokens * d, tokens * d * FP16_BYTES), *encoder_stack("layer", 12, tokens, d, ff)]
    units.append(Unit("head", 2 * tokens * d * vocab, TOKEN_BYTES))  # next token after the prompt
    return CostTable("gpt2-small", tuple(units), tokens * TOKEN_BYTES)


def vit_base() -> CostTable:
    d, ff, patches = 768, 3072, 196
    tokens = patches + 1
    units = [Unit("patch-embed", 2 * patches * (16 * 16 * 3) * d, tokens * d * FP16_BYTES)]
    units += encoder_stack("layer", 12, tokens, d, ff)
    units.append(Unit("head", 2 * d * 1000, TOKEN_BYTES))
    return CostTable("vit-base", tuple(units), 224 * 224 * 3)


def bundle_table(directory: Path, tokens: int) -> CostTable:
    """The cost table of a bundle's manifest for a prefill of ``tokens`` tokens."""
    manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    cost = manifest["cost"]
    units = []
    for unit in cost["units"]:
        out = TOKEN_BYTES if unit["kind"] == "head" else unit["out_bytes_per_token"] * tokens * FP16_BYTES / 4
        units.append(Unit(unit["name"], float(unit["flops_per_token_prefill"]) * tokens, out))
    name = f"bundle:{manifest.get('model_id', directory.name)}"
    return CostTable(name, tuple(units), float(cost["input_bytes_per_token"]) * tokens)


@dataclass(frozen=True)
class Clients:
    """The population, one entry per client (arrays of shape (N,))."""

    device_flops_per_s: np.ndarray
    uplink_bps: np.ndarray
    downlink_bps: np.ndarray
    rtt_ms: np.ndarray
    sla_ms: np.ndarray


def log_uniform(rng: np.random.Generator, lo: float, hi: float, n: int) -> np.ndarray:
    return np.exp(rng.uniform(np.log(lo), np.log(hi), n))


def draw_clients(rng: np.random.Generator, n: int) -> Clients:
    uplink = log_uniform(rng, 1e6, 100e6, n)
    return Clients(
        device_flops_per_s=log_uniform(rng, 10e9, 1e12, n),
        uplink_bps=uplink,
        downlink_bps=uplink * rng.uniform(1.0, 10.0, n),
        rtt_ms=rng.uniform(10.0, 100.0, n),
        sla_ms=log_uniform(rng, 100.0, 2000.0, n),
    )


def problem_for(table: CostTable, clients: Clients, i: int) -> Problem:
    device = clients.device_flops_per_s[i]
    layers = tuple(
        Layer(
            client_ms=u.flops / device * 1e3,
            server_ms=u.flops / SERVER_FLOPS_PER_S * 1e3,
            server_work=u.flops / 1e9,  # GFLOP
            out_bytes=u.out_bytes,
            name=u.name,
        )
        for u in table.units
    )
    return Problem(
        layers=layers,
        input_bytes=table.input_bytes,
        uplink_bps=float(clients.uplink_bps[i]),
        downlink_bps=float(clients.downlink_bps[i]),
        rtt_ms=float(clients.rtt_ms[i]),
        sla_ms=float(clients.sla_ms[i]),
    )


def fifo_waits_ms(arrivals_s: np.ndarray, service_s: np.ndarray) -> np.ndarray:
    """Queue waits (ms) of a FIFO single server, by Lindley's recursion, for requests with service > 0."""
    used = service_s > 0
    arr, svc = arrivals_s[used], service_s[used]
    waits = np.zeros(arr.size)
    free_at = 0.0
    for k in range(arr.size):
        start = max(arr[k], free_at)
        waits[k] = start - arr[k]
        free_at = start + svc[k]
    return waits * 1e3


def simulate(table: CostTable, clients: Clients, rng: np.random.Generator) -> dict[str, Any]:
    n = clients.sla_ms.size
    plans: dict[str, list[Plan]] = {name: [] for name in POLICIES}
    solvers = {"all-server": all_server, "greedy": greedy, "dp": dp}
    started = time.perf_counter()
    for i in range(n):
        problem = problem_for(table, clients, i)
        for name in POLICIES:
            plans[name].append(solvers[name](problem))
    elapsed_s = time.perf_counter() - started
    server_ms_of = {u.name: u.flops / SERVER_FLOPS_PER_S * 1e3 for u in table.units}
    names = [u.name for u in table.units]

    def service_s(plan: Plan) -> float:
        return (
            sum(server_ms_of[nm] for nm, side in zip(names, plan.placement, strict=True) if side == "server")
            / 1e3
        )

    all_server_service = np.array([service_s(p) for p in plans["all-server"]])
    rate_per_s = UTILISATION / all_server_service.mean()
    gaps = rng.exponential(1.0, n)
    arrivals = np.cumsum(gaps / rate_per_s)
    # Capacity counts the clients some placement can serve within their SLA on an idle server
    # (the DP's plan is feasible): the rest miss whatever the server does.
    servable = np.array([p.latency_ms <= s for p, s in zip(plans["dp"], clients.sla_ms, strict=True)])
    out: dict[str, Any] = {"layers": len(table.units), "solve_s": round(elapsed_s, 2)}
    for name in POLICIES:
        service = np.array([service_s(p) for p in plans[name]])
        waits = fifo_waits_ms(arrivals, service)
        wait_per_request = np.zeros(n)
        wait_per_request[service > 0] = waits
        latency = np.array([p.latency_ms for p in plans[name]])
        keep = servable
        out[name] = {
            "capacity_req_per_s": capacity_rate(gaps[keep], service[keep], latency[keep], clients.sla_ms[keep]),
            "work_gflop_per_request": float(np.mean([p.server_work for p in plans[name]])),
            "sla_violations": int(np.sum(latency > clients.sla_ms)),
            "sla_violations_with_wait": int(np.sum(latency + wait_per_request > clients.sla_ms)),
            "utilisation": float(service.sum() / arrivals[-1]),
            "served_share": float(np.mean(service > 0)),
            "wait_mean_ms": float(waits.mean()) if waits.size else 0.0,
            "wait_p95_ms": float(np.percentile(waits, 95)) if waits.size else 0.0,
        }
    return out


def capacity_rate(arrival_gaps: np.ndarray, service: np.ndarray, latency: np.ndarray, sla_ms: np.ndarray,
                  within: float = CAPACITY_WITHIN) -> float:
    """The highest arrival rate (requests/s) at which ``within`` of the requests still meet their SLA
    (planned latency + FIFO queue wait), for one policy's plans: the simulated counterpart of
    ``benchmarks/capacity.py``. ``arrival_gaps`` are unit-rate exponential gaps (the same for every
    policy), scaled by 1/rate; bisection on the rate."""
    if np.mean(latency <= sla_ms) < within:
        return 0.0  # even on an idle server the plans miss too many SLAs
    lo, hi = 0.0, 1.0
    mean_service = service[service > 0].mean() if np.any(service > 0) else 0.0
    if mean_service == 0.0:
        return float("inf")  # nothing runs on the server
    hi = 4.0 / mean_service  # four times past saturation: surely over capacity

    def ok(rate: float) -> bool:
        arrivals = np.cumsum(arrival_gaps / rate)
        wait = np.zeros(latency.size)
        wait[service > 0] = fifo_waits_ms(arrivals, service)
        return float(np.mean(latency + wait <= sla_ms)) >= within

    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def reduction(new: float, old: float) -> float:
    return 1.0 - new / old if old > 0 else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=2000, help="clients (requests) per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bundle", type=Path, default=None, help="bundle directory with manifest.json")
    parser.add_argument("--bundle-tokens", type=int, default=128, help="prompt tokens for the bundle model")
    args = parser.parse_args(argv)

    tables = [transformer_base(), bert_base(), gpt2_small(), vit_base()]
    if args.bundle is not None:
        try:
            tables.append(bundle_table(args.bundle, args.bundle_tokens))
        except (OSError, KeyError, TypeError, ValueError) as exc:
            print(f"error: cannot read the cost table of {args.bundle}: {exc!r}", file=sys.stderr)
            return 2
    rng = np.random.default_rng(args.seed)
    results: dict[str, Any] = {}
    print(
        f"{args.clients} clients per model, seed {args.seed}, server queue at all-server utilisation {UTILISATION}"
    )
    header = f"{'model':<22}{'policy':<12}{'GFLOP/req':>11}{'vs all-srv':>11}{'SLA viol':>9}{'SLA+wait':>9}"
    header += f"{'util':>6}{'wait ms':>9}{'p95 ms':>9}{'capacity/s':>11}"
    print(header)
    for table in tables:
        clients = draw_clients(rng, args.clients)
        res = simulate(table, clients, rng)
        results[table.name] = res
        base = res["all-server"]["work_gflop_per_request"]
        for name in POLICIES:
            r = res[name]
            print(
                f"{table.name:<22}{name:<12}{r['work_gflop_per_request']:>11.2f}"
                f"{reduction(r['work_gflop_per_request'], base):>10.1%} {r['sla_violations']:>8}"
                f"{r['sla_violations_with_wait']:>9}{r['utilisation']:>6.2f}{r['wait_mean_ms']:>9.2f}{r['wait_p95_ms']:>9.2f}"
                f"{r['capacity_req_per_s']:>11.2f}"
            )
    default = [t.name for t in tables[:4]]
    totals = {p: sum(results[m][p]["work_gflop_per_request"] for m in default) for p in POLICIES}
    per_model_vs_all = {
        m: reduction(
            results[m]["dp"]["work_gflop_per_request"], results[m]["all-server"]["work_gflop_per_request"]
        )
        for m in default
    }
    per_model_vs_greedy = {
        m: reduction(
            results[m]["dp"]["work_gflop_per_request"], results[m]["greedy"]["work_gflop_per_request"]
        )
        for m in default
    }
    summary = {
        "dp_vs_all_server_reduction": reduction(totals["dp"], totals["all-server"]),
        "dp_vs_greedy_reduction": reduction(totals["dp"], totals["greedy"]),
        "mean_per_model_dp_vs_all_server": float(np.mean(list(per_model_vs_all.values()))),
        "mean_per_model_dp_vs_greedy": float(np.mean(list(per_model_vs_greedy.values()))),
    }
    capacity = {m: {p: results[m][p]["capacity_req_per_s"] for p in POLICIES} for m in results}
    def cap_ratio(a: float, b: float) -> float | None:
        return a / b if b and np.isfinite(a) and np.isfinite(b) else None

    summary["capacity_dp_vs_all_server"] = {m: cap_ratio(c["dp"], c["all-server"]) for m, c in capacity.items()}
    summary["capacity_dp_vs_greedy"] = {m: cap_ratio(c["dp"], c["greedy"]) for m, c in capacity.items()}
    shown = lambda r: "n/a" if r is None else f"{r:.2f}x"  # noqa: E731
    print("capacity (arrival rate at which >= 95% of the servable requests meet their SLA, queue waits included), "
          "DP / all-server and DP / greedy: " + "; ".join(
              f"{m} {shown(summary['capacity_dp_vs_all_server'][m])} / {shown(summary['capacity_dp_vs_greedy'][m])}"
              for m in capacity) + " (n/a: a baseline misses its SLAs even on an idle server, or nothing runs there)")
    summary["paper_claim_all_server_1_3_met"] = summary["dp_vs_all_server_reduction"] >= 1 / 3
    summary["paper_claim_greedy_19pct_met"] = summary["dp_vs_greedy_reduction"] >= 0.19
    print(
        f"default scenario (4 models, total work): DP needs {summary['dp_vs_all_server_reduction']:.1%} less server work "
        f"than all-server (paper: >= 33.3%) and {summary['dp_vs_greedy_reduction']:.1%} less than greedy (paper: >= 19%)"
    )
    print(
        f"mean of per-model reductions: {summary['mean_per_model_dp_vs_all_server']:.1%} vs all-server, "
        f"{summary['mean_per_model_dp_vs_greedy']:.1%} vs greedy"
    )
    print(
        json.dumps(
            {"seed": args.seed, "clients_per_model": args.clients, "models": results, "summary": summary}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
