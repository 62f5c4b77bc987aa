"""The planner against brute force and the ILP, its rounding guarantee, baselines, policy and CLI."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from helpers import load_benchmark
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from splitllm.errors import ConfigError, InvalidProblem, PlannerError
from splitllm.planner import (
    ALGORITHMS,
    CLIENT,
    SERVER,
    Layer,
    Plan,
    Policy,
    Problem,
    all_client,
    all_server,
    default_resolution_ms,
    dp,
    greedy,
    latency_ms,
    main,
    make_policy,
    min_latency,
    server_work,
    solve,
)


def _kernels() -> list:
    """Both DP kernels; the compiled one needs numba (the dev and server extras install it)."""
    from splitllm.planner import kernel as _planner_kernel

    skip = pytest.mark.skipif(_planner_kernel.compiled() is None, reason="numba is not installed")
    return [pytest.param("compiled", marks=skip), "numpy"]


KERNELS = pytest.mark.parametrize("kernel", _kernels())

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def brute_force(problem: Problem) -> Plan:
    """Reference: every one of the 2^L placements, least (work, latency) among the feasible, else
    least (latency, work)."""
    plans = [
        Plan.evaluate(problem, p, "brute")
        for p in itertools.product((CLIENT, SERVER), repeat=problem.num_layers)
    ]
    feasible = [p for p in plans if p.feasible]
    if feasible:
        return min(feasible, key=lambda p: (p.server_work, p.latency_ms))
    return min(plans, key=lambda p: (p.latency_ms, p.server_work))


def assert_min_latency(plan: Plan, ref: Plan) -> None:
    """``plan`` has the least latency, as the brute-force ``ref`` does.

    Which of several least-latency plans it is (the algorithms prefer less work) is not checked
    on real-valued instances: ``min_latency`` compares partial sums layer by layer, so plans whose
    latencies differ by less than the final sum's rounding (a 2e-16 ms term next to 2 ms) are
    not tied for it while the evaluator's totals are equal. Whole-ms tests check the work too.
    """
    assert plan.latency_ms == pytest.approx(ref.latency_ms, rel=1e-12, abs=1e-12)


def summary(plan: Plan) -> tuple[bool, float, float]:
    return plan.feasible, plan.server_work, plan.latency_ms


# Whole-ms instances: with bytes in multiples of 1000 and these bandwidths, every transfer is a
# whole number of ms (bytes * 8000 / bps), and even RTTs make rtt_ms / 2 whole too.
WHOLE_BPS = (8_000_000.0, 4_000_000.0, 1_600_000.0)


@st.composite
def whole_ms_problems(draw: st.DrawFn, max_layers: int = 8) -> Problem:
    n = draw(st.integers(1, max_layers))
    # About one boundary in seven carries 1 GB, which no link moves within any SLA here.
    kbytes = st.integers(0, 70).map(lambda k: k if k <= 60 else 1_000_000)
    layers = [
        Layer(
            client_ms=draw(st.integers(0, 60)),
            server_ms=draw(st.integers(0, 10)),
            server_work=draw(st.integers(0, 20)),
            out_bytes=1000 * draw(kbytes),
        )
        for _ in range(n)
    ]
    problem = Problem(
        layers=tuple(layers),
        input_bytes=1000 * draw(kbytes),
        uplink_bps=draw(st.sampled_from(WHOLE_BPS)),
        downlink_bps=draw(st.sampled_from(WHOLE_BPS)),
        rtt_ms=2 * draw(st.integers(0, 40)),
        sla_ms=0.0,
    )
    kind = draw(st.sampled_from(["int", "half", "at-a-plan", "zero"]))
    if kind == "at-a-plan":  # SLA exactly at some placement's latency
        placement = draw(st.lists(st.sampled_from((CLIENT, SERVER)), min_size=n, max_size=n))
        sla = latency_ms(problem, placement)
    elif kind == "zero":
        sla = 0.0
    else:
        sla = draw(st.integers(0, 1500)) + (0.5 if kind == "half" else 0.0)
    return replace(problem, sla_ms=sla)


@st.composite
def real_problems(draw: st.DrawFn, max_layers: int = 8) -> Problem:
    n = draw(st.integers(1, max_layers))
    ms = st.floats(0.0, 50.0, allow_nan=False)
    layers = tuple(
        Layer(draw(ms), draw(st.floats(0.0, 5.0)), draw(st.floats(0.0, 10.0)), draw(st.floats(0.0, 5e4)))
        for _ in range(n)
    )
    return Problem(
        layers=layers,
        input_bytes=draw(st.floats(0.0, 5e4)),
        uplink_bps=draw(st.floats(1e5, 1e8)),
        downlink_bps=draw(st.floats(1e5, 1e8)),
        rtt_ms=draw(st.floats(0.0, 80.0)),
        sla_ms=draw(st.floats(0.0, 600.0)),
    )


# -- the DP against brute force and the ILP -----------------------------------------------------


@KERNELS
@FAST
@given(problem=whole_ms_problems())
def test_dp_is_exact_on_whole_ms_instances(kernel: str, problem: Problem) -> None:
    ref = summary(brute_force(problem))
    if problem.sla_ms <= 2000:  # then the default grid divides 1 ms
        assert summary(dp(problem, kernel=kernel)) == ref
    if problem.sla_ms <= 1e5:  # SLAs set at a plan crossing a 1 GB boundary would need 1e7 bins
        assert summary(dp(problem, resolution_ms=1.0, kernel=kernel)) == ref
    else:
        assert dp(problem, kernel=kernel).feasible == ref[0]


@SLOW
@given(whole_ms_problems(max_layers=10))
def test_dp_equals_ilp_and_brute_force(problem: Problem) -> None:
    pytest.importorskip("scipy")
    from splitllm.planner import ilp

    ref = summary(brute_force(problem))
    assert summary(ilp(problem)) == ref
    if problem.sla_ms <= 1e5:
        assert summary(dp(problem, resolution_ms=1.0, kernel="numpy")) == ref
        assert summary(dp(problem, resolution_ms=1.0)) == ref


# Found by hypothesis in a full run: every work but one is 0 and that one 6e-8, below HiGHS's
# absolute MIP gap; on unscaled work the ILP returned a plan with that layer on the server.
_TINY_WORK = Problem(
    layers=(Layer(1.0, 0.0, 5.960464477539063e-08, 0.0), *(Layer(0.0, 0.0, 0.0, 0.0) for _ in range(6)),
            Layer(0.0, 2.0, 0.0, 1.0)),
    input_bytes=0.0, uplink_bps=1e5, downlink_bps=1e5, rtt_ms=0.0, sla_ms=3.0)


@SLOW
@given(real_problems(max_layers=9))
@example(_TINY_WORK)
def test_ilp_is_exact_on_real_valued_instances(problem: Problem) -> None:
    pytest.importorskip("scipy")
    from splitllm.planner import ilp

    plan, ref = ilp(problem), brute_force(problem)
    assert plan.feasible == ref.feasible
    if not plan.feasible:
        assert_min_latency(plan, ref)
        return
    # The reference is exact to HiGHS's absolute gap, 1e-6 of the largest layer's work (milp.py).
    largest = max(layer.server_work for layer in problem.layers)
    assert plan.server_work == pytest.approx(ref.server_work, rel=1e-9, abs=1e-6 * largest + 1e-12)
    assert plan.latency_ms <= problem.sla_ms


@KERNELS
@FAST
@given(problem=real_problems(), resolution=st.sampled_from([None, 0.5, 3.0, 10.0]))
def test_dp_never_breaks_the_sla_and_stays_within_its_bound(
    kernel: str, problem: Problem, resolution: float | None
) -> None:
    plan = dp(problem, resolution_ms=resolution, kernel=kernel)
    ref = brute_force(problem)
    assert plan.feasible == ref.feasible
    assert plan.latency_ms == latency_ms(problem, plan.placement)
    if not plan.feasible:
        assert_min_latency(plan, ref)
        return
    assert plan.latency_ms <= problem.sla_ms
    assert plan.server_work >= ref.server_work
    # Documented bound: no worse than the optimum under an SLA tightened by (L + 1) grid steps.
    res = default_resolution_ms(problem.sla_ms) if resolution is None else resolution
    tighter = brute_force(replace(problem, sla_ms=max(0.0, problem.sla_ms - (problem.num_layers + 1) * res)))
    if tighter.feasible and tighter.latency_ms <= problem.sla_ms - (problem.num_layers + 1) * res:
        assert plan.server_work <= tighter.server_work


@KERNELS
def test_single_layer_and_zero_rtt(kernel: str) -> None:
    layer = Layer(client_ms=10, server_ms=1, server_work=5, out_bytes=1000)
    base = Problem((layer,), input_bytes=1000, uplink_bps=8e6, downlink_bps=8e6, rtt_ms=0, sla_ms=3)
    plan = dp(base, kernel=kernel)
    assert plan.placement == (SERVER,) and plan.latency_ms == 3.0 and plan.feasible  # 1 + 1 + 1
    assert dp(replace(base, sla_ms=10), kernel=kernel).placement == (CLIENT,)
    infeasible = dp(replace(base, sla_ms=2.5), kernel=kernel)
    assert not infeasible.feasible and infeasible.placement == (SERVER,)  # the min-latency plan


@KERNELS
def test_huge_activations_force_all_client(kernel: str) -> None:
    layers = tuple(Layer(5, 1, 1, 1e9) for _ in range(6))
    problem = Problem(layers, input_bytes=1e9, uplink_bps=1e7, downlink_bps=1e7, rtt_ms=20, sla_ms=1000)
    assert dp(problem, kernel=kernel).placement == (CLIENT,) * 6
    assert not all_server(problem).feasible
    # Infinite transfer times (bytes * 8000 overflows) only rule plans out.
    problem = replace(problem, input_bytes=1e306, uplink_bps=1e-300)
    assert dp(problem, kernel=kernel).placement == (CLIENT,) * 6


@KERNELS
def test_several_switches_when_they_pay(kernel: str) -> None:
    # Layers 1 and 3 are cheap on the server and expensive on the client; 0, 2, 4 the reverse
    # (server work is the cost there). Moving bytes is cheap, so the DP hops twice.
    costly, cheap = Layer(1, 1, 100, 0), Layer(100, 1, 1, 0)
    problem = Problem((costly, cheap, costly, cheap, costly), 0, 8e6, 8e6, rtt_ms=2, sla_ms=20)
    plan = dp(problem, kernel=kernel)
    assert plan.placement == (CLIENT, SERVER, CLIENT, SERVER, CLIENT)
    assert plan.latency_ms == 1 + (1 + 1) + (1 + 1) + (1 + 1) + (1 + 1) and plan.server_work == 2


# -- the compiled kernel ------------------------------------------------------------------------


def _compiled_or_skip():
    from splitllm.planner import kernel as _planner_kernel

    if _planner_kernel.compiled() is None:
        pytest.skip("numba is not installed")
    return _planner_kernel


@FAST
@given(problem=real_problems(), resolution=st.sampled_from([None, 0.5, 3.0]))
def test_compiled_kernel_reports_the_exact_evaluators_figures(
    problem: Problem, resolution: float | None
) -> None:
    _compiled_or_skip()
    plan = dp(problem, resolution_ms=resolution, kernel="compiled")
    assert plan == Plan.evaluate(problem, plan.placement, "dp")  # bit for bit, not approximately


@SLOW
@given(problem=real_problems(max_layers=12), resolution=st.sampled_from([None, 0.25, 2.0]))
def test_the_kernel_source_runs_as_plain_python_too(problem: Problem, resolution: float | None) -> None:
    kernels = _compiled_or_skip()
    res = default_resolution_ms(problem.sla_ms) if resolution is None else resolution
    c = problem._costs
    out = []
    for fn in (kernels.compiled(), kernels.dp_kernel):  # numba's and CPython's run of one source
        placement = np.zeros(problem.num_layers, np.int8)
        found, lat, work, widest = fn(c.table, c.ret_ms, res, problem.sla_ms, placement)
        out.append((found, lat, work, widest, placement.tolist()))
    assert out[0] == out[1]


def _wide_instance(seed: int, n: int) -> Problem:
    """Whole-ms layers with scattered costs: each side's front holds hundreds of points."""
    rng = np.random.default_rng(seed)
    layers = tuple(
        Layer(
            int(rng.integers(0, 90)),
            int(rng.integers(0, 9)),
            int(rng.integers(1, 1000)),
            1000 * int(rng.integers(0, 8)),
        )
        for _ in range(n)
    )
    problem = Problem(layers, input_bytes=2000, uplink_bps=8e6, downlink_bps=4e6, rtt_ms=4, sla_ms=0)
    return replace(problem, sla_ms=float(all_client(problem).latency_ms // 3))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kernels_agree_when_the_fronts_outgrow_the_first_allocation(seed: int) -> None:
    _compiled_or_skip()
    problem = _wide_instance(seed, 48)
    compiled, numpy_plan = dp(problem, 1.0, kernel="compiled"), dp(problem, 1.0, kernel="numpy")
    assert compiled.feasible and summary(compiled) == summary(numpy_plan)  # exact: whole-ms at 1 ms
    if importlib.util.find_spec("scipy") is not None:
        from splitllm.planner import ilp

        assert compiled.server_work == ilp(problem).server_work


def test_kernel_choice_is_checked() -> None:
    from splitllm.planner import kernel as _planner_kernel
    from splitllm.planner import load_kernel

    assert load_kernel() == ("numpy" if _planner_kernel.compiled() is None else "compiled")
    from splitllm.planner import kernel_status

    assert kernel_status() == load_kernel()
    problem = Problem.from_dict(valid_dict())
    with pytest.raises(ConfigError, match="kernel must be one of auto, compiled, numpy"):
        dp(problem, kernel="fortran")


def test_numpy_kernel_can_be_forced_from_the_environment() -> None:
    code = (
        "from splitllm.planner import Problem, dp, load_kernel\n"
        "from splitllm.errors import ConfigError\n"
        f"p = Problem.from_dict({valid_dict()!r})\n"
        "print(dp(p).algorithm, load_kernel())\n"
        "try:\n    dp(p, kernel='compiled')\nexcept ConfigError as exc:\n    print('refused:', exc)\n"
    )
    code = "from splitllm.planner import kernel_status\nprint(kernel_status())\n" + code
    env = {**os.environ, "SPLITLLM_PLANNER_KERNEL": "numpy"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:2] == ["not loaded", "dp numpy"]
    assert "refused: the compiled DP kernel needs numba" in done.stdout


# -- evaluators and baselines -------------------------------------------------------------------


def test_latency_counts_every_switch_and_the_return() -> None:
    layers = (Layer(10, 1, 3, 2000), Layer(20, 2, 4, 4000), Layer(30, 3, 5, 1000))
    problem = Problem(layers, input_bytes=1000, uplink_bps=8e6, downlink_bps=4e6, rtt_ms=6, sla_ms=1e3)
    # server, client, server: up 1000 B (1 ms + 3), down 2000 B (4 ms + 3), up 4000 B (4 ms + 3),
    # and the output (1000 B) back down (2 ms + 3).
    placement = (SERVER, CLIENT, SERVER)
    assert latency_ms(problem, placement) == 1 + 20 + 3 + (4 + 3) + (1 + 3) + (4 + 3) + (2 + 3)
    assert server_work(problem, placement) == 8
    assert all_client(problem).latency_ms == 60 and all_client(problem).server_work == 0
    assert all_server(problem).server_work == 12
    assert all_server(problem).latency_ms == (1 + 3) + 6 + (2 + 3)


@FAST
@given(whole_ms_problems())
def test_greedy_is_a_feasible_prefix_plan_no_better_than_dp(problem: Problem) -> None:
    plan = greedy(problem)
    k = plan.placement.count(CLIENT)
    assert plan.placement == (CLIENT,) * k + (SERVER,) * (problem.num_layers - k)
    best = brute_force(problem)
    if all_server(problem).feasible:
        assert plan.feasible
        # It stopped at the first prefix that broke the SLA.
        if k < problem.num_layers:
            nxt = (CLIENT,) * (k + 1) + (SERVER,) * (problem.num_layers - k - 1)
            assert latency_ms(problem, nxt) > problem.sla_ms
        assert best.server_work <= plan.server_work
    if plan.feasible:
        assert best.feasible and best.server_work <= plan.server_work


def test_greedy_stops_at_the_first_failure() -> None:
    # Keeping layer 0 local means uploading its large output: too slow. All-client would be fine,
    # but greedy never looks past the first failure; the DP does.
    layers = (Layer(1, 1, 1, 1e6), Layer(1, 1, 1, 1))
    problem = Problem(layers, input_bytes=1, uplink_bps=1e6, downlink_bps=1e6, rtt_ms=10, sla_ms=50)
    assert greedy(problem).placement == (SERVER, SERVER)
    assert dp(problem).placement == (CLIENT, CLIENT)


def test_min_latency_matches_brute_force_on_an_infeasible_instance() -> None:
    layers = (Layer(30, 2, 1, 5000), Layer(30, 2, 2, 5000), Layer(5, 9, 3, 8))
    problem = Problem(layers, input_bytes=100, uplink_bps=8e6, downlink_bps=8e6, rtt_ms=4, sla_ms=1)
    ref = brute_force(problem)
    assert not ref.feasible
    assert summary(min_latency(problem)) == summary(ref) == summary(dp(problem))


def test_solve_dispatches_every_algorithm() -> None:
    layers = (Layer(3, 1, 2, 100), Layer(4, 1, 2, 100))
    problem = Problem(layers, input_bytes=100, uplink_bps=8e6, downlink_bps=8e6, rtt_ms=2, sla_ms=9)
    for name in ALGORITHMS:
        if name == "ilp":
            pytest.importorskip("scipy")
        plan = solve(problem, name)
        assert plan.algorithm == name
        assert set(plan.to_dict()) == {"placement", "server_work", "latency_ms", "feasible", "algorithm"}
    with pytest.raises(ConfigError, match="unknown algorithm"):
        solve(problem, "magic")
    with pytest.raises(ConfigError, match="resolution_ms"):
        dp(problem, resolution_ms=0)


# -- validation ---------------------------------------------------------------------------------


def valid_dict() -> dict:
    return {
        "layers": [{"client_ms": 5, "server_ms": 1, "server_work": 2, "out_bytes": 1000} for _ in range(4)],
        "input_bytes": 100,
        "uplink_bps": 1e7,
        "downlink_bps": 5e7,
        "rtt_ms": 20,
        "sla_ms": 50,
    }


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["layers"][3].update(server_ms=-1), r"layers\[3\]\.server_ms must be >= 0, got -1"),
        (lambda d: d.update(uplink_bps=0), "uplink_bps must be > 0, got 0"),
        (lambda d: d.update(downlink_bps=-5.0), "downlink_bps must be > 0"),
        (lambda d: d["layers"][1].pop("out_bytes"), r"layers\[1\]\.out_bytes is missing"),
        (lambda d: d.pop("sla_ms"), "sla_ms is missing"),
        (lambda d: d.update(rtt_ms=float("nan")), "rtt_ms must be finite"),
        (lambda d: d["layers"][0].update(client_ms=float("inf")), r"layers\[0\]\.client_ms must be finite"),
        (lambda d: d.update(layers=[]), "layers must not be empty"),
        (lambda d: d.update(sla_ms="fast"), "sla_ms must be a number"),
        (lambda d: d["layers"][2].update(server_work=True), r"layers\[2\]\.server_work must be a number"),
        (lambda d: d["layers"][2].update(sever_ms=1), r"layers\[2\] has unknown field"),
        (lambda d: d.update(layers={"a": 1}), "layers must be a list"),
    ],
)
def test_invalid_problems_name_the_field(mutate, message: str) -> None:
    data = valid_dict()
    mutate(data)
    with pytest.raises(InvalidProblem, match=message):
        Problem.from_dict(data)


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(InvalidProblem, match="server_ms must be >= 0"):
        Layer(1, -1, 1, 1)
    with pytest.raises(InvalidProblem, match="layers must not be empty"):
        Problem((), 1, 1, 1, 1, 1)
    problem = Problem.from_dict(valid_dict())
    with pytest.raises(InvalidProblem, match="placement"):
        latency_ms(problem, (CLIENT,))
    with pytest.raises(InvalidProblem, match=r"placement\[1\]"):
        server_work(problem, (CLIENT, "gpu", CLIENT, CLIENT))
    assert issubclass(InvalidProblem, PlannerError)


