"""Issue acceptance for the activation codecs: fp16 and int8-block64 on real text, five splits.

Run: ``python benchmarks/codec_quality.py [--bundle bundles/smollm2] [--tokens 2048]
[--splits 1,5,10,20,29] [--codecs fp16,int8-block64,int8-block64+zstd]``

Teacher-forced (see ``_quality.py``): the first ``--tokens`` tokens of Python's pydoc topics
text run through the split model in chunks of 256 with KV caches; each chunk's hidden states go
through the codec as a client sends them; per position the top-1 and log p(next token) are
compared with the fp32 run. Targets, checked at every split:

- fp16: top-1 agreement >= 99.5%;
- int8-block64: perplexity change within +-0.5% and top-1 agreement >= 98%.

"+zstd" codecs decode to exactly their base codec's tensors (checked on every chunk), so only
their bytes are measured. ``decode B`` is one (1, 1, H) payload, header included; bits/value
are for that payload and for the 256-token chunk payloads. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from _quality import EXPORT_HINT, CodecQuality, Evaluator, add_text_arguments, open_text, preamble

from splitllm import codec as codecs
from splitllm.errors import SplitLLMError

TARGETS = {  # codec -> (minimum top-1 agreement, maximum |ppl change| in %)
    "fp16": (0.995, None),
    "int8-block64": (0.98, 0.5),
}


def verdict(q: CodecQuality) -> bool | None:
    """True/False against the codec's target, None when it has none."""
    if q.codec not in TARGETS:
        return None
    min_agree, max_ppl = TARGETS[q.codec]
    return q.agreement >= min_agree and (max_ppl is None or abs(q.ppl_change_pct) <= max_ppl)


def row(q: CodecQuality) -> str:
    ok = verdict(q)
    mark = "-" if ok is None else ("PASS" if ok else "FAIL")
    return (
        f"{q.split:>5} {q.codec:<20} {100 * q.agreement:>9.2f}% {q.ppl:>9.4f} {q.ppl_change_pct:>+8.3f}% "
        f"{q.decode_bytes:>9.1f} {q.decode_bits_per_value:>8.3f} {q.chunk_bits_per_value:>8.3f} "
        f"{q.ratio_vs_fp32:>6.2f}x  {mark}"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_text_arguments(parser)
    parser.add_argument("--codecs", default="fp16,int8-block64,int8-block64+zstd")
    args = parser.parse_args(argv)
    preamble(["benchmarks/codec_quality.py", *argv])
    started = time.perf_counter()
    try:
        bundle, splits, tokens = open_text(args)
        names = [codecs.get_codec(n).name for n in args.codecs.split(",")]
    except (SplitLLMError, ValueError) as exc:
        print(f"error: {exc} ({EXPORT_HINT})", file=sys.stderr)
        return 2
    print(f"bundle: {bundle.model_id}, {bundle.num_layers} layers, hidden {bundle.shapes.hidden_size}; "
          f"{len(tokens)} tokens of pydoc topics, {len(tokens) - 1} scored positions, chunks of {args.chunk}")
    evaluator = Evaluator(bundle, tokens, chunk_tokens=args.chunk, threads=args.threads)
    print(f"{'split':>5} {'codec':<20} {'top1 agree':>10} {'ppl':>9} {'d ppl':>9} {'decode B':>9} "
          f"{'bpv dec':>8} {'bpv chk':>8} {'vs fp32':>7}  target")
    results: list[CodecQuality] = []
    for split in splits:
        ref = evaluator.reference(split)
        print(f"{split:>5} {'fp32 (reference)':<20} {100.0:>9.2f}% {ref.perplexity:>9.4f}")
        done: dict[str, CodecQuality] = {}
        for name in names:
            base = name.removesuffix("+zstd")
            if name != base:
                if base not in done:
                    done[base] = evaluator.evaluate(split, base)
                q = evaluator.evaluate_twin(done[base], name)
            else:
                q = done.get(name) or evaluator.evaluate(split, name)
            done[name] = q
            results.append(q)
            print(row(q), flush=True)
        evaluator.release(split)
    checks = [v for v in map(verdict, results) if v is not None]
    print("targets: fp16 top-1 >= 99.5%; int8-block64 |d ppl| <= 0.5% and top-1 >= 98%, at every split")
    print(f"overall: {'PASS' if all(checks) else 'FAIL'} ({sum(checks)}/{len(checks)} checks), "
          f"{time.perf_counter() - started:.0f} s")
    print(json.dumps({
        "benchmark": "codec_quality",
        "model": bundle.model_id,
        "tokens": len(tokens),
        "splits": splits,
        "targets": {k: {"min_top1": a, "max_abs_ppl_change_pct": p} for k, (a, p) in TARGETS.items()},
        "results": [{**q.to_dict(), "pass": verdict(q)} for q in results],
        "pass": all(checks),
        "elapsed_s": round(time.perf_counter() - started, 1),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
