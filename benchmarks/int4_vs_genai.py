"""Local int4 decode vs ONNX Runtime GenAI int4, interleaved in one process (robust on a busy machine).

Run: ``python benchmarks/int4_vs_genai.py [--bundle bundles/smollm2-variants] [--weights int4,int4-q41]
[--tokens 64] [--rounds 8] [--threads 2]``

``device_speed.py`` runs each configuration in its own process, one after the other, so on a
machine shared with other jobs the load can change between two rows. Here every configuration
is loaded once into this process and the runs alternate (ours per weights, with and without
ORT's spinning threads, then GenAI's), ``--rounds`` times; each keeps its fastest run (noise
only slows a run down). Same prompt and count as device_speed: ``--tokens`` greedy tokens after
the ~52-token chat prompt, EOS ignored, tok/s including the prefill. ONNX Runtime GenAI's model
is its builder's int4 build of the same GGUF (``_baselines.ort_genai_export``); its threads spin
(ORT's default; GenAI 0.18 has no setting to turn that off), so ``spin`` rows are like for like.
Needs ``pip install onnxruntime-genai==0.18.0 onnx-ir``. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from _baselines import PROMPT, REPO, machine_header, machine_info, ort_genai_export

from splitllm import Bundle, SplitClient


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "bundles" / "smollm2-variants")
    parser.add_argument("--weights", default="int4,int4-q41", help="our variants to run (default %(default)s)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import onnxruntime_genai as og

    print(machine_header(), flush=True)
    prompt = Bundle.open(args.bundle, verify=False).text.encode_chat([{"role": "user", "content": PROMPT}])
    loop = asyncio.new_event_loop()
    clients: dict[str, SplitClient] = {}
    for weights in [w for w in args.weights.split(",") if w]:
        for spin in (True, False):
            client = SplitClient(args.bundle, None, local=True, threads=args.threads, weights=weights,
                                 allow_spinning=spin)
            loop.run_until_complete(client.connect())
            clients[f"local {weights} {'spin' if spin else 'no-spin'}"] = client
    config = og.Config(str(ort_genai_export("int4", log=lambda s: print(s, flush=True))))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": args.threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)

    async def ours(client: SplitClient) -> float:
        await client.reset()  # every run from an empty cache
        started = time.perf_counter()
        async for _piece in client.generate_ids(prompt, max_new_tokens=args.tokens, ignore_eos=True):
            pass
        return time.perf_counter() - started

    def genai() -> float:
        params = og.GeneratorParams(model)
        length = len(prompt) + args.tokens
        params.set_search_options(do_sample=False, max_length=length, min_length=length, batch_size=1)
        started = time.perf_counter()
        generator = og.Generator(model, params)
        generator.append_tokens([prompt])
        for _ in range(args.tokens):
            generator.generate_next_token()
        return time.perf_counter() - started

    runs: dict[str, list[float]] = {name: [] for name in [*clients, "ort-genai int4 spin"]}
    for client in clients.values():  # warm-up
        loop.run_until_complete(ours(client))
    genai()
    for _ in range(args.rounds):
        for name, client in clients.items():
            runs[name].append(loop.run_until_complete(ours(client)))
        runs["ort-genai int4 spin"].append(genai())
    for client in clients.values():
        loop.run_until_complete(client.close())
    best = {name: args.tokens / min(times) for name, times in runs.items()}
    reference = best["ort-genai int4 spin"]
    print(f"\n{'system':<24} {'tok/s':>7} {'x GenAI':>8}   (best of {args.rounds} interleaved runs)")
    for name, rate in best.items():
        print(f"{name:<24} {rate:>7.1f} {rate / reference:>8.3f}")
    summary: dict[str, Any] = {"benchmark": "int4_vs_genai", "tokens": args.tokens, "rounds": args.rounds,
                               "tok_s": {k: round(v, 2) for k, v in best.items()},
                               "ratio_vs_genai_int4": {k: round(v / reference, 3) for k, v in best.items()},
                               "machine": machine_info()}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
