"""Where a local decode step's time goes: ONNX Runtime's own profile, per op type, per weights variant.

Run: ``python benchmarks/step_profile.py [--bundle bundles/smollm2-variants] [--weights fp32,int4]
[--context 51] [--long-context 1000] [--steps 64] [--threads 2]``

For each weights variant: one fused session over every unit (what ``SplitClient(local=True)``
runs), a prefill of ``--context`` tokens, then ``--steps`` single-token decode steps. First
without profiling (median step time: the honest figure), with the cache bound in place and
copied each step (``Segment(bind_kv=False)``), after ``--context`` and ``--long-context``
positions; then again with ORT's profiler on
(which slows every node down by its own bookkeeping, so only the shares are meaningful): the
nodes per step and, per op type, the kernel time per step and its share. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from _baselines import REPO, machine_header

from splitllm import Bundle
from splitllm.model.runtime import KVCache, RuntimeOptions, Segment

DEFAULT_BUNDLE = REPO / "bundles" / "smollm2-variants"


def _steps(seg: Segment, bundle: Bundle, context: int, steps: int) -> list[float]:
    cache = KVCache(bundle.shapes)
    rng = np.random.default_rng(0)
    seg.run(rng.integers(0, bundle.shapes.vocab_size, (1, context), dtype=np.int64), cache, 0)
    token = np.array([[42]], dtype=np.int64)
    times = []
    for past in range(context, context + steps):
        started = time.perf_counter()
        seg.run(token, cache, past)
        times.append(time.perf_counter() - started)
    return times


def _median_step_ms(bundle: Bundle, weights: str, options: RuntimeOptions, context: int, steps: int,
                    bind_kv: bool) -> float:
    seg = Segment(bundle, 0, bundle.num_units, options=options, variant=weights, bind_kv=bind_kv)
    _steps(seg, bundle, context, 4)  # warm-up
    return statistics.median(_steps(seg, bundle, context, steps)) * 1e3


def profile(bundle: Bundle, weights: str, context: int, long_context: int, steps: int,
            threads: int) -> dict[str, Any]:
    options = RuntimeOptions(intra_op_threads=threads)
    timings = {}
    for ctx in (context, long_context):
        for bind in (True, False):
            timings[(ctx, bind)] = _median_step_ms(bundle, weights, options, ctx, steps, bind)
    step_ms = timings[(context, True)]

    prefix = str(Path(tempfile.gettempdir()) / f"splitllm-step-profile-{weights}")
    seg = Segment(bundle, 0, bundle.num_units, options=replace(options, profile_prefix=prefix), variant=weights)
    _steps(seg, bundle, context, steps)
    trace = Path(seg.session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink(missing_ok=True)
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    decode_runs = runs[1:]  # the first run is the prefill
    first_decode = decode_runs[0]["ts"] if decode_runs else 0
    per_op: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first_decode:
            per_op[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    n = max(len(decode_runs), 1)
    total = sum(per_op.values()) / n
    return {
        "weights": weights,
        "step_ms": round(step_ms, 2),
        "tok_per_s": round(1e3 / step_ms, 1),
        "step_ms_kv_copied": round(timings[(context, False)], 2),
        "long_context": long_context,
        "long_step_ms": round(timings[(long_context, True)], 2),
        "long_step_ms_kv_copied": round(timings[(long_context, False)], 2),
        "nodes_per_step": round(sum(count.values()) / n),
        "profiled_kernel_us_per_step": round(total),
        "ops": [
            {"op": op, "us": round(us / n), "share": round(us / n / total, 3), "nodes": round(count[op] / n)}
            for op, us in per_op.most_common()
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--weights", default="fp32,int4", help="comma-separated variants of the bundle")
    parser.add_argument("--context", type=int, default=51, help="prompt tokens before the decode steps")
    parser.add_argument("--long-context", type=int, default=1000, help="prompt tokens for the long-context timing")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=12, help="op types printed per variant")
    args = parser.parse_args(argv)
    print(machine_header(sys.argv))
    bundle = Bundle.open(args.bundle, verify=False)
    results = []
    for weights in [w for w in args.weights.split(",") if w]:
        bundle.check_variant(weights)
        r = profile(bundle, weights, args.context, args.long_context, args.steps, args.threads)
        results.append(r)
        blocks = bundle.manifest["blocks"] if weights == "fp32" else bundle.manifest["variants"][weights]["blocks"]
        fused = "seqlens_k" in blocks["layer.0"]["inputs"]
        print(f"\n{weights} ({'fused layers' if fused else 'exported layer graphs'}): decode step {r['step_ms']:.2f} ms "
              f"({r['tok_per_s']:.1f} tok/s) unprofiled; {r['nodes_per_step']} nodes per step; profiled kernels "
              f"{r['profiled_kernel_us_per_step'] / 1e3:.2f} ms per step")
        print(f"  step ms, KV bound in place / copied each step: {r['step_ms']:.2f} / {r['step_ms_kv_copied']:.2f} "
              f"after {args.context} positions, {r['long_step_ms']:.2f} / {r['long_step_ms_kv_copied']:.2f} "
              f"after {args.long_context}" + ("" if fused else " (exported layer graphs: nothing to bind, the same path)"))
        print(f"  {'op type':32s} {'us/step':>8s} {'share':>6s} {'nodes':>6s}")
        for op in r["ops"][: args.top]:
            print(f"  {op['op']:32s} {op['us']:8d} {op['share']:6.1%} {op['nodes']:6d}")
        rest = r["ops"][args.top:]
        if rest:
            print(f"  {'(' + str(len(rest)) + ' other op types)':32s} {sum(o['us'] for o in rest):8d} "
                  f"{sum(o['share'] for o in rest):6.1%} {sum(o['nodes'] for o in rest):6d}")
    print(json.dumps({"bundle": str(args.bundle), "context": args.context, "steps": args.steps,
                      "threads": args.threads, "results": [{k: v for k, v in r.items() if k != "ops"} for r in results]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
