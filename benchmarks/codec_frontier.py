"""Size/quality frontier of every activation codec at several splits of SmolLM2.

Run: ``python benchmarks/codec_frontier.py [--bundle bundles/smollm2] [--tokens 2048]
[--splits 1,5,10,20,29] [--codecs <list> | all]``

For each (split, codec), teacher-forced on the pydoc text as in ``codec_quality.py``: bits per
value and bytes of one (1, 1, H) decode-step payload (header included: 28 bytes for a 3-d
tensor), its ratio to fp32's payload, bits per value of the 256-token chunk payloads, top-1
agreement with the fp32 run and perplexity change. "+zstd" twins decode exactly like their base
codec (checked), so only their bytes are measured; they are listed after the table.

The goal (issue 7, item 3): a codec whose decode-step payload is >= 6x smaller than fp32's,
with perplexity change <= +0.5% and top-1 agreement >= int8-block64's at the same split, at
every split measured. ``vs int8`` is the paired agreement difference to int8-block64 with its
standard error (McNemar: only the positions where exactly one of the two is right count); a
difference inside 2 SE is a statistical tie on this many positions.

The default codec list fits in about 10 minutes on 2 cores; ``--codecs all`` runs every
registered codec (about twice as long). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from _quality import (
    EXPORT_HINT,
    CodecQuality,
    Evaluator,
    add_text_arguments,
    open_text,
    paired_delta,
    preamble,
)

from splitllm import codec as codecs
from splitllm.errors import SplitLLMError

BASELINE = "int8-block64"
DEFAULT_CODECS = (
    "fp16,int8-block32,int8-block64,int8-block128,int6-block64,hadamard-int5-block64,"
    "hadamard-int5-block64-o2,hadamard-int4-block64-o2,ec4.5,ec5,ec6,ec7"
)
DEFAULT_TWINS = "fp16+zstd,int8-block64+zstd,hadamard-int5-block64+zstd,ec5+zstd"
MIN_RATIO = 6.0
MAX_PPL_CHANGE_PCT = 0.5


def meets_goal(q: CodecQuality, baseline: CodecQuality) -> bool:
    return (q.ratio_vs_fp32 >= MIN_RATIO and q.ppl_change_pct <= MAX_PPL_CHANGE_PCT
            and q.agreement >= baseline.agreement)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_text_arguments(parser)
    parser.add_argument("--codecs", default=DEFAULT_CODECS, help="comma-separated names, or 'all'")
    parser.add_argument("--twins", default=DEFAULT_TWINS, help="+zstd codecs measured for bytes only")
    args = parser.parse_args(argv)
    preamble(["benchmarks/codec_frontier.py", *argv])
    started = time.perf_counter()
    try:
        bundle, splits, tokens = open_text(args)
        if args.codecs == "all":
            names = [n for n in codecs.CODECS if not n.endswith("+zstd") and n != "fp32"]
            twins = [n for n in codecs.CODECS if n.endswith("+zstd") and n != "fp32+zstd"]
        else:
            names = [codecs.get_codec(n).name for n in args.codecs.split(",")]
            twins = [codecs.get_codec(n).name for n in args.twins.split(",") if n]
        names = [BASELINE, *[n for n in names if n != BASELINE]]
        names += [t.removesuffix("+zstd") for t in twins if t.removesuffix("+zstd") not in names]
    except (SplitLLMError, ValueError) as exc:
        print(f"error: {exc} ({EXPORT_HINT})", file=sys.stderr)
        return 2
    fp32_bytes = codecs.get_codec("fp32").encoded_size((1, 1, bundle.shapes.hidden_size))
    print(f"bundle: {bundle.model_id}, {bundle.num_layers} layers, hidden {bundle.shapes.hidden_size}; "
          f"{len(tokens)} tokens, {len(tokens) - 1} scored positions; fp32 decode step = {fp32_bytes} B; "
          f"goal: >= {MIN_RATIO:g}x (<= {fp32_bytes / MIN_RATIO:.1f} B), d ppl <= +{MAX_PPL_CHANGE_PCT}%, "
          f"top-1 >= {BASELINE}")
    head = (f"{'split':>5} {'codec':<26} {'decode B':>8} {'bpv dec':>7} {'bpv chk':>7} {'vs fp32':>7} "
            f"{'top1':>7} {'vs int8 (SE)':>15} {'d ppl':>8}  goal")
    print(head)
    evaluator = Evaluator(bundle, tokens, chunk_tokens=args.chunk, threads=args.threads)
    results: dict[tuple[int, str], CodecQuality] = {}
    for split in splits:
        split_started = time.perf_counter()
        ref = evaluator.reference(split)
        print(f"{split:>5} {'fp32 (reference)':<26} {fp32_bytes:>8} {fp32_bytes * 8 / bundle.shapes.hidden_size:>7.3f} "
              f"{32.0:>7.3f} {1.0:>6.2f}x {100.0:>6.2f}% {'':>15} {0.0:>+7.3f}%   ppl {ref.perplexity:.4f}")
        for name in names:
            q = results[(split, name)] = evaluator.evaluate(split, name)
            base = results[(split, BASELINE)]
            delta, se = paired_delta(q, base)
            goal = "MEETS" if meets_goal(q, base) else "-"
            print(f"{split:>5} {name:<26} {q.decode_bytes:>8.1f} {q.decode_bits_per_value:>7.3f} "
                  f"{q.chunk_bits_per_value:>7.3f} {q.ratio_vs_fp32:>6.2f}x {100 * q.agreement:>6.2f}% "
                  f"{100 * delta:>+7.2f} ({100 * se:.2f}) {q.ppl_change_pct:>+7.3f}%  {goal}", flush=True)
        for twin in twins:
            results[(split, twin)] = evaluator.evaluate_twin(results[(split, twin.removesuffix("+zstd"))], twin)
        evaluator.release(split)
        print(f"      split {split} done in {time.perf_counter() - split_started:.0f} s", flush=True)
    print("zstd twins (same decoded tensors as the base codec; decode-step bytes mean/max, chunk bits/value):")
    for twin in twins:
        cells = [f"{results[(s, twin)].decode_bytes:.1f}/{results[(s, twin)].decode_bytes_max}"
                 f" {results[(s, twin)].chunk_bits_per_value:.2f}" for s in splits]
        print(f"  {twin:<28} " + " | ".join(f"k={s}: {c}" for s, c in zip(splits, cells, strict=True)))
    print(f"summary over splits {splits} (worst case of each column; goal = at every split):")
    print(f"  {'codec':<26} {'decode B':>8} {'vs fp32':>7} {'min top1':>8} {'min vs int8':>11} {'max d ppl':>9}  goal")
    summary = []
    for name in names:
        qs = [results[(s, name)] for s in splits]
        deltas = [paired_delta(q, results[(q.split, BASELINE)])[0] for q in qs]
        ok = all(meets_goal(q, results[(q.split, BASELINE)]) for q in qs)
        summary.append({"codec": name, "meets_goal_at_every_split": ok,
                        "decode_bytes": max(q.decode_bytes for q in qs),
                        "ratio_vs_fp32": min(q.ratio_vs_fp32 for q in qs),
                        "min_top1": min(q.agreement for q in qs), "min_top1_vs_int8": min(deltas),
                        "max_ppl_change_pct": max(q.ppl_change_pct for q in qs)})
        print(f"  {name:<26} {summary[-1]['decode_bytes']:>8.1f} {summary[-1]['ratio_vs_fp32']:>6.2f}x "
              f"{100 * summary[-1]['min_top1']:>7.2f}% {100 * min(deltas):>+10.2f} "
              f"{summary[-1]['max_ppl_change_pct']:>+8.3f}%  {'MEETS' if ok else '-'}")
    winners = [s["codec"] for s in summary if s["meets_goal_at_every_split"]]
    print(f"meets the goal at every split: {', '.join(winners) or 'none'}; "
          f"{time.perf_counter() - started:.0f} s")
    print(json.dumps({
        "benchmark": "codec_frontier",
        "model": bundle.model_id,
        "tokens": len(tokens),
        "splits": splits,
        "goal": {"min_ratio_vs_fp32": MIN_RATIO, "max_ppl_change_pct": MAX_PPL_CHANGE_PCT, "min_top1": BASELINE},
        "results": [
            {**q.to_dict(), "top1_vs_int8": round(paired_delta(q, results[(q.split, BASELINE)])[0], 5),
             "top1_vs_int8_se": round(paired_delta(q, results[(q.split, BASELINE)])[1], 5)}
            for q in results.values()
        ],
        "summary": summary,
        "meets_goal": winners,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