def test_problem_and_plan_round_trip_through_json() -> None:
    problem = Problem.from_dict(valid_dict())
    assert Problem.from_dict(json.loads(json.dumps(problem.to_dict()))) == problem
    plan = dp(problem)
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


# -- policy -------------------------------------------------------------------------------------


def test_policy_ranges_lookup_and_round_trip() -> None:
    problem = Problem.from_dict(valid_dict())
    grid = [1e5 * 2**k for k in range(12)]
    policy = make_policy(problem, grid)
    los = [r.lo_bps for r in policy.ranges]
    assert los[0] == grid[0] and policy.ranges[-1].hi_bps == grid[-1]
    for prev, nxt in itertools.pairwise(policy.ranges):
        assert prev.hi_bps == nxt.lo_bps
        assert (prev.plan.placement, prev.plan.feasible) != (nxt.plan.placement, nxt.plan.feasible)
    assert policy.plan_for(grid[0] / 2) is None and policy.plan_for(grid[-1]) is None
    for rng in policy.ranges:
        for bw in (rng.lo_bps, math.sqrt(rng.lo_bps * rng.hi_bps), math.nextafter(rng.hi_bps, 0)):
            assert policy.plan_for(bw) is rng.plan
            # Solved at the lower edge, so it stays within its latency at any bandwidth in range.
            scaled = replace(
                problem, uplink_bps=bw, downlink_bps=problem.downlink_bps * bw / problem.uplink_bps
            )
            assert latency_ms(scaled, rng.plan.placement) <= rng.plan.latency_ms
    # More bandwidth never costs the server more here.
    works = [r.plan.server_work for r in policy.ranges if r.plan.feasible]
    assert works == sorted(works, reverse=True)
    again = Policy.from_dict(json.loads(json.dumps(policy.to_dict())))
    assert again == policy and again.downlink == "scaled"
    with pytest.raises(InvalidProblem):
        Policy.from_dict({"algorithm": "dp", "downlink": "scaled", "ranges": [{"lo_bps": 2, "hi_bps": 1}]})
    fixed = make_policy(problem, grid, algorithm="greedy", scale_downlink=False)
    assert fixed.downlink == "fixed" and all(r.plan.algorithm == "greedy" for r in fixed.ranges)
    with pytest.raises(ConfigError):
        make_policy(problem, [1e6])


