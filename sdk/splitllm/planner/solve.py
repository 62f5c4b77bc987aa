"""The planner's algorithms (SplitLLM, Mudvari, Jiang, Tassiulas, arXiv 2410.10759): DP, baselines, policies.

Each layer runs on the client or on the server; the input starts and the output ends on the
client. The planner minimises the server's work subject to the client's latency SLA and, among
equal work, picks the lower latency. The model and the exact evaluators are documented in
``splitllm.planner.model`` and ``docs/planner.md``.

Algorithms (all return a :class:`Plan` evaluated exactly by :func:`latency_ms`/:func:`server_work`):

- ``dp``: the paper's dynamic program over (layer, side, latency budget); exact on whole-ms
  instances at 1 ms resolution, never breaks the true SLA, fast (a compiled kernel over the
  table's breakpoints with numba, numpy over every bin without).
- ``ilp``: exact reference with ``scipy.optimize.milp`` (HiGHS); scipy is imported lazily.
- ``greedy``, ``all-server``, ``all-client``: baselines.

Pure: no I/O except :func:`main`, the ``python -m splitllm.planner FILE`` CLI.
"""

from __future__ import annotations

import bisect
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from splitllm.errors import ConfigError, InvalidProblem, SplitLLMError
from splitllm.planner import kernel as _planner_kernel
from splitllm.planner.milp import ilp
from splitllm.planner.model import (
    CLIENT,
    SERVER,
    Layer,
    Plan,
    Problem,
    latency_ms,
    min_latency,
    server_work,
)

__all__ = [
    "ALGORITHMS",
    "CLIENT",
    "DEFAULT_MAX_BINS",
    "DP_KERNELS",
    "SERVER",
    "Layer",
    "Plan",
    "Policy",
    "PolicyRange",
    "Problem",
    "all_client",
    "all_server",
    "default_resolution_ms",
    "dp",
    "greedy",
    "ilp",
    "kernel_status",
    "latency_ms",
    "load_kernel",
    "main",
    "make_policy",
    "min_latency",
    "server_work",
    "solve",
]

ALGORITHMS = ("dp", "greedy", "all-server", "all-client", "ilp")
DP_KERNELS = ("auto", "compiled", "numpy")
DEFAULT_MAX_BINS = 2000
_MAX_CELLS = 50_000_000  # layers x bins: the DP's two bool choice tables stay <= 100 MB


def all_server(problem: Problem) -> Plan:
    """Every layer on the server: the input goes up once and the output comes back once."""
    return Plan.evaluate(problem, (SERVER,) * problem.num_layers, "all-server")


def all_client(problem: Problem) -> Plan:
    """Every layer on the client: no server work and no network."""
    return Plan.evaluate(problem, (CLIENT,) * problem.num_layers, "all-client")


def _prefix(problem: Problem, k: int) -> tuple[str, ...]:
    return (CLIENT,) * k + (SERVER,) * (problem.num_layers - k)


def greedy(problem: Problem) -> Plan:
    """Baseline: grow the client's prefix one layer at a time while the SLA still holds.

    The candidates are the single-split plans ``client [0, k) + server [k, L)`` (the output
    returns to the client; ``k = L`` is all-client). Starting from ``k = 0`` (all-server), the
    prefix grows while the next plan meets the SLA and stops at the first layer that would
    break it; the last plan that met the SLA is returned. It never looks past that first
    failure, which is what the DP improves on. If the all-server plan itself violates the
    SLA, greedy returns the minimum-latency plan among all ``L + 1`` prefixes (flagged by
    ``feasible``, which is True only if that prefix happens to meet the SLA).
    """
    n = problem.num_layers
    if latency_ms(problem, _prefix(problem, 0)) > problem.sla_ms:
        best = min(range(n + 1), key=lambda k: (latency_ms(problem, _prefix(problem, k)), -k))
        return Plan.evaluate(problem, _prefix(problem, best), "greedy")
    k = 0
    while k < n and latency_ms(problem, _prefix(problem, k + 1)) <= problem.sla_ms:
        k += 1
    return Plan.evaluate(problem, _prefix(problem, k), "greedy")


