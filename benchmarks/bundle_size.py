"""Is a SplitLLM bundle about the size of one monolithic ONNX export of the same model?

Run: ``python benchmarks/bundle_size.py [--bundle bundles/smollm2]``

A bundle serves every split k in 0..L, so it must not store weights once per split. The
acceptance bound (issue): the SmolLM2 bundle is at most 1.15x the size of a monolithic optimum
ONNX export of the same model (task ``text-generation-with-past``, fp32). Both sizes count every
file of the directory (graphs, external weights, tokenizer, manifest/config files); the export
is made once from the same transformers model the exporter reads and cached under ``.cache/``
(see ``_baselines.py``). A missing bundle is exported first with ``splitllm-export -q -o DIR``.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from _baselines import DEFAULT_BUNDLE, REPO, dir_size_bytes, machine_header, machine_info, optimum_export

LIMIT = 1.15
EXPORT_TIMEOUT_S = 600


def ensure_bundle(path: Path) -> None:
    """Export the built-in SmolLM2 bundle to ``path`` unless a manifest is already there."""
    if (path / "manifest.json").is_file():
        return
    exe = shutil.which("splitllm-export")
    if exe is None:
        sys.exit(f"no bundle at {path} and no splitllm-export on PATH; activate the venv first")
    print(f"no bundle at {path}: exporting it (about 75 s) ...", flush=True)
    subprocess.run([exe, "-q", "-o", str(path)], check=True, timeout=EXPORT_TIMEOUT_S)


def breakdown(path: Path) -> list[tuple[str, int, int]]:
    """(kind, bytes, files) grouped as weights / graphs / tokenizer and other files."""
    groups: dict[str, list[int]] = {}
    for entry in sorted(path.rglob("*")):
        if not entry.is_file() or entry.is_symlink():
            continue
        size = entry.stat().st_size
        if entry.suffix == ".onnx" and size > 64 * 2**20:
            kind = "graph with inline weights"
        elif entry.suffix == ".onnx":
            kind = "graphs (.onnx)"
        elif entry.suffix in (".bin", ".onnx_data", ".data") or entry.name.endswith(".onnx.data"):
            kind = "external weights"
        else:
            kind = "tokenizer, config, manifest"
        total = groups.setdefault(kind, [0, 0])
        total[0] += size
        total[1] += 1
    return [(kind, b, n) for kind, (b, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])]


def shown(path: Path) -> str:
    """``path`` relative to the repo when it is inside it (shorter, same on every checkout)."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="bundle directory (default: %(default)s)")
    args = parser.parse_args(argv)
    print(machine_header(), flush=True)
    ensure_bundle(args.bundle)
    optimum_dir = optimum_export(log=lambda s: print(s, flush=True))
    bundle_bytes, bundle_files = dir_size_bytes(args.bundle)
    optimum_bytes, optimum_files = dir_size_bytes(optimum_dir)
    ratio = bundle_bytes / optimum_bytes
    verdict = "PASS" if ratio <= LIMIT else "FAIL"

    print()
    print(f"{'directory':<58} {'files':>5} {'bytes':>13} {'MiB':>8}")
    for label, path, size, files in (("SplitLLM bundle", args.bundle, bundle_bytes, bundle_files),
                                     ("optimum monolithic export", optimum_dir, optimum_bytes, optimum_files)):
        print(f"{label:<58} {files:>5} {size:>13,} {size / 2**20:>8.1f}")
        print(f"    {shown(path)}")
        for kind, size_k, n in breakdown(path):
            print(f"    {kind:<54} {n:>5} {size_k:>13,} {size_k / 2**20:>8.1f}")
    print()
    print(f"ratio bundle / optimum = {ratio:.4f}  (limit {LIMIT:.2f}x): {verdict}")
    print(json.dumps({
        "bundle": str(args.bundle), "bundle_bytes": bundle_bytes, "bundle_files": bundle_files,
        "optimum_dir": str(optimum_dir), "optimum_bytes": optimum_bytes, "optimum_files": optimum_files,
        "ratio": round(ratio, 4), "limit": LIMIT, "result": verdict, "machine": machine_info(),
    }))
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