# -- CLI ----------------------------------------------------------------------------------------


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "splitllm.planner", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_solves_a_file_and_a_list(tmp_path) -> None:
    one = tmp_path / "one.json"
    one.write_text(json.dumps(valid_dict()))
    done = run_cli(str(one))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == dp(Problem.from_dict(valid_dict())).to_dict()
    done = run_cli("-", "--algorithm", "all-server", stdin=json.dumps([valid_dict(), valid_dict()]))
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert len(out) == 2 and out[0]["algorithm"] == "all-server" and out[0]["placement"] == ["server"] * 4


def test_cli_rejects_invalid_input_with_exit_2(tmp_path) -> None:
    bad = valid_dict()
    bad["layers"][3]["server_ms"] = -1
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([valid_dict(), bad]))
    done = run_cli(str(path))
    assert done.returncode == 2
    assert "[1]: layers[3].server_ms must be >= 0, got -1" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    path.write_text("{not json")
    assert run_cli(str(path)).returncode == 2
    assert run_cli(str(tmp_path / "missing.json")).returncode == 2


def test_cli_main_in_process(tmp_path, capsys) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(valid_dict()))
    assert main([str(path), "--algorithm", "greedy"]) == 0
    assert json.loads(capsys.readouterr().out)["algorithm"] == "greedy"


