"""Server memory with clients at several splits: one session per range vs chained aligned pieces.

Run: ``python benchmarks/server_memory.py [--bundle bundles/smollm2] [--splits 20,10,5,0]``

Each ORT session prepacks its own copy of its MatMul weights, so a server whose clients sit at
different splits held one copy of the shared tail per split. ``splitllm-server --chunk-units N``
(default 8) runs a range as a chain of sessions cut at multiples of N units, shared between
ranges. For ``--chunk-units 0`` (one session per range) and the default, a fresh process builds the
server's ``Engine``, and for each split in turn runs the server's range of it (units
``split + 1 .. end``, as a split client asks): a 64-token prefill and ``--steps`` decode steps.
It prints, per split, the process's anonymous memory above its start (the prepacked weights;
the unpacked ones are file-backed mmaps of ``weights.bin``) and the median step time, then the
ratios between the two settings. ``--no-prepack`` adds a third: one session per range with
ORT's prepacking off, where every weight stays a shared mmap. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

from _baselines import status_mb

REPO = Path(__file__).resolve().parents[1]


def _status_mb(key: str) -> float:
    value = status_mb(key)
    if math.isnan(value):
        raise RuntimeError(f"{key} not in /proc/self/status")
    return value


def worker(spec: dict) -> dict:
    import asyncio

    import numpy as np

    from splitllm import Bundle
    from splitllm import codec as codecs
    from splitllm.model.runtime import RuntimeOptions
    from splitllm.protocol import wire
    from splitllm_server.engine import Engine

    class Options(RuntimeOptions):
        def session_options(self):  # noqa: ANN202
            so = super().session_options()
            if spec["no_prepack"]:  # every weight stays a shared mmap of weights.bin
                so.add_session_config_entry("session.disable_prepacking", "1")
            return so

    bundle = Bundle.open(spec["bundle"], verify=False)
    engine = Engine(bundle, cache_size=len(spec["splits"]), options=Options(intra_op_threads=spec["threads"]),
                    chunk_units=spec["chunk_units"])
    base = _status_mb("RssAnon")
    rng = np.random.default_rng(0)

    def run_msg(start: int, end: int, past: int, x: np.ndarray) -> wire.Run:
        """The Run a client at this split sends: its hidden states in, the next token out."""
        return wire.Run(seq=past, start=start, end=end, past_len=past, n_tokens=int(x.shape[1]),
                        payload=codecs.encode(x, "fp32"), want="token", temperature=0.0, top_p=1.0, top_k=0,
                        seed=0, codec="fp32")

    async def drive() -> list[dict]:
        rows = []
        for split in spec["splits"]:
            start, end = bundle.split_range(split, "server")
            slot, kv = await engine.open_session()  # a client at this split: a session of its own
            x = rng.standard_normal((1, 64, bundle.shapes.hidden_size)).astype(np.float32)
            await engine.run(slot, kv, run_msg(start, end, 0, x))
            steps = []
            for past in range(64, 64 + spec["steps"]):
                _, timing = await engine.run(slot, kv, run_msg(start, end, past, x[:, :1]))
                steps.append(timing.compute_ms)
            rows.append({
                "split": split,
                "units": [start, end],
                "pieces": engine.scheduler.pieces(start, end),
                "anon_mb_above_start": round(_status_mb("RssAnon") - base, 1),
                "step_ms_median": round(statistics.median(steps), 3),
            })
            engine.close_session(slot)
        return rows

    try:
        rows = asyncio.run(drive())
    finally:
        engine.close()
    return {"chunk_units": spec["chunk_units"], "no_prepack": spec["no_prepack"], "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "bundles" / "smollm2")
    parser.add_argument("--splits", default="20,10,5,0", help="client splits, in the order clients arrive")
    parser.add_argument("--chunk-units", type=int, default=None, help="the chunked setting (default: the server's)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: one per core)")
    parser.add_argument("--no-prepack", action="store_true",
                        help="also run one session per range with ORT's weight prepacking off")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    from splitllm_server.config import DEFAULT_CHUNK_UNITS

    if not (args.bundle / "manifest.json").exists():
        parser.error(f"no bundle at {args.bundle}: run `make demo` (or splitllm-export) first")
    chunked = DEFAULT_CHUNK_UNITS if args.chunk_units is None else args.chunk_units
    splits = [int(s) for s in args.splits.split(",")]
    settings = {"whole": (0, False), "pieces": (chunked, False)}
    if args.no_prepack:
        settings["no_prepack"] = (0, True)
    results = {}
    for name, (chunk_units, no_prepack) in settings.items():
        spec = {"bundle": str(args.bundle), "splits": splits, "chunk_units": chunk_units, "steps": args.steps,
                "threads": args.threads, "no_prepack": no_prepack}
        done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                              text=True, check=False)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return 1
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    titles = {"whole": "one session per range", "pieces": f"pieces of {chunked} units", "no_prepack": "whole, no prepacking"}
    print(f"{'split':>5} {'server units':>13} | " + " | ".join(f"{titles[name]:>28}" for name in results))
    for i, split in enumerate(splits):
        cells = [results[name]["rows"][i] for name in results]
        print(f"{split:>5} {str(cells[0]['units']):>13} | " + " | ".join(
            f"{c['anon_mb_above_start']:>7.0f} MB {c['step_ms_median']:>7.2f} ms/step" for c in cells))
    whole, pieces = results["whole"]["rows"], results["pieces"]["rows"]
    mem_ratio = pieces[-1]["anon_mb_above_start"] / whole[-1]["anon_mb_above_start"]
    step_ratio = statistics.median(b["step_ms_median"] / a["step_ms_median"] for a, b in zip(whole, pieces, strict=True))
    print(f"after {len(splits)} splits: memory {mem_ratio:.2f}x of one session per range; "
          f"step time {step_ratio:.2f}x (median over splits)")
    if args.no_prepack:
        slower = statistics.median(b["step_ms_median"] / a["step_ms_median"]
                                   for a, b in zip(whole, results["no_prepack"]["rows"], strict=True))
        print(f"prepacking off: step time {slower:.2f}x of one session per range (median over splits)")
    print(json.dumps({"splits": splits, "chunk_units": chunked, "results": list(results.values()),
                      "memory_ratio": round(mem_ratio, 3), "step_time_ratio": round(step_ratio, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
