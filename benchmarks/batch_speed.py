"""The server engine alone, batched, against ONNX Runtime GenAI on the same weights.

Run: ``python benchmarks/batch_speed.py [--bundle bundles/smollm2] [--batches 1,8,32] [--weights fp32,int4]
[--tokens 64] [--threads 2] [--repeats 2] [--chunk-units 0]``

No network and no client: B synthetic sessions submit the whole model's range (units [0, L+2),
token ids in, a greedy token out) to one :class:`~splitllm_server.engine.Engine`, each after the
same 52-token chat prompt, then ``--tokens - 1`` decode steps all at once, so every decode step is
one batch of B rows. Tokens/s = B * tokens / wall time, prefill included, as ONNX Runtime GenAI's
figure below. With ``onnxruntime-genai`` installed (a benchmark-only dependency; its model is built
once from the same GGUF by ``_baselines.ort_genai_export``), the same prompt and token count at the
same batch sizes run through its static batching. Also prints the largest logit difference
between a batched and a batch-1 run (batched matrix products need not be bitwise equal) and
whether the greedy tokens agree. Last line JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

from splitllm import Bundle
from splitllm.model.runtime import RuntimeOptions
from splitllm.protocol import wire
from splitllm_server.costcurve import measure_curve
from splitllm_server.engine import Engine

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = REPO / "bundles" / "smollm2"


def _run_msg(ids: list[int], past: int, num_units: int, seq: int) -> wire.Run:
    return wire.Run(seq=seq, start=0, end=num_units, past_len=past, n_tokens=len(ids),
                    payload=np.asarray(ids, dtype="<i4").tobytes(), want="token", temperature=0.0, top_p=1.0,
                    top_k=0, seed=0, codec="fp32")


async def ours(engine: Engine, bundle: Bundle, prompt: list[int], batch: int, tokens: int) -> tuple[float, list[list[int]]]:
    """(tokens/s, every session's tokens) for ``batch`` sessions generating ``tokens`` greedily."""
    sessions = [await engine.open_session() for _ in range(batch)]
    try:
        began = time.perf_counter()
        replies = await asyncio.gather(*(engine.run(slot, kv, _run_msg(prompt, 0, bundle.num_units, 0))
                                         for slot, kv in sessions))
        out = [[r.token] for r, _ in replies]
        past = len(prompt)
        for step in range(tokens - 1):
            replies = await asyncio.gather(*(engine.run(slot, kv, _run_msg([seq[-1]], past, bundle.num_units, step))
                                             for (slot, kv), seq in zip(sessions, out, strict=True)))
            for seq, (r, _) in zip(out, replies, strict=True):
                seq.append(r.token)
            past += 1
        wall = time.perf_counter() - began
    finally:
        for slot, _ in sessions:
            engine.close_session(slot)
    return batch * tokens / wall, out


def genai(model_dir: Path, prompt: list[int], batch: int, tokens: int, threads: int) -> tuple[float, list[int]]:
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    config.clear_providers()
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + tokens, batch_size=batch, do_sample=False)
    began = time.perf_counter()
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([prompt] * batch, dtype=np.int32))
    for _ in range(tokens - 1):
        gen.generate_next_token()
    wall = time.perf_counter() - began
    first = list(gen.get_sequence(0))[len(prompt):]
    return batch * tokens / wall, first


