"""Where a local int4 decode step's time goes: three A/B pairs, each interleaved in one process.

Run: ``python benchmarks/local_step.py [--bundle bundles/smollm2-variants] [--weights int4]
[--zp-weights int4-zp] [--rounds 10] [--tokens 64] [--threads 2]``

``device_speed.py`` runs each configuration in its own process one after the other, and this
VM's speed drifts between them; the pairs here alternate run by run in one process, so each
ratio compares like with like. Every run: the ~52-token chat prompt, then ``--tokens`` - 1
greedy steps, from an empty cache; tok/s include the prefill, best and median of ``--rounds``.

1. **zero points** (``--zp-weights``, a variant with MatMulNBits zero-point inputs): its whole
   model composed as one graph, run as is and with every zero-point input removed (the kernel
   then assumes the implicit 2**(bits-1): *wrong numbers*, the same work otherwise). The median
   decode step of each says what the zero points cost ORT's kernel.
2. **spinning between runs** (``--weights``): the whole model as one ``Segment``, driven by a bare
   loop (one thread: run, argmax, run), with ORT's pool parked as each run returns
   (``force_spinning_stop``, a split client's setting) and kept spinning
   (``RuntimeOptions.spin_between_runs``, a local client's).
3. **the client**: ``SplitClient(local=True)`` as it is (spinning kept) against the same client on
   a device whose pool is parked after each run. With pair 2 it shows what the client's own
   Python (event-loop to device-thread hop, sampling, detokenizing) adds to a step.

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from _baselines import PROMPT, REPO, machine_header, machine_info

from splitllm import Bundle, SplitClient
from splitllm.device import LocalDevice
from splitllm.errors import SplitLLMError
from splitllm.model.runtime import KVCache, RuntimeOptions, Segment


def _without_zero_points(graph: bytes) -> bytes:
    model = onnx.load_from_string(graph)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and len(node.input) > 3 and node.input[3]:
            inputs = list(node.input)
            inputs[3] = ""
            while inputs and not inputs[-1]:
                inputs.pop()
            del node.input[:]
            node.input.extend(inputs)
    return model.SerializeToString()


def _graph_steps(bundle: Bundle, graph: bytes, prompt: list[int], tokens: int, threads: int) -> Callable[[], float]:
    """A run of the composed ``graph`` (IO-bound cache buffers, as Segment binds them): returns
    its median decode step in ms."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.add_session_config_entry("session.force_spinning_stop", "1")  # idle while the other side runs
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(bundle.path))
    session = ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])
    shapes = bundle.shapes
    capacity = len(prompt) + tokens

    def run() -> float:
        io = session.io_binding()
        keep = []
        for layer in range(shapes.num_layers):
            for kind in ("key", "value"):
                value = ort.OrtValue.ortvalue_from_numpy(
                    np.zeros((1, shapes.num_kv_heads, capacity, shapes.head_dim), np.float32))
                keep.append(value)
                io.bind_ortvalue_input(f"past_{kind}.{layer}", value)
                io.bind_ortvalue_output(f"present_{kind}.{layer}", value)
        ids, past, steps = np.array([prompt], np.int64), 0, []
        for _ in range(tokens):
            feeds = {"input_ids": ids, "seqlens_k": np.array([past + ids.shape[1] - 1], np.int32),
                     "total_seq_len": np.array(past + ids.shape[1], np.int32)}
            for name, array in feeds.items():
                io.bind_cpu_input(name, array)
            io.bind_output("logits", "cpu")
            began = time.perf_counter()
            session.run_with_iobinding(io)
            steps.append(time.perf_counter() - began)
            past += ids.shape[1]
            ids = np.array([[int(io.get_outputs()[0].numpy().reshape(-1)[-shapes.vocab_size:].argmax())]], np.int64)
        return statistics.median(steps[1:]) * 1e3

    return run


