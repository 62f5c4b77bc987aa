"""Quality of the device weight variants against fp32: KL divergence, top-1 agreement, perplexity.

Run: ``python benchmarks/weights_quality.py [--bundle bundles/smollm2-variants] [--tokens 1024]
[--texts pydoc,code,license] [--text-file PATH] [--chunk 256] [--threads 2] [--genai int4]``

The bundle needs variants; make it with
``splitllm-export -q --client-weights fp16,int8,int4 -o bundles/smollm2-variants`` (its fp32 part
is byte-for-byte the plain export).

Teacher-forced on each text (``_texts.py``): the first ``--tokens`` ids run through the whole
model (all units local) in chunks of ``--chunk`` positions with a KV cache, as a client's
prefill runs, logits at every position. Per position the variant's next-token distribution is
compared with the fp32 blocks' (the exact transformers model): KL divergence (mean and 99th
percentile), top-1 agreement, and the log-probability of the true next token for perplexity.
``bytes`` are the variant's own files (graphs + weights file); ``ratio_vs_fp32`` is fp32's
weights.bin over them.

``--genai int4[,fp32]`` (default ``int4`` when ``onnxruntime-genai`` is installed, ``none`` to
skip) adds ONNX Runtime GenAI's own model of the same GGUF, built by its model builder
(``_baselines.ort_genai_export``), scored the same way through its generator API: the quality
bar our int4 variants must meet. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from _baselines import REPO, dir_size_bytes, machine_header, machine_info, ort_genai_export
from _quality import Scores, kl_stats, score_logits
from _texts import add_texts_arguments, chosen_texts, text_tokens

from splitllm import Bundle
from splitllm.errors import SplitLLMError
from splitllm.model.runtime import KVCache, RuntimeOptions, Segment

DEFAULT_BUNDLE = REPO / "bundles" / "smollm2-variants"
# tokens (N,) -> per chunk of positions [a, b): the (b - a, V) logits
Runner = Callable[[np.ndarray], Iterator[tuple[int, int, np.ndarray]]]


def _chunks(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk, n)) for a in range(0, n, chunk)]


def bundle_runner(bundle: Bundle, variant: str, chunk: int, options: RuntimeOptions) -> Runner:
    """Our whole model in ``variant``, chunk by chunk with a KV cache."""
    segment = Segment(bundle, 0, bundle.num_units, last_logits_only=False, options=options, variant=variant)

    def run(tokens: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
        cache = KVCache(bundle.shapes)
        for a, b in _chunks(len(tokens), chunk):
            yield a, b, segment.run(tokens[None, a:b], cache, a)[0]

    return run


def genai_runner(model_dir: Path, chunk: int, threads: int) -> Runner:
    """ONNX Runtime GenAI's model, fed chunk by chunk with ``append_tokens``; logits of every position."""
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)

    def run(tokens: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(tokens) + 1, batch_size=1)
        generator = og.Generator(model, params)
        for a, b in _chunks(len(tokens), chunk):
            generator.append_tokens(tokens[None, a:b].astype(np.int32))
            logits = np.asarray(generator.get_output("logits"), dtype=np.float32)
            yield a, b, logits.reshape(-1, logits.shape[-1])[-(b - a):]

    return run


def score(runner: Runner, tokens: np.ndarray, ref: np.ndarray | None) -> tuple[Scores, np.ndarray | None]:
    """Scores of every position with a next token; with ``ref`` None also the (N-1, V) log-probs."""
    parts = []
    for a, b, logits in runner(tokens):
        scored = min(b, len(tokens) - 1) - a
        parts.append(score_logits(logits[:scored], tokens[a + 1:a + 1 + scored],
                                  None if ref is None else ref[a:a + scored]))
    scores = Scores(*(np.concatenate([p[i] for p in parts]) for i in range(3)))
    return scores, (np.concatenate([p[3] for p in parts]) if ref is None else None)