def logit_gap(engine: Engine, bundle: Bundle, prompt: list[int], batch: int) -> float:
    """Largest |logit| difference of one decode step run alone and inside a batch of ``batch``."""
    from splitllm_server.kvpool import KVPool
    from splitllm_server.pieces import BatchRow, Piece

    piece = Piece(bundle, 0, bundle.num_units, True, engine.executor.options, engine.executor.variant)
    pool = KVPool(bundle.shapes, batch, len(prompt) + 8)
    slots = [pool.take() for _ in range(batch)]
    ids = np.asarray(prompt, dtype=np.int64)
    for slot in slots:
        piece.run_rows(pool, [BatchRow(slot, ids, 0)], slot, slot)
    step = np.asarray([prompt[-1]], dtype=np.int64)
    together = piece.run_rows(pool, [BatchRow(s, step, len(prompt)) for s in slots], slots[0], slots[-1])
    pool.lengths[:, :] = np.minimum(pool.lengths, len(prompt))
    alone = piece.run_rows(pool, [BatchRow(slots[0], step, len(prompt))], slots[0], slots[0])
    return float(np.abs(together[0] - alone[0]).max())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--weights", default="fp32,int4", help="server weights to time (variants the bundle has)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="best of this many runs per row")
    p.add_argument("--chunk-units", type=int, default=0, help="server pieces (0: the whole model in one)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    from _baselines import PROMPT, machine_header

    print(machine_header(argv), flush=True)
    bundle = Bundle.open(args.bundle)
    prompt = bundle.text.encode_chat([{"role": "user", "content": PROMPT}])
    print(f"prompt: {len(prompt)} tokens (one chat turn); {args.tokens} greedy tokens per sequence")
    batches = [int(b) for b in args.batches.split(",") if b]
    results: dict[str, dict[int, float]] = {}
    agree: dict[str, bool] = {}
    gaps: dict[str, float] = {}
    curves: dict[str, dict] = {}
    options = RuntimeOptions(intra_op_threads=args.threads, allow_spinning=True)
    for weights in [w for w in args.weights.split(",") if w]:
        if weights not in bundle.variants:
            print(f"skipping {weights}: the bundle has {bundle.variants} (export with --client-weights {weights})")
            continue
        engine = Engine(bundle, cache_size=2, options=options, variant=weights, chunk_units=args.chunk_units,
                        max_batch=max(batches), batch_window_ms=0, max_sessions=max(batches),
                        max_context=len(prompt) + args.tokens + 1)
        try:
            row: dict[int, float] = {}
            seqs: dict[int, list[list[int]]] = {}
            for batch in batches:
                best = 0.0
                for _ in range(args.repeats):
                    tok_s, out = asyncio.run(ours(engine, bundle, prompt, batch, args.tokens))
                    best = max(best, tok_s)
                    seqs[batch] = out
                row[batch] = best
                print(f"ours {weights:5s} B={batch:3d}: {best:7.1f} tok/s", flush=True)
            results[f"ours-{weights}"] = row
            agree[weights] = all(seq == seqs[batches[0]][0] for out in seqs.values() for seq in out)
            gaps[weights] = logit_gap(engine, bundle, prompt, max(batches))
            curve = asyncio.run(engine.call(lambda w=weights: measure_curve(bundle, w, args.threads, max(batches),
                                                                            options)))
            curves[weights] = curve.to_dict()
            print(f"decode step ms per unit kind ({weights}), batch sizes {list(curve.batches)}:")
            for kind in ("embed", "layer", "head"):
                values = getattr(curve, f"{kind}_ms")
                print(f"  {kind:5s} " + "  ".join(f"{v:7.3f}" for v in values)
                      + "   per row: " + "  ".join(f"{v / b:6.3f}" for v, b in zip(values, curve.batches, strict=True)))
        finally:
            engine.close()
    try:
        import onnxruntime_genai  # noqa: F401
        from _baselines import ort_genai_export
    except ImportError:
        print("onnxruntime-genai is not installed: no ONNX Runtime GenAI rows (pip install onnxruntime-genai)")
    else:
        for precision in [w for w in args.weights.split(",") if w in ("fp32", "int4")]:
            model_dir = ort_genai_export(precision)
            row = {}
            for batch in batches:
                row[batch] = max(genai(model_dir, prompt, batch, args.tokens, args.threads)[0]
                                 for _ in range(args.repeats))
                print(f"ORT GenAI {precision:5s} B={batch:3d}: {row[batch]:7.1f} tok/s", flush=True)
            results[f"genai-{precision}"] = row
    print(f"\n{'engine':14}" + "".join(f"{f'B={b}':>10}" for b in batches))
    for name, row in results.items():
        print(f"{name:14}" + "".join(f"{row.get(b, float('nan')):10.1f}" for b in batches))
    ratios = {}
    for weights in ("fp32", "int4"):
        if f"ours-{weights}" in results and f"genai-{weights}" in results:
            ratios[weights] = {b: round(results[f"ours-{weights}"][b] / results[f"genai-{weights}"][b], 3)
                               for b in batches}
            print(f"ours / ORT GenAI, {weights}: " + ", ".join(f"B={b}: {r:.2f}x" for b, r in ratios[weights].items()))
    for weights, gap in gaps.items():
        print(f"{weights}: largest |logit| difference batched vs alone {gap:.3g}; greedy tokens equal across "
              f"batch sizes: {agree[weights]}")
    print(json.dumps({"tok_s": results, "ratio_vs_genai": ratios, "max_logit_diff": gaps, "batch_curve": curves,
                      "tokens_identical_across_batches": agree, "tokens": args.tokens, "threads": args.threads}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