def default_resolution_ms(sla_ms: float, max_bins: int = DEFAULT_MAX_BINS) -> float:
    """The smallest power of two (ms) that splits ``sla_ms`` into at most ``max_bins`` bins.

    A power of two makes ``x / resolution`` exact in floating point, and for ``sla_ms <= max_bins``
    it divides 1 ms, so instances whose terms are whole milliseconds are solved exactly.
    """
    if sla_ms <= 0:
        return 1.0
    return 2.0 ** max(-40, math.ceil(math.log2(sla_ms) - math.log2(max_bins)))


def dp(problem: Problem, resolution_ms: float | None = None, *, kernel: str = "auto") -> Plan:
    """The paper's DP over (layer, side, discretised latency), then an exact check of its candidates.

    ``W_side[b]`` is the least server work of a partial plan for layers ``0..i-1`` that ends on
    ``side`` with rounded latency <= ``b`` bins, where each step (switch + compute) and the final
    return are rounded *up* to the grid. The budget runs ``L + 1`` bins past ``floor(sla / r)``,
    so every plan that truly meets the SLA is in the table. Candidates, by increasing work (each
    at the smallest budget that reaches it), are rebuilt and checked with the exact evaluator; the
    first that meets the SLA is returned. Guarantees (proofs in ``docs/planner.md``):

    - a plan with ``feasible=True`` meets the SLA by the exact evaluator;
    - its work is at most the optimum under the SLA tightened by ``(L + 1) * resolution_ms``, and
      equals the optimum when every latency term is a multiple of the resolution (whole-ms
      instances at 1 ms, or at the default resolution when ``sla_ms <= 2000``);
    - no plan meets the SLA: the exact minimum-latency plan, ``feasible=False``.

    ``resolution_ms`` defaults to :func:`default_resolution_ms` (<= 2,000 bins in the SLA).

    Two kernels compute the same table. With numba installed (the ``server`` extra) a compiled
    kernel keeps only each side's breakpoints, the budgets where the least work drops
    (``splitllm.planner.kernel``): O(L * points), a handful of points per front on LLM cost
    tables (``benchmarks/planner_speed.py`` prints them), ~10 us at L = 64. Without numba (or with ``SPLITLLM_PLANNER_KERNEL=numpy``) the numpy
    kernel fills every bin: five vector operations per layer, O(L * bins) time and bits.
    ``kernel`` picks one: ``"auto"`` (compiled if available), ``"compiled"`` (``ConfigError``
    without numba) or ``"numpy"``. On grid instances both return the same plan; otherwise a work
    level's candidate may differ in exact latency, and both keep the guarantees above.
    """
    sla = problem.sla_ms
    res = default_resolution_ms(sla) if resolution_ms is None else resolution_ms
    if isinstance(res, bool) or not isinstance(res, (int, float)) or not math.isfinite(res) or res <= 0:
        raise ConfigError(f"resolution_ms must be a finite number > 0, got {resolution_ms!r}")
    if kernel not in DP_KERNELS:
        raise ConfigError(f"kernel must be one of {', '.join(DP_KERNELS)}, got {kernel!r}")
    compiled = None if kernel == "numpy" else _planner_kernel.compiled()
    if compiled is None:
        if kernel == "compiled":
            raise ConfigError(
                "the compiled DP kernel needs numba (pip install 'splitllm[server]'), "
                "and SPLITLLM_PLANNER_KERNEL must not be 'numpy'"
            )
        return _dp_numpy(problem, float(res))
    c = problem._costs
    placement = np.empty(problem.num_layers, np.int8)
    found, lat, work, _ = compiled(c.table, c.ret_ms, float(res), sla, placement)
    if not found:  # no candidate meets the SLA: the exact minimum-latency plan does if any plan does
        return min_latency(problem, "dp")
    # The kernel evaluated the placement with latency_ms()'s and server_work()'s float operations.
    sides = tuple([SERVER if on_server else CLIENT for on_server in placement.tolist()])
    return Plan(placement=sides, server_work=work, latency_ms=lat, feasible=True, algorithm="dp")


