"""Issue acceptance for the activation codecs: fp16 and int8-block64 on three real texts, five splits.

Run: ``python benchmarks/codec_quality.py [--bundle bundles/smollm2] [--tokens 1024]
[--texts pydoc,code,license] [--text-file PATH] [--splits 1,5,10,20,29]
[--codecs fp16,int8-block64,int8-block64+zstd]``

Teacher-forced (see ``_quality.py``): the first ``--tokens`` tokens of each text (``_texts.py``:
Python's documentation, a Python source file, Python's licence; any UTF-8 file with
``--text-file``) run through the split model in chunks of 256 with KV caches; each chunk's
hidden states go through the codec as a client sends them; per position the next-token
distribution is compared with the fp32 run's: KL divergence (mean and 99th percentile), top-1
agreement, perplexity change. Targets, checked at every split of every text:

- fp16: mean KL <= 1e-5 nats (indistinguishable from fp32);
- int8-block64: mean KL <= 2e-3 nats and perplexity change within +-0.5%.

Top-1 agreement is printed but not a target: it flips on near-ties (on 1,000 positions one
flip is 0.1 point) while the distribution barely moves. "+zstd" codecs decode to exactly their
base codec's tensors (checked on every chunk), so only their bytes are measured. ``decode B``
is one (1, 1, H) payload, header included. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from _quality import EXPORT_HINT, CodecQuality, Evaluator, add_text_arguments, open_texts, preamble

from splitllm import codec as codecs
from splitllm.errors import SplitLLMError

TARGETS = {  # codec -> (maximum mean KL in nats, maximum |ppl change| in %)
    "fp16": (1e-5, None),
    "int8-block64": (2e-3, 0.5),
}


def verdict(q: CodecQuality) -> bool | None:
    """True/False against the codec's target, None when it has none."""
    if q.codec not in TARGETS:
        return None
    max_kld, max_ppl = TARGETS[q.codec]
    return q.kld_mean <= max_kld and (max_ppl is None or abs(q.ppl_change_pct) <= max_ppl)


def row(q: CodecQuality) -> str:
    ok = verdict(q)
    mark = "-" if ok is None else ("PASS" if ok else "FAIL")
    return (
        f"{q.text:<8} {q.split:>5} {q.codec:<20} {q.kld_mean:>10.2e} {q.kld_p99:>9.2e} {100 * q.agreement:>8.2f}% "
        f"{q.ppl_change_pct:>+8.3f}% {q.decode_bytes:>9.1f} {q.chunk_bits_per_value:>8.3f} "
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
        bundle, splits, texts = open_texts(args)
        names = [codecs.get_codec(n).name for n in args.codecs.split(",")]
    except (SplitLLMError, ValueError) as exc:
        print(f"error: {exc} ({EXPORT_HINT})", file=sys.stderr)
        return 2
    print(f"bundle: {bundle.model_id}, {bundle.num_layers} layers, hidden {bundle.shapes.hidden_size}; "
          f"{args.tokens} tokens per text ({len(texts)} texts: "
          f"{', '.join(f'{t.name} = {t.source}' for t, _ in texts)}), chunks of {args.chunk}")
    print(f"{'text':<8} {'split':>5} {'codec':<20} {'KL mean':>10} {'KL p99':>9} {'top1':>9} {'d ppl':>9} "
          f"{'decode B':>9} {'bpv chk':>8} {'vs fp32':>7}  target")
    results: list[CodecQuality] = []
    for text, tokens in texts:
        evaluator = Evaluator(bundle, tokens, chunk_tokens=args.chunk, threads=args.threads, text=text.name)
        for split in splits:
            ref = evaluator.reference(split)
            print(f"{text.name:<8} {split:>5} {'fp32 (reference)':<20} {'ppl':>10} {ref.perplexity:>9.4f}")
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
    print("targets: fp16 mean KL <= 1e-5; int8-block64 mean KL <= 2e-3 and |d ppl| <= 0.5%, at every split and text")
    print(f"overall: {'PASS' if all(checks) else 'FAIL'} ({sum(checks)}/{len(checks)} checks), "
          f"{time.perf_counter() - started:.0f} s")
    print(json.dumps({
        "benchmark": "codec_quality",
        "model": bundle.model_id,
        "tokens": args.tokens,
        "texts": {t.name: t.source for t, _ in texts},
        "splits": splits,
        "targets": {k: {"max_kld_mean": a, "max_abs_ppl_change_pct": p} for k, (a, p) in TARGETS.items()},
        "results": [{**q.to_dict(), "pass": verdict(q)} for q in results],
        "pass": all(checks),
        "elapsed_s": round(time.perf_counter() - started, 1),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
