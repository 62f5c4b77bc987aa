"""The exact ILP reference for the planner (private; import ``ilp`` from :mod:`splitllm.planner`).

Kept apart so the planner module stays small and scipy stays a lazy, optional import.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from splitllm.errors import PlannerError
from splitllm.planner.model import CLIENT, SERVER, Plan, Problem, better_plan, min_latency


def ilp(problem: Problem) -> Plan:
    """Exact reference: a 0/1 program solved by ``scipy.optimize.milp`` (HiGHS, zero relative MIP
    gap; its absolute gap is 1e-6 of the largest layer's work, see below).

    Variables: ``x_i`` (layer i on the server), ``u_j``/``d_j`` (a client->server / server->client
    switch at boundary j, with ``x_{-1} = x_L = 0``), all binary; ``u_j >= x_j - x_{j-1}`` and
    ``d_j >= x_{j-1} - x_j``. Solve 1 minimises work under the latency row; solve 2 minimises
    latency with work held at the optimum (the lexicographic tie-break). The solver's tolerance is
    checked with the exact evaluator: if a returned plan misses the SLA by float noise, the SLA
    row is tightened a little and solved again. Infeasible: the exact minimum-latency plan.
    """
    try:
        from scipy.optimize import Bounds, LinearConstraint, milp
    except ImportError as exc:  # pragma: no cover - scipy is a dev dependency
        raise PlannerError("the ILP baseline needs scipy: pip install scipy") from exc
    n = problem.num_layers
    c = problem._costs
    nvar = 3 * n + 2  # x_0..x_{L-1}, u_0..u_L, d_0..d_L
    upper = np.ones(nvar)
    lat_row = np.zeros(nvar)
    lat_row[:n] = c.ss - c.cc
    for offset, cost in ((n, c.up), (2 * n + 1, c.down)):
        finite = np.isfinite(cost)
        lat_row[offset : offset + n + 1] = np.where(finite, cost, 0.0)
        upper[offset : offset + n + 1] = np.where(finite, 1.0, 0.0)  # an infinite switch never happens
    switch = np.zeros((2 * (n + 1), nvar))  # rows: x_j - x_{j-1} - u_j <= 0, x_{j-1} - x_j - d_j <= 0
    for j in range(n + 1):
        if j < n:
            switch[2 * j, j], switch[2 * j + 1, j] = 1.0, -1.0
        if j > 0:
            switch[2 * j, j - 1], switch[2 * j + 1, j - 1] = -1.0, 1.0
        switch[2 * j, n + j] = -1.0
        switch[2 * j + 1, 2 * n + 1 + j] = -1.0
    rows = [LinearConstraint(switch, -np.inf, 0.0)]
    lat_rhs = problem.sla_ms - float(c.cc.sum())
    # Work in units of the largest layer's: HiGHS stops at an absolute MIP gap of 1e-6 (scipy does
    # not expose it), so on raw values a problem whose works are all ~1e-7 was "solved" by any
    # feasible plan. Scaled, the reference is exact to 1e-6 of the largest layer's work.
    scale = float(c.work.max()) if n and float(c.work.max()) > 0 else 1.0
    work_row = np.zeros(nvar)
    work_row[:n] = c.work / scale
    options = {"mip_rel_gap": 0.0, "presolve": True}

    def run(objective: np.ndarray, extra: list[Any]) -> Plan | None:
        margin = 0.0
        for _ in range(6):
            lat = LinearConstraint(lat_row[None, :], -np.inf, lat_rhs - margin)
            res = milp(
                objective,
                constraints=[*rows, lat, *extra],
                integrality=np.ones(nvar),
                bounds=Bounds(np.zeros(nvar), upper),
                options=options,
            )
            if res.status == 2 or res.x is None:
                return None
            if res.status != 0:
                raise PlannerError(f"HiGHS failed on the ILP: {res.message}")
            plan = Plan.evaluate(problem, [SERVER if v > 0.5 else CLIENT for v in res.x[:n]], "ilp")
            if plan.feasible:
                return plan
            margin = max(margin * 10.0, 1e-9 * max(1.0, abs(problem.sla_ms)))
        return None

    first = run(work_row, [])
    if first is None:
        return min_latency(problem, "ilp")
    held = first.server_work / scale
    hold = LinearConstraint(work_row[None, :], -np.inf, held + 1e-9 * max(1.0, abs(held)))
    second = run(lat_row, [hold])
    return first if second is None else better_plan(first, second)