def load_kernel() -> str:
    """Load the compiled DP kernel now rather than on the first :func:`dp` call; return the kernel
    ``dp`` uses by default, ``"compiled"`` or ``"numpy"``.

    Loading takes ~0.2 s from numba's on-disk cache; the first time on a machine (or after the
    kernel's source changed) numba compiles it, a few seconds. The server calls this at start-up.
    """
    # compiled() compiles (or loads) the kernel for dp's argument types and smoke-tests it.
    return "numpy" if _planner_kernel.compiled() is None else "compiled"


def kernel_status() -> str:
    """Which DP kernel :func:`dp` runs by default, without loading anything: ``"compiled"``,
    ``"numpy"`` (numba missing, failed, or turned off) or ``"not loaded"`` (nothing asked yet)."""
    loaded = _planner_kernel.loaded()
    if loaded is None:
        return "not loaded"
    return "compiled" if loaded else "numpy"


def _dp_numpy(problem: Problem, res: float) -> Plan:
    """:func:`dp` with every bin of the table in numpy (the kernel when numba is absent)."""
    sla = problem.sla_ms
    c = problem._costs
    n = problem.num_layers
    with np.errstate(over="ignore", invalid="ignore"):
        steps = np.ceil(np.stack([c.cc, c.cs, c.ss, c.sc, np.full(n, c.ret_ms)]) / res)  # (5, L) bins
        # No plan needs more bins than its slowest choice at every step: cap the budget there.
        slowest = float(steps[:4].max(axis=0).sum() + steps[4, 0])
    budget = int(min(math.floor(sla / res) + n + 1, slowest))
    nb = budget + 1
    if n * nb > _MAX_CELLS:
        raise ConfigError(f"resolution_ms={res} gives {nb} bins x {n} layers, more than {_MAX_CELLS} cells")
    bins = np.minimum(steps, nb).astype(np.int64).tolist()
    k_cc, k_cs, k_ss, k_sc, k_ret = bins[0], bins[1], bins[2], bins[3], bins[4][0]
    work = c.work.tolist()

    # Ping-pong buffers (parity, side, 2 * bins): the left half stays +inf so that a shift by k is
    # just the slice [nb - k, 2 nb - k); the right half holds W_side for the current layer.
    bufs = np.full((2, 2, 2 * nb), np.inf)
    bufs[0, 0, nb:] = 0.0  # before layer 0 the data is on the client, no latency spent
    full = [(bufs[p, 0], bufs[p, 1]) for p in (0, 1)]
    right = [(bufs[p, 0, nb:], bufs[p, 1, nb:]) for p in (0, 1)]
    from_s_to_c = np.empty((n, nb), dtype=bool)  # (L, bins) True: layer i on client came from server
    from_s_to_s = np.empty((n, nb), dtype=bool)
    st_cc, st_cs, st_ss, st_sc = ([nb - k for k in ks] for ks in (k_cc, k_cs, k_ss, k_sc))
    for i in range(n):
        pc, ps = full[i & 1]
        out_c, out_s = right[(i + 1) & 1]
        a, b = pc[st_cc[i] : st_cc[i] + nb], ps[st_sc[i] : st_sc[i] + nb]
        np.less(b, a, out=from_s_to_c[i])
        np.minimum(a, b, out=out_c)
        a, b = pc[st_cs[i] : st_cs[i] + nb], ps[st_ss[i] : st_ss[i] + nb]
        np.less(b, a, out=from_s_to_s[i])
        np.add(np.minimum(a, b, out=out_s), work[i], out=out_s)
    last_c, last_s = full[n & 1]
    ends_s = last_s[nb - k_ret : 2 * nb - k_ret]
    final = np.minimum(last_c[nb:], ends_s)  # (bins,) least work of a whole plan within b bins

    def rebuild(b: int) -> list[str]:
        on_server = bool(ends_s[b] < last_c[nb + b])
        if on_server:
            b -= k_ret
        placement = [CLIENT] * n
        for i in range(n - 1, -1, -1):
            if on_server:
                placement[i] = SERVER
                came_from_s = bool(from_s_to_s[i, b])
                b -= k_ss[i] if came_from_s else k_cs[i]
            else:
                came_from_s = bool(from_s_to_c[i, b])
                b -= k_sc[i] if came_from_s else k_cc[i]
            on_server = came_from_s
        return placement

    # Bins where the least work drops: each is the smallest budget reaching a new work level.
    # Scan them from the least work up; the first plan that meets the SLA exactly wins. With a
    # power-of-two resolution every candidate within floor(sla / r) bins does, so at most the
    # L + 1 extension bins are tried in vain.
    drops = np.flatnonzero(np.isfinite(final) & np.concatenate(([True], final[1:] < final[:-1])))
    for b in drops[::-1].tolist():
        candidate = Plan.evaluate(problem, rebuild(b), "dp")
        if candidate.feasible:
            return candidate
    # No candidate meets the SLA: the exact minimum-latency plan does if any plan does.
    return min_latency(problem, "dp")


