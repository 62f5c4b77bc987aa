"""Size/quality frontier of every activation codec at several splits of SmolLM2, on several texts.

Run: ``python benchmarks/codec_frontier.py [--bundle bundles/smollm2] [--tokens 1024]
[--texts pydoc,code,license] [--text-file PATH] [--splits 1,5,10,20,29] [--codecs <list> | all]``

For each (text, split, codec), teacher-forced as in ``codec_quality.py``: bytes of one (1, 1, H)
decode-step payload (header included: 28 bytes for a 3-d tensor) and its ratio to fp32's
payload, bits per value of the 256-token chunk payloads, the KL divergence of the next-token
distribution to the fp32 run's (mean and 99th percentile), top-1 agreement and perplexity
change. "+zstd" twins decode exactly like their base codec (checked), so only their bytes are
measured; they are listed after the table.

The goal (issue 18, item 3): a codec whose decode-step payload is >= 6x smaller than fp32's,
with mean KL divergence <= int8-block64's at every split measured, on every text. ``KL/int8``
is the codec's mean KL over int8-block64's at the same split and text (<= 1 meets it); ``vs
int8`` is the paired top-1 difference to int8-block64 with its standard error (McNemar: only
the positions where exactly one of the two is right count), shown for reference.

The default codec list on three texts of 1,024 tokens takes about 15 minutes on 2 idle cores;
``--codecs all`` runs every registered codec. Last line: one JSON object.
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
    open_texts,
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


def kl_vs_baseline(q: CodecQuality, baseline: CodecQuality) -> float:
    """Mean KL of ``q`` over the baseline's at the same split and text (inf if the baseline is exact)."""
    return q.kld_mean / baseline.kld_mean if baseline.kld_mean > 0 else float("inf")


def meets_goal(q: CodecQuality, baseline: CodecQuality) -> bool:
    return q.ratio_vs_fp32 >= MIN_RATIO and q.kld_mean <= baseline.kld_mean


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
        bundle, splits, texts = open_texts(args)
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
          f"{args.tokens} tokens per text ({', '.join(f'{t.name} = {t.source}' for t, _ in texts)}); "
          f"fp32 decode step = {fp32_bytes} B; goal: >= {MIN_RATIO:g}x (<= {fp32_bytes / MIN_RATIO:.1f} B) "
          f"and mean KL <= {BASELINE}'s, at every split of every text")
    print(f"{'text':<8} {'split':>5} {'codec':<26} {'decode B':>8} {'vs fp32':>7} {'KL mean':>9} {'KL p99':>9} "
          f"{'KL/int8':>7} {'top1':>7} {'vs int8 (SE)':>15} {'d ppl':>8}  goal")
    results: dict[tuple[str, int, str], CodecQuality] = {}
    for text, tokens in texts:
        evaluator = Evaluator(bundle, tokens, chunk_tokens=args.chunk, threads=args.threads, text=text.name)
        for split in splits:
            split_started = time.perf_counter()
            ref = evaluator.reference(split)
            print(f"{text.name:<8} {split:>5} {'fp32 (reference)':<26} {fp32_bytes:>8} {1.0:>6.2f}x "
                  f"{0.0:>9.2e} {0.0:>9.2e}  ppl {ref.perplexity:.4f}")
            for name in names:
                q = results[(text.name, split, name)] = evaluator.evaluate(split, name)
                base = results[(text.name, split, BASELINE)]
                delta, se = paired_delta(q, base)
                goal = "MEETS" if meets_goal(q, base) else "-"
                print(f"{text.name:<8} {split:>5} {name:<26} {q.decode_bytes:>8.1f} {q.ratio_vs_fp32:>6.2f}x "
                      f"{q.kld_mean:>9.2e} {q.kld_p99:>9.2e} {kl_vs_baseline(q, base):>7.3f} "
                      f"{100 * q.agreement:>6.2f}% {100 * delta:>+7.2f} ({100 * se:.2f}) "
                      f"{q.ppl_change_pct:>+7.3f}%  {goal}", flush=True)
            for twin in twins:
                results[(text.name, split, twin)] = evaluator.evaluate_twin(
                    results[(text.name, split, twin.removesuffix("+zstd"))], twin)
            evaluator.release(split)
            print(f"      {text.name} split {split} done in {time.perf_counter() - split_started:.0f} s", flush=True)
    keys = [(t.name, s) for t, _ in texts for s in splits]
    print("zstd twins (same decoded tensors as the base codec; decode-step bytes mean/max, chunk bits/value):")
    for twin in twins:
        cells = [f"{results[(*k, twin)].decode_bytes:.1f}/{results[(*k, twin)].decode_bytes_max}"
                 f" {results[(*k, twin)].chunk_bits_per_value:.2f}" for k in keys]
        print(f"  {twin:<28} " + " | ".join(f"{t} k={s}: {c}" for (t, s), c in zip(keys, cells, strict=True)))
    print(f"summary over texts {[t.name for t, _ in texts]} and splits {splits} (worst case of each column):")
    print(f"  {'codec':<26} {'decode B':>8} {'vs fp32':>7} {'max KL':>9} {'max KL/int8':>11} {'min top1':>8} "
          f"{'max d ppl':>9}  goal")
    summary = []
    for name in names:
        qs = [results[(*k, name)] for k in keys]
        bases = [results[(*k, BASELINE)] for k in keys]
        ok = all(meets_goal(q, b) for q, b in zip(qs, bases, strict=True))
        summary.append({"codec": name, "meets_goal_everywhere": ok,
                        "decode_bytes": max(q.decode_bytes for q in qs),
                        "ratio_vs_fp32": min(q.ratio_vs_fp32 for q in qs),
                        "max_kld_mean": max(q.kld_mean for q in qs),
                        "max_kld_vs_int8": max(kl_vs_baseline(q, b) for q, b in zip(qs, bases, strict=True)),
                        "min_top1": min(q.agreement for q in qs),
                        "max_ppl_change_pct": max(q.ppl_change_pct for q in qs)})
        row = summary[-1]
        print(f"  {name:<26} {row['decode_bytes']:>8.1f} {row['ratio_vs_fp32']:>6.2f}x {row['max_kld_mean']:>9.2e} "
              f"{row['max_kld_vs_int8']:>11.3f} {100 * row['min_top1']:>7.2f}% {row['max_ppl_change_pct']:>+8.3f}%  "
              f"{'MEETS' if ok else '-'}")
    winners = [s["codec"] for s in summary if s["meets_goal_everywhere"]]
    print(f"meets the goal at every split of every text: {', '.join(winners) or 'none'}; "
          f"{time.perf_counter() - started:.0f} s")
    print(json.dumps({
        "benchmark": "codec_frontier",
        "model": bundle.model_id,
        "tokens": args.tokens,
        "texts": {t.name: t.source for t, _ in texts},
        "splits": splits,
        "goal": {"min_ratio_vs_fp32": MIN_RATIO, "max_kld_mean": BASELINE},
        "results": [
            {**q.to_dict(), "kld_vs_int8": round(kl_vs_baseline(q, results[(q.text, q.split, BASELINE)]), 4),
             "top1_vs_int8": round(paired_delta(q, results[(q.text, q.split, BASELINE)])[0], 5)}
            for q in results.values()
        ],
        "summary": summary,
        "meets_goal": winners,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
