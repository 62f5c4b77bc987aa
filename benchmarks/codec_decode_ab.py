"""codec.decode speed of this tree against another tree's codec package, on the same valid payloads.

Run: ``python benchmarks/codec_decode_ab.py --other DIR [--rounds 5] [--repeats 20]``, where DIR
holds another tree's ``splitllm`` package (e.g. ``git archive main sdk/splitllm | tar -x -C /tmp/main``
then ``--other /tmp/main/sdk``).

Why: the hostile-payload bounds (batches of rows, checked fields) must not make valid payloads
slower to decode. The payloads are those a server decodes on its hot path, a (1, 1, 576) decode
step and a (1, 64, 576) prefill, plus the fuzzer's valid seeds (every codec x 11 small shapes),
all encoded once here. Each side decodes them in its own subprocess (fresh imports, the same
payload file), the two alternating ``--rounds`` times so machine load hits both alike; a round
times ``--repeats`` decodes of every payload and keeps the fastest per payload. Both sides must
decode every payload to the same bits (else exit 1). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from splitllm import codec as codecs

HERE = Path(__file__).resolve().parent
SHAPES = {"step": (1, 1, 576), "prefill": (1, 64, 576)}

_WORKER = r"""
import hashlib, pickle, sys, time
from splitllm import codec
payloads = pickle.load(open(sys.argv[1], "rb"))
repeats = int(sys.argv[2])
out = {}
for key, data in payloads.items():
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x = codec.decode(data)
        best = min(best, time.perf_counter() - t)
    out[key] = (best, hashlib.sha256(x.tobytes()).hexdigest(), codec.__file__)
pickle.dump(out, sys.stdout.buffer)
"""


def payloads() -> dict[str, bytes]:
    """Payloads keyed "<group>|<codec>|<shape>": the hot-path shapes and the fuzzer's valid seeds."""
    sys.path.insert(0, str(HERE))
    import fuzz  # noqa: PLC0415 - a sibling benchmark, loaded only here

    rng = np.random.default_rng(0)
    out = {}
    for group, shape in SHAPES.items():
        x = rng.standard_normal(shape, np.float32)
        x[..., 7] *= 20  # one massive channel, as SmolLM2's hidden states have
        for name in codecs.CODECS:
            out[f"{group}|{name}|{shape}"] = codecs.encode(x, name)
    for s in fuzz.payload_seeds(random.Random(0)):
        out[f"seeds|{s.codec.name}|{s.shape}"] = fuzz.seed_payload(s)
    return out


def run_side(sdk: Path, path: Path, repeats: int) -> dict[str, tuple[float, str, str]]:
    env = {**os.environ, "PYTHONPATH": str(sdk)}
    done = subprocess.run([sys.executable, "-c", _WORKER, str(path), str(repeats)], env=env, check=True,
                          capture_output=True, timeout=1800)
    result: dict[str, tuple[float, str, str]] = pickle.loads(done.stdout)  # noqa: S301 - our own subprocess
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--other", type=Path, required=True, help="directory holding the other tree's splitllm package")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    this_sdk = Path(codecs.__file__).resolve().parents[2]
    data = payloads()
    best: dict[str, dict[str, float]] = {"this": {}, "other": {}}
    mismatched: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "payloads.pkl"
        path.write_bytes(pickle.dumps(data))
        files = {}
        for _ in range(args.rounds):
            got = {side: run_side(sdk, path, args.repeats) for side, sdk in (("other", args.other), ("this", this_sdk))}
            for side, rows in got.items():
                files[side] = next(iter(rows.values()))[2]
                for key, (secs, _, _) in rows.items():
                    best[side][key] = min(best[side].get(key, float("inf")), secs)
            mismatched |= {k for k in data if got["this"][k][1] != got["other"][k][1]}
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    print(f"CPU: {cpu}; this: {files['this']}; other: {files['other']}")
    print(f"{'group':8} {'codec':30} {'other us':>9} {'this us':>9} {'this/other':>10}")
    summary: dict[str, float] = {}
    for group in (*SHAPES, "seeds"):
        ratios = []
        for name in codecs.CODECS:
            keys = [k for k in data if k.startswith(f"{group}|{name}|")]
            other = sum(best["other"][k] for k in keys)
            this = sum(best["this"][k] for k in keys)
            ratios.append(this / other)
            print(f"{group:8} {name:30} {other * 1e6:9.1f} {this * 1e6:9.1f} {this / other:10.2f}")
        summary[f"{group}_geomean_ratio"] = round(float(np.exp(np.mean(np.log(ratios)))), 3)
        summary[f"{group}_max_ratio"] = round(max(ratios), 3)
        summary[f"{group}_median_ratio"] = round(statistics.median(ratios), 3)
    summary.update(cpu=cpu, rounds=args.rounds, repeats=args.repeats, payloads=len(data),
                   bit_identical=not mismatched)
    if mismatched:
        print(f"decoded differently: {sorted(mismatched)[:10]}")
    print(json.dumps(summary))
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
