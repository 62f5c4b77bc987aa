"""How fast the DP planner is, next to the exact ILP, at L = 32 and L = 64 units.

Run: ``python benchmarks/planner_speed.py [--instances 20] [--seed 0]``

Instances are decoder-only LLM cost tables (embed, L - 2 identical blocks, head) with random
shapes and a random client, like ``paper_sim.py``'s population:

- hidden size d in {768, 1024, 2048}, ff = 4 d, vocab 32,000, prompt T in {1, 32, 128} tokens;
  block FLOPs T (8 d^2 + 4 d ff) + 4 T^2 d; fp16 activations (2 T d bytes) on the wire; the
  head's output is the 4-byte sampled token;
- device log-uniform 10 GFLOP/s .. 1 TFLOP/s, server 20 TFLOP/s, uplink log-uniform
  1 .. 100 Mbit/s, downlink = uplink x uniform(1, 10), RTT uniform 10 .. 100 ms, SLA
  log-uniform 100 ms .. 2 s.

Each instance is timed as the median of ``--repeats`` calls (DP and ILP interleaved, as the
machine is shared and noisy); the figure per L is the median over instances. ``ilp`` is the
whole exact solve: two HiGHS runs (least work, then least latency at that work). The DP is
checked against the ILP on every instance (same feasibility; the DP's work is never below the
ILP's, and the largest relative excess is printed). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

from splitllm.planner import Layer, Plan, Problem, dp, ilp

SERVER_FLOPS_PER_S = 20e12


def llm_problem(rng: np.random.Generator, units: int) -> Problem:
    d = int(rng.choice([768, 1024, 2048]))
    tokens = int(rng.choice([1, 32, 128]))
    device = float(np.exp(rng.uniform(np.log(10e9), np.log(1e12))))
    flops = [tokens * d] + [tokens * (8 * d * d + 16 * d * d) + 4 * tokens * tokens * d] * (units - 2)
    flops.append(2 * tokens * d * 32_000)
    out = [2 * tokens * d] * (units - 1) + [4]
    layers = tuple(
        Layer(
            client_ms=f / device * 1e3,
            server_ms=f / SERVER_FLOPS_PER_S * 1e3,
            server_work=f / 1e9,
            out_bytes=o,
        )
        for f, o in zip(flops, out, strict=True)
    )
    uplink = float(np.exp(rng.uniform(np.log(1e6), np.log(100e6))))
    return Problem(
        layers=layers,
        input_bytes=4 * tokens,
        uplink_bps=uplink,
        downlink_bps=uplink * float(rng.uniform(1.0, 10.0)),
        rtt_ms=float(rng.uniform(10.0, 100.0)),
        sla_ms=float(np.exp(rng.uniform(np.log(100.0), np.log(2000.0)))),
    )


def timed_ms(fn: Callable[[Problem], Plan], problem: Problem) -> tuple[float, Plan]:
    started = time.perf_counter()
    plan = fn(problem)
    return (time.perf_counter() - started) * 1e3, plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    dp(llm_problem(rng, 8))  # warm-up: imports, numpy paths
    ilp(llm_problem(rng, 8))
    result: dict[str, object] = {"seed": args.seed, "instances": args.instances, "repeats": args.repeats}
    for units in (32, 64):
        dp_ms, ilp_ms, excess, mismatched = [], [], 0.0, 0
        for _ in range(args.instances):
            problem = llm_problem(rng, units)
            runs_dp, runs_ilp = [], []
            for _ in range(args.repeats):
                t, plan_dp = timed_ms(dp, problem)
                runs_dp.append(t)
                t, plan_ilp = timed_ms(ilp, problem)
                runs_ilp.append(t)
            dp_ms.append(statistics.median(runs_dp))
            ilp_ms.append(statistics.median(runs_ilp))
            if plan_dp.feasible != plan_ilp.feasible or plan_dp.server_work < plan_ilp.server_work - 1e-9:
                mismatched += 1
            elif plan_dp.feasible and plan_ilp.server_work > 0:
                excess = max(excess, plan_dp.server_work / plan_ilp.server_work - 1)
        med_dp, med_ilp = statistics.median(dp_ms), statistics.median(ilp_ms)
        print(
            f"L={units}: dp {med_dp:.3f} ms (max {max(dp_ms):.3f}), ilp {med_ilp:.2f} ms (max {max(ilp_ms):.2f}), "
            f"ilp/dp {med_ilp / med_dp:.1f}x; dp work above the ILP optimum by at most {excess:.2%}, "
            f"{mismatched} inconsistent"
        )
        result[f"L{units}"] = per_l = {
            "dp_ms_median": round(med_dp, 4),
            "dp_ms_max": round(max(dp_ms), 4),
            "ilp_ms_median": round(med_ilp, 3),
            "ilp_ms_max": round(max(ilp_ms), 3),
            "ratio_ilp_over_dp": round(med_ilp / med_dp, 1),
            "dp_work_max_relative_excess": excess,
            "inconsistent": mismatched,
        }
    # per_l is the L = 64 row now.
    result["goal_dp_under_5ms_at_L64"] = per_l["dp_ms_median"] < 5.0
    result["goal_ratio_100x_at_L64"] = per_l["ratio_ilp_over_dp"] >= 100.0
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