def _bare_loop(segment: Segment, bundle: Bundle, prompt: list[int], tokens: int) -> Callable[[], float]:
    def run() -> float:
        cache = KVCache(bundle.shapes)
        began = time.perf_counter()
        logits = segment.run(np.array([prompt], np.int64), cache, 0)
        past = len(prompt)
        for _ in range(tokens - 1):
            token = int(logits.reshape(-1)[-bundle.shapes.vocab_size:].argmax())
            logits = segment.run(np.array([[token]], np.int64), cache, past)
            past += 1
        return tokens / (time.perf_counter() - began)

    return run


def _alternate(runs: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():  # warm-up
        run()
    for _ in range(rounds):
        for name, run in runs.items():
            out[name].append(run())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "bundles" / "smollm2-variants")
    parser.add_argument("--weights", default="int4", help="variant for pairs 2 and 3 (default %(default)s)")
    parser.add_argument("--zp-weights", default="int4-zp", help="a variant with zero points, pair 1 (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        bundle = Bundle.open(args.bundle, verify=False)
        for name in (args.weights, args.zp_weights):
            bundle.check_variant(name)
    except SplitLLMError as exc:
        print(f"local_step: {exc}\nexport with: splitllm-export --client-weights int4,int4-zp -o {args.bundle}",
              file=sys.stderr)
        return 2
    print(machine_header())
    prompt = bundle.text.encode_chat([{"role": "user", "content": PROMPT}])
    result: dict[str, object] = {"bundle": str(args.bundle), "weights": args.weights, "tokens": args.tokens,
                                 "rounds": args.rounds, "machine": machine_info()}

    graph = bundle.range_graph(0, bundle.num_units, last_logits_only=True, variant=args.zp_weights)
    steps = _alternate({"with zero points": _graph_steps(bundle, graph, prompt, args.tokens, args.threads),
                        "without (wrong numbers)": _graph_steps(bundle, _without_zero_points(graph), prompt,
                                                                args.tokens, args.threads)}, args.rounds)
    print(f"\n1. {args.zp_weights}, median decode step (ms), best / median of {args.rounds} runs")
    for name, values in steps.items():
        print(f"   {name:26} {min(values):6.2f} / {statistics.median(values):6.2f}")
    result["zero_points_ms"] = {name: round(min(v), 3) for name, v in steps.items()}

    parked = RuntimeOptions(intra_op_threads=args.threads)
    spinning = RuntimeOptions(intra_op_threads=args.threads, spin_between_runs=True)
    loops = _alternate({
        "pool parked after each run": _bare_loop(Segment(bundle, 0, bundle.num_units, options=parked,
                                                         variant=args.weights), bundle, prompt, args.tokens),
        "pool kept spinning": _bare_loop(Segment(bundle, 0, bundle.num_units, options=spinning,
                                                 variant=args.weights), bundle, prompt, args.tokens),
    }, args.rounds)

    loop = asyncio.new_event_loop()
    clients = {
        "client, pool parked": SplitClient(bundle, None, local=True, threads=args.threads, weights=args.weights,
                                           device=LocalDevice(bundle, parked, args.weights)),
        "client as it is (spinning)": SplitClient(bundle, None, local=True, threads=args.threads,
                                                  weights=args.weights),
    }
    for client in clients.values():
        loop.run_until_complete(client.connect())

    def generate(client: SplitClient) -> Callable[[], float]:
        async def once() -> float:
            await client.reset()
            began = time.perf_counter()
            async for _piece in client.generate_ids(prompt, max_new_tokens=args.tokens, ignore_eos=True):
                pass
            return args.tokens / (time.perf_counter() - began)
        return lambda: loop.run_until_complete(once())

    try:
        through = _alternate({name: generate(c) for name, c in clients.items()}, args.rounds)
    finally:
        for client in clients.values():
            loop.run_until_complete(client.close())
    print(f"\n2./3. {args.weights}, tok/s including the prefill, best / median of {args.rounds} runs")
    for name, values in {**{f"bare loop, {k}": v for k, v in loops.items()}, **through}.items():
        print(f"   {name:36} {max(values):6.1f} / {statistics.median(values):6.1f}")
    result["bare_loop_tok_s"] = {name: round(max(v), 1) for name, v in loops.items()}
    result["client_tok_s"] = {name: round(max(v), 1) for name, v in through.items()}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