def row(text: str, weights: str, scores: Scores, reference: Scores, size_bytes: int, fp32_bytes: int) -> dict:
    ppl_ref = math.exp(-float(reference.logprob.mean()))
    ppl = math.exp(-float(scores.logprob.mean()))
    kld_mean, kld_p99 = kl_stats(scores.kld)
    return {"text": text, "weights": weights, "positions": len(scores.argmax),
            "kld_mean": float(f"{kld_mean:.4g}"), "kld_p99": float(f"{kld_p99:.4g}"),
            "top1_agreement": round(float((scores.argmax == reference.argmax).mean()), 5),
            "ppl": round(ppl, 4), "ppl_change_pct": round((ppl / ppl_ref - 1) * 100, 3),
            "bytes": size_bytes, "ratio_vs_fp32": round(fp32_bytes / size_bytes, 3) if size_bytes else 1.0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="bundle with variants (default %(default)s)")
    add_texts_arguments(parser)
    parser.add_argument("--chunk", type=int, default=256, help="tokens per prefill chunk (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default %(default)s)")
    parser.add_argument("--weights", default="", help="variants to score (default: all in the bundle)")
    has_genai = importlib.util.find_spec("onnxruntime_genai") is not None
    parser.add_argument("--genai", default="int4" if has_genai else "none",
                        help="ONNX Runtime GenAI precisions to score too, or 'none' (default %(default)s)")
    args = parser.parse_args(argv)
    if not (args.bundle / "manifest.json").is_file():
        parser.error(f"no bundle at {args.bundle}; make it with: "
                     f"splitllm-export -q --client-weights fp16,int8,int4 -o {args.bundle}")
    if args.tokens < 2 or args.chunk < 1 or args.threads < 1:
        parser.error("--tokens must be >= 2, --chunk and --threads >= 1")
    args.genai = [] if args.genai in ("", "none") else args.genai.split(",")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(machine_header(), flush=True)
    started = time.perf_counter()
    try:
        bundle = Bundle.open(args.bundle, verify=False)
        texts = [(t, text_tokens(bundle, t, args.tokens)) for t in chosen_texts(args)]
    except SplitLLMError as exc:
        raise SystemExit(f"error: {exc}") from exc
    names = [w.strip() for w in args.weights.split(",") if w.strip()] or bundle.variants
    names = ["fp32", *[n for n in names if n != "fp32"]]
    options = RuntimeOptions(intra_op_threads=args.threads, allow_spinning=False)
    fp32_bytes = bundle.manifest["files"]["weights.bin"]["size_bytes"]
    runners: dict[str, tuple[Runner, int]] = {}
    for name in names:
        entry = bundle.manifest.get("variants", {}).get(name, {})
        runners[name] = (bundle_runner(bundle, name, args.chunk, options), int(entry.get("size_bytes", fp32_bytes)))
    for precision in args.genai:
        model_dir = ort_genai_export(precision, log=lambda s: print(s, flush=True))
        runners[f"ort-genai {precision}"] = (genai_runner(model_dir, args.chunk, args.threads), dir_size_bytes(model_dir)[0])
    print(f"bundle {args.bundle} ({bundle.model_id}); {args.tokens} tokens per text, chunks of {args.chunk}; "
          f"texts: {', '.join(f'{t.name} = {t.source}' for t, _ in texts)}", flush=True)
    print(f"{'text':<8} {'weights':<16} {'KL mean':>9} {'KL p99':>9} {'top1':>8} {'ppl':>8} {'d ppl':>8} "
          f"{'bytes':>12} {'vs fp32':>7}", flush=True)
    results = []
    for text, tokens in texts:
        reference, ref_lp = score(runners["fp32"][0], tokens, None)
        for name, (runner, size) in runners.items():
            scores = reference if name == "fp32" else score(runner, tokens, ref_lp)[0]
            r = row(text.name, name, scores, reference, size, fp32_bytes)
            results.append(r)
            print(f"{r['text']:<8} {name:<16} {r['kld_mean']:>9.2e} {r['kld_p99']:>9.2e} "
                  f"{100 * r['top1_agreement']:>7.2f}% {r['ppl']:>8.3f} {r['ppl_change_pct']:>+7.3f}% "
                  f"{r['bytes']:>12,} {r['ratio_vs_fp32']:>6.2f}x", flush=True)
        del ref_lp
    print("\nmean over texts:")
    summary = {}
    for name in runners:
        rows = [r for r in results if r["weights"] == name]
        summary[name] = {"kld_mean": float(f"{np.mean([r['kld_mean'] for r in rows]):.4g}"),
                         "max_kld_mean": max(r["kld_mean"] for r in rows),
                         "top1_agreement": round(float(np.mean([r["top1_agreement"] for r in rows])), 5)}
        scheme = bundle.manifest.get("variants", {}).get(name, {}).get("scheme", "")
        print(f"  {name:<16} KL {summary[name]['kld_mean']:.2e} (worst text {summary[name]['max_kld_mean']:.2e}), "
              f"top1 {100 * summary[name]['top1_agreement']:.2f}%  {scheme}")
    print(json.dumps({"benchmark": "weights_quality", "bundle": str(args.bundle), "model": bundle.model_id,
                      "tokens": args.tokens, "chunk": args.chunk,
                      "texts": {t.name: t.source for t, _ in texts}, "fp32_weights_bytes": fp32_bytes,
                      "results": results, "summary": summary, "machine": machine_info(),
                      "elapsed_s": round(time.perf_counter() - started, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
