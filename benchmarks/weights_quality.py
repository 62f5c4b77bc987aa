"""Quality of the device weight variants: teacher-forced top-1 agreement and perplexity vs fp32.

Run: ``python benchmarks/weights_quality.py [--bundle bundles/smollm2-variants] [--tokens 2048]
[--window 512] [--threads 2]``

The bundle needs variants; make it with
``splitllm-export -q --client-weights fp16,int8,int4 -o bundles/smollm2-variants`` (its fp32 part
is byte-for-byte the plain export).

Text: Python's ``pydoc_data.topics`` values concatenated in sorted key order, tokenised with the
bundle's tokenizer, first ``--tokens`` ids. It is cut into windows of ``--window`` tokens, each
run in one pass from an empty cache through the whole model (all units local, logits at every
position). For each position the variant's argmax is compared with fp32's argmax (top-1
agreement), and the log-probability of the true next token gives the perplexity. Extra bytes
are the variant's own files (graphs + weights file) that a bundle without it does not have.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _baselines import REPO, machine_header, machine_info

from splitllm.model.bundle import Bundle
from splitllm.model.runtime import RuntimeOptions
from splitllm_export.quality import QUALITY_TEXT, compare_quality, next_token_stats, quality_tokens

DEFAULT_BUNDLE = REPO / "bundles" / "smollm2-variants"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="bundle with variants (default %(default)s)")
    parser.add_argument("--tokens", type=int, default=2048, help="text tokens (default %(default)s)")
    parser.add_argument("--window", type=int, default=512, help="tokens per one-pass window (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default %(default)s)")
    args = parser.parse_args(argv)
    if not (args.bundle / "manifest.json").is_file():
        parser.error(f"no bundle at {args.bundle}; make it with: "
                     f"splitllm-export -q --client-weights fp16,int8,int4 -o {args.bundle}")
    if args.tokens < 2 or args.window < 2 or args.threads < 1:
        parser.error("--tokens and --window must be >= 2, --threads >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(machine_header(), flush=True)
    bundle = Bundle.open(args.bundle)
    if len(bundle.variants) == 1:
        raise SystemExit(f"{args.bundle} has no device variants; export it with --client-weights")
    options = RuntimeOptions(intra_op_threads=args.threads)
    ids = quality_tokens(bundle, args.tokens)
    fp32_bytes = bundle.manifest["files"]["weights.bin"]["size_bytes"]
    print(f"bundle {args.bundle} ({bundle.model_id}); text: {QUALITY_TEXT}; {len(ids)} tokens, "
          f"windows of {args.window}", flush=True)
    results: dict[str, dict] = {}
    reference = None
    for name in bundle.variants:
        started = time.perf_counter()
        stats = next_token_stats(bundle, name, ids, args.window, options)
        seconds = time.perf_counter() - started
        reference = stats if reference is None else reference
        entry = bundle.manifest.get("variants", {}).get(name, {})
        row = compare_quality(reference, stats)
        row["extra_bytes"] = int(entry.get("size_bytes", 0))
        row["pass_s"] = round(seconds, 1)
        row["scheme"] = entry.get("scheme", "exact fp32 blocks (the reference)")
        results[name] = row
        print(f"  {name}: done in {seconds:.1f} s", flush=True)
    print()
    print(f"{'weights':<8} {'top-1 agree':>11} {'ppl':>9} {'ppl delta':>9} {'extra bytes':>13} {'x fp32 weights':>14}")
    for name, row in results.items():
        print(f"{name:<8} {row['top1_agreement'] * 100:>10.2f}% {row['ppl']:>9.3f} {row['ppl_delta_pct']:>+8.2f}% "
              f"{row['extra_bytes']:>13,} {row['extra_bytes'] / fp32_bytes:>14.3f}")
    print(f"\n{results['fp32']['predictions']} predictions; fp32 weights.bin is {fp32_bytes:,} bytes")
    for name, row in results.items():
        print(f"  {name}: {row['scheme']}")
    summary = {"bundle": str(args.bundle), "model": bundle.model_id, "tokens": len(ids), "window": args.window,
               "text": QUALITY_TEXT, "fp32_weights_bytes": fp32_bytes, "variants": results,
               "machine": machine_info()}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