_SOLVERS: dict[str, Callable[[Problem], Plan]] = {
    "dp": dp,
    "greedy": greedy,
    "all-server": all_server,
    "all-client": all_client,
    "ilp": ilp,
}


def solve(problem: Problem, algorithm: str = "dp") -> Plan:
    """Solve ``problem`` with one of :data:`ALGORITHMS`; an unknown name raises :class:`ConfigError`."""
    try:
        solver = _SOLVERS[algorithm]
    except KeyError:
        raise ConfigError(f"unknown algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}") from None
    return solver(problem)


@dataclass(frozen=True)
class PolicyRange:
    """Use ``plan`` while the measured uplink is in ``[lo_bps, hi_bps)``; ``plan`` was solved at ``lo_bps``."""

    lo_bps: float
    hi_bps: float
    plan: Plan

    def to_dict(self) -> dict[str, Any]:
        return {"lo_bps": self.lo_bps, "hi_bps": self.hi_bps, "plan": self.plan.to_dict()}


@dataclass(frozen=True)
class Policy:
    """What the server sends a client: plans for uplink-bandwidth ranges, so the client can switch
    plans locally as its measured bandwidth moves and ask again only when it leaves the table.

    Each range's plan is solved at the range's *lower* edge. For a fixed placement the latency
    only falls as bandwidth rises, so a plan that meets the SLA at ``lo_bps`` meets it across the
    whole range (``plan.latency_ms`` is its worst case there). ``downlink`` says how the downlink
    was set at each grid point: ``"scaled"`` (default: the problem's downlink/uplink ratio kept, as
    a degraded link usually degrades both ways and the client measures one number) or ``"fixed"``.
    """

    ranges: tuple[PolicyRange, ...]
    algorithm: str
    downlink: str

    def plan_for(self, uplink_bps: float) -> Plan | None:
        """The plan for a measured uplink, or None outside the table (then ask the server again)."""
        if not self.ranges or not math.isfinite(uplink_bps):
            return None
        idx = bisect.bisect_right([r.lo_bps for r in self.ranges], uplink_bps) - 1
        if idx < 0 or uplink_bps >= self.ranges[idx].hi_bps:
            return None
        return self.ranges[idx].plan

    def to_dict(self) -> dict[str, Any]:
        return {
            "algorithm": self.algorithm,
            "downlink": self.downlink,
            "ranges": [r.to_dict() for r in self.ranges],
        }

    @classmethod
    def from_dict(cls, data: Any) -> Policy:
        """Parse a policy sent over HTTP; a malformed one raises :class:`InvalidProblem`."""
        if not isinstance(data, dict) or set(data) != {"algorithm", "downlink", "ranges"}:
            raise InvalidProblem("policy must be an object with keys algorithm, downlink, ranges")
        if data["downlink"] not in ("scaled", "fixed") or not isinstance(data["algorithm"], str):
            raise InvalidProblem("policy.downlink must be 'scaled' or 'fixed' and policy.algorithm a string")
        raw = data["ranges"]
        if not isinstance(raw, list):
            raise InvalidProblem("policy.ranges must be a list")
        ranges: list[PolicyRange] = []
        for i, item in enumerate(raw):
            where = f"policy.ranges[{i}]"
            if not isinstance(item, dict) or set(item) != {"lo_bps", "hi_bps", "plan"}:
                raise InvalidProblem(f"{where} must be an object with keys lo_bps, hi_bps, plan")
            lo, hi = item["lo_bps"], item["hi_bps"]
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in (lo, hi)):
                raise InvalidProblem(f"{where}.lo_bps and .hi_bps must be numbers")
            if not (0 < lo < hi) or (ranges and lo != ranges[-1].hi_bps):
                raise InvalidProblem(
                    f"{where} must satisfy 0 < lo_bps < hi_bps and follow the previous range"
                )
            ranges.append(PolicyRange(float(lo), float(hi), Plan.from_dict(item["plan"], f"{where}.plan")))
        return cls(ranges=tuple(ranges), algorithm=data["algorithm"], downlink=data["downlink"])


