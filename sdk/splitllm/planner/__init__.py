"""Where each layer runs: the SplitLLM placement planner (Mudvari, Jiang, Tassiulas, arXiv 2410.10759).

The package's door; the pieces:

- ``model``: the problem (layers, link, SLA), plans and their exact evaluators;
- ``solve``: the DP, the baselines, ``solve`` and bandwidth ``Policy`` tables (and the CLI,
  ``python -m splitllm.planner FILE``);
- ``kernel``: the compiled DP kernel (numba; numpy fallback in ``solve``);
- ``milp``: the exact ILP reference (scipy, imported lazily);
- ``costs``: measured profiles and a codec turned into problems and policies;
- ``profile``: per-unit timings measured with ONNX Runtime on this machine.
"""

from __future__ import annotations

from splitllm.planner.solve import (
    ALGORITHMS,
    CLIENT,
    DEFAULT_MAX_BINS,
    DP_KERNELS,
    SERVER,
    Layer,
    Plan,
    Policy,
    PolicyRange,
    Problem,
    all_client,
    all_server,
    default_resolution_ms,
    dp,
    greedy,
    ilp,
    kernel_status,
    latency_ms,
    load_kernel,
    main,
    make_policy,
    min_latency,
    server_work,
    solve,
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