def test_capacity_scenarios_are_what_the_docs_say_on_the_planners_model(smollm2_bundle) -> None:
    """benchmarks/capacity.py's planner view on a SmolLM2-shaped profile (head ~8.6 layers): on the
    six live classes greedy and the DP cost the server within a few percent, on lte-flagship greedy
    puts half the model on the server and the DP none (docs/capacity.md, session 7)."""
    import argparse

    from splitllm.model.bundle import Bundle
    from splitllm.planner.profile import Profile

    load_benchmark("live_workload")  # capacity imports it
    capacity = load_benchmark("capacity")
    bundle = Bundle.open(smollm2_bundle, verify=False)
    layers = bundle.num_units - 2
    decode = (0.05, *([0.8] * layers), 6.85)  # ms per unit on one core: embeddings, layers, head
    base = Profile(bundle_id="", threads=1, prefill_tokens=64, context=0,
                   prefill_ms=tuple(10 * ms for ms in decode), decode_ms=decode)
    args = argparse.Namespace(classes=[c.name for c in capacity.CLIENTS], sla_scale=1.4, codec="int8-block64")
    for row in capacity.planner_view(bundle, base, args):
        assert row["dp_work"] <= row["greedy_work"] <= 1.1 * row["dp_work"] + 1e-9, row
    args.classes, args.sla_scale = ["lte-flagship"], 1.0
    (row,) = capacity.planner_view(bundle, base, args)
    assert row["device_ms"] < row["sla_ms"]
    assert row["dp_units"] == 0 and row["greedy_units"] >= bundle.num_units // 3, row
