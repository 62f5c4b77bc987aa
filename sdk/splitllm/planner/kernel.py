"""The DP of :func:`splitllm.planner.dp` as one compiled kernel over sparse tables (private).

Why: the numpy DP spends ~6 vector calls per layer over ~2,000 latency bins, ~0.5 ms at
L = 64, nearly all of it per-call overhead and bins nobody needs. The table ``W_s[b]`` (least
work of a partial plan ending on side ``s`` within ``b`` bins) is a step function that only
falls as ``b`` grows, so this kernel keeps just its *breakpoints* ``(bins, work)``: the points
where a larger budget buys strictly less work. One layer is then a merge of two sorted lists
per side instead of two shifted minima over every bin. The values, rounding, budget and
candidate order are the numpy DP's exactly (see ``docs/planner.md``), so both keep the same
guarantees; only the representation differs. On LLM cost tables a front holds a handful of
points, not thousands of bins (``benchmarks/planner_speed.py`` prints them: at most 106).

Two more savings, neither of which changes a candidate:

- A partial plan whose bins plus the fewest bins any completion needs exceed the budget is
  dropped at once (the suffix bound is a 2-state DP in bins). Within one (layer, side) front
  this only cuts a tail, so no kept point loses the point that dominated it.
- Candidates are rebuilt and evaluated in the kernel with the float operations of
  :func:`splitllm.planner.latency_ms` and :func:`splitllm.planner.server_work` (one addition
  per step, in layer order), so its figures are bit-for-bit the exact evaluator's (tested).

``dp_kernel`` is plain Python that numba compiles (``compiled()``, cached on disk); without
numba the planner falls back to the numpy DP. ``SPLITLLM_PLANNER_KERNEL=numpy`` forces the
fallback.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

_log = logging.getLogger("splitllm.planner")
_CAP = 2**60  # bins beyond any budget: int64 sums of two stay exact
_FIRST_CAPACITY = 1024


def dp_kernel(
    table: np.ndarray, ret_ms: float, res: float, sla: float, placement: np.ndarray
) -> tuple[int, float, float, int]:
    """Solve one problem; write the chosen placement (1 = server) into ``placement``.

    ``table`` is the problem's ``(5, L)`` cost block (rows cc, cs, ss, sc, work; see
    ``_planner_model._Costs``). Returns ``(found, latency_ms, server_work, widest)``; ``found``
    is 0 when no candidate meets the SLA (the caller then returns the minimum-latency plan, as
    the numpy DP does); ``widest`` is the most points any (layer, side) front held.
    """
    cc, cs, ss, sc, work = table[0], table[1], table[2], table[3], table[4]
    n = cc.shape[0]
    # Rounded-up steps in bins, saturated at _CAP (inf and overflow included). Rows: cc, cs, ss, sc.
    steps = np.empty((4, n), np.int64)
    slowest = 0
    for i in range(n):
        for row in range(4):
            x = (cc[i], cs[i], ss[i], sc[i])[row] / res
            steps[row, i] = math.ceil(x) if x < _CAP else _CAP
        slowest = min(_CAP, slowest + steps[:, i].max())
    x = ret_ms / res
    k_ret = math.ceil(x) if x < _CAP else _CAP
    x = sla / res
    within = math.floor(x) if x < _CAP else _CAP
    budget = min(within + n + 1, slowest + k_ret)
    k_cc, k_cs, k_ss, k_sc = steps[0], steps[1], steps[2], steps[3]

    # Fewest bins that finish the plan from boundary i on each side.
    rest_c = np.empty(n + 1, np.int64)
    rest_s = np.empty(n + 1, np.int64)
    rest_c[n] = 0
    rest_s[n] = k_ret
    for i in range(n - 1, -1, -1):
        rest_c[i] = min(_CAP, min(k_cc[i] + rest_c[i + 1], k_cs[i] + rest_s[i + 1]))
        rest_s[i] = min(_CAP, min(k_sc[i] + rest_c[i + 1], k_ss[i] + rest_s[i + 1]))

    # Every front point: its bins, its work, the point it extends and the side of its layer.
    # Point 0 is the empty plan before layer 0 (on the client, no bins, no work).
    lat = np.empty(_FIRST_CAPACITY, np.int64)
    wk = np.empty(_FIRST_CAPACITY, np.float64)
    prev = np.empty(_FIRST_CAPACITY, np.int64)
    side = np.empty(_FIRST_CAPACITY, np.int8)
    lat[0], wk[0], prev[0], side[0] = 0, 0.0, -1, 0
    c0, c1, s0, s1 = 0, 1, 1, 1  # the previous layer's client front [c0, c1), server front [s0, s1)
    top = 1
    final0 = 1
    widest = 1
    for i in range(n + 1):
        last = i == n  # the extra pass merges the two ends of whole plans into the final front
        new_c0, new_c1, new_s0 = top, top, top
        for to_server in range(1 if last else 2):
            if last:
                k_a, k_b, limit, add = 0, k_ret, budget, 0.0
                final0 = top
            elif to_server:
                new_s0 = top
                k_a, k_b, limit, add = k_cs[i], k_ss[i], budget - rest_s[i + 1], work[i]
            else:
                k_a, k_b, limit, add = k_cc[i], k_sc[i], budget - rest_c[i + 1], 0.0
            need = top + (c1 - c0) + (s1 - s0)
            if need > lat.shape[0]:  # grow the point arrays (doubling)
                size = lat.shape[0]
                while size < need:
                    size *= 2
                lat2 = np.empty(size, np.int64)
                wk2 = np.empty(size, np.float64)
                prev2 = np.empty(size, np.int64)
                side2 = np.empty(size, np.int8)
                lat2[:top], wk2[:top], prev2[:top], side2[:top] = lat[:top], wk[:top], prev[:top], side[:top]
                lat, wk, prev, side = lat2, wk2, prev2, side2
            best = math.inf
            a, b = c0, s0
            while a < c1 or b < s1:
                la = lat[a] + k_a if a < c1 else _CAP
                lb = lat[b] + k_b if b < s1 else _CAP
                # The lower budget first; at equal budgets the lesser work, the client on ties
                # (the numpy DP takes the server only when it is strictly better).
                if la < lb or (la == lb and wk[a] <= wk[b]):
                    src, bins = a, la
                    a += 1
                else:
                    src, bins = b, lb
                    b += 1
                if bins > limit:
                    break
                value = wk[src] + add
                if value < best:  # a new breakpoint: strictly less work for more bins
                    best = value
                    lat[top], wk[top], prev[top], side[top] = bins, value, src, to_server
                    top += 1
            if not to_server:
                new_c1 = top
        c0, c1, s0, s1 = new_c0, new_c1, new_s0, top
        widest = max(widest, c1 - c0, s1 - s0)

    # The final front is [final0, top), least work last: scan from the least work up, rebuild
    # each candidate and evaluate it exactly; the first that meets the SLA wins.
    for cand in range(top - 1, final0 - 1, -1):
        point = prev[cand]
        for i in range(n - 1, -1, -1):
            placement[i] = side[point]
            point = prev[point]
        total = 0.0
        load = 0.0
        on_server = False
        for i in range(n):
            if placement[i] == 1:
                total += ss[i] if on_server else cs[i]
                load += work[i]
                on_server = True
            else:
                total += sc[i] if on_server else cc[i]
                on_server = False
        if on_server:
            total += ret_ms
        if total <= sla:
            return 1, total, load, widest
    return 0, 0.0, 0.0, widest


_lock = threading.Lock()
_loaded: list[Callable[..., Any] | None] = []


def compiled() -> Callable[..., Any] | None:
    """The numba-compiled ``dp_kernel`` (compiled once per process, cached on disk), or None.

    None when numba is not installed, fails to import or compile, or
    ``SPLITLLM_PLANNER_KERNEL=numpy`` is set.
    """
    if _loaded:
        return _loaded[0]
    with _lock:
        if not _loaded:
            _loaded.append(_compile())
    return _loaded[0]


def loaded() -> bool | None:
    """None before :func:`compiled` was first asked; then whether it gave a compiled kernel."""
    return (_loaded[0] is not None) if _loaded else None


def _compile() -> Callable[..., Any] | None:
    if os.environ.get("SPLITLLM_PLANNER_KERNEL", "").strip().lower() == "numpy":
        return None
    try:
        import numba
    except Exception:  # not installed, or built for another numpy: the numpy DP still works
        return None
    try:
        try:
            kernel = numba.njit(cache=True)(dp_kernel)
        except RuntimeError:  # no writable cache directory: compile in memory, every process
            kernel = numba.njit(dp_kernel)
        # Compile (or load) now, for the argument types dp passes: a read-only cost table.
        table = np.ones((5, 1))
        table.flags.writeable = False
        found, _, _, _ = kernel(table, 1.0, 1.0, 8.0, np.empty(1, np.int8))
        if found != 1:
            raise RuntimeError(f"the compiled kernel failed its smoke test (found={found})")
    except Exception as exc:
        _log.warning("planner: numba could not compile the DP kernel, using numpy instead: %s", exc)
        return None
    return kernel