def make_policy(
    problem: Problem,
    uplink_bps_grid: Sequence[float],
    algorithm: str = "dp",
    *,
    scale_downlink: bool = True,
    solver: Callable[[Problem], Plan] | None = None,
) -> Policy:
    """Solve ``problem`` at each grid bandwidth; ranges ``[g_k, g_{k+1})`` take the plan at ``g_k``.

    The largest grid point closes the table. Adjacent ranges with the same placement and the same
    feasibility are merged (the merged range keeps the plan solved at its lowest edge).
    ``solver`` replaces ``solve(problem, algorithm)`` for each grid point (``algorithm`` then only
    names the policy). Raises :class:`ConfigError` for fewer than two distinct, finite, positive
    grid points.
    """
    grid = sorted({float(g) for g in uplink_bps_grid})
    if len(grid) < 2 or not all(math.isfinite(g) and g > 0 for g in grid):
        raise ConfigError(
            f"uplink_bps_grid needs >= 2 distinct finite values > 0, got {list(uplink_bps_grid)!r}"
        )
    ranges: list[PolicyRange] = []
    for lo, hi in zip(grid[:-1], grid[1:], strict=True):
        down = problem.downlink_bps * lo / problem.uplink_bps if scale_downlink else problem.downlink_bps
        at = replace(problem, uplink_bps=lo, downlink_bps=down)
        plan = solve(at, algorithm) if solver is None else solver(at)
        prev = ranges[-1].plan if ranges else None
        if prev is not None and (prev.placement, prev.feasible) == (plan.placement, plan.feasible):
            ranges[-1] = replace(ranges[-1], hi_bps=hi)
        else:
            ranges.append(PolicyRange(lo, hi, plan))
    return Policy(ranges=tuple(ranges), algorithm=algorithm, downlink="scaled" if scale_downlink else "fixed")


def _load(text: str) -> Problem | list[Problem]:
    data = json.loads(text)
    if isinstance(data, list):
        problems = []
        for i, item in enumerate(data):
            try:
                problems.append(Problem.from_dict(item))
            except InvalidProblem as exc:
                raise InvalidProblem(f"[{i}]: {exc}") from None
        return problems
    return Problem.from_dict(data)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m splitllm.planner FILE [--algorithm A]``: solve one problem or a JSON list of them.

    Prints the plan(s) as JSON on stdout. Exit 0 on success, 2 on unreadable or invalid input
    (the message names the field, no traceback), 1 if a solver fails.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m splitllm.planner", description=main.__doc__)
    parser.add_argument("file", metavar="FILE", help="JSON problem or list of problems; '-' for stdin")
    parser.add_argument("--algorithm", choices=ALGORITHMS, default="dp")
    parser.add_argument("--resolution-ms", type=float, default=None, help="DP grid (default: <= 2000 bins)")
    args = parser.parse_args(argv)
    try:
        if args.file == "-":
            text = sys.stdin.read()
        else:
            with open(args.file, encoding="utf-8") as fh:
                text = fh.read()
        loaded = _load(text)
    except (OSError, UnicodeDecodeError) as exc:
        print(f"error: cannot read {args.file}: {exc}", file=sys.stderr)
        return 2
    except json.JSONDecodeError as exc:
        print(f"error: {args.file} is not valid JSON: {exc}", file=sys.stderr)
        return 2
    except InvalidProblem as exc:
        print(f"error: invalid problem: {exc}", file=sys.stderr)
        return 2

    def run(problem: Problem) -> dict[str, Any]:
        if args.algorithm == "dp":
            return dp(problem, args.resolution_ms).to_dict()
        return solve(problem, args.algorithm).to_dict()

    try:
        out: Any = [run(p) for p in loaded] if isinstance(loaded, list) else run(loaded)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SplitLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
