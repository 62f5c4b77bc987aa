"""The `splitllm` command: inspect bundles, generate and chat through a split."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence

from splitllm.errors import ConfigError, SplitLLMError
from splitllm.model.bundle import Bundle


def _size(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f} GiB"


def bundle_summary(bundle: Bundle) -> str:
    """A few human-readable lines about a bundle."""
    m = bundle.manifest
    s = bundle.shapes
    files = m.get("files", {})
    total = sum(f.get("size_bytes", 0) for f in files.values())
    validation = m.get("validation", {})
    if validation.get("skipped", True):
        checked = "not validated (--skip-validate)"
    else:
        splits = validation.get("splits", [])
        ok = sum(1 for r in splits if r.get("tokens_match"))
        checked = (
            f"{ok}/{len(splits)} splits match {validation.get('reference')} "
            f"(max |logit diff| {validation.get('max_abs_diff', float('nan')):.2e})"
        )
    lines = [
        f"bundle     {bundle.path}",
        f"model      {bundle.model_id} ({m.get('model', {}).get('family')}, {s.num_layers} layers, "
        f"hidden {s.hidden_size}, {s.num_heads} heads / {s.num_kv_heads} KV heads, vocab {s.vocab_size})",
        f"splits     0..{s.num_layers} (any contiguous range of units composes)",
        f"size       {_size(total)} in {len(files)} files",
        f"validation {checked}",
        f"bundle id  {bundle.bundle_id[:16]}",
    ]
    return "\n".join(lines)


def _cmd_info(args: argparse.Namespace) -> int:
    bundle = Bundle.open(args.bundle, verify=not args.no_verify)
    print(bundle_summary(bundle))
    return 0


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="bundle directory (the same one the server loaded)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", help="server URL, e.g. http://127.0.0.1:8765")
    where.add_argument("--local", action="store_true", help="run every layer here; no server")
    p.add_argument("--split", type=int, default=None, help="layers run here (default: a third of them)")
    p.add_argument("--codec", default="int8-block64", help="activation codec (default int8-block64)")
    p.add_argument("--token", default=None, help="bearer token of the server (default: env SPLITLLM_TOKEN)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads here (0 = all cores)")
    p.add_argument("--speculate", default="auto",
                   help="draft tokens here and verify several per round trip: auto (where it pays, default), "
                        "off, or a number of drafts (greedy decoding only)")
    p.add_argument("--drafter", default="auto", choices=("auto", "model", "ngram"),
                   help="who drafts: the whole model here, prompt lookup, or auto (a long n-gram match, else "
                        "the model; default)")


def _make_client(args: argparse.Namespace):  # noqa: ANN202
    from splitllm.client import SplitClient

    token = args.token or os.environ.get("SPLITLLM_TOKEN") or None
    speculate = args.speculate if args.speculate in ("auto", "off") else _int_arg("--speculate", args.speculate)
    return SplitClient(args.bundle, None if args.local else args.server, token=token, split=args.split,
                       codec=args.codec, local=args.local, threads=args.threads, speculate=speculate,
                       drafter=args.drafter)


def _int_arg(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError as exc:
        raise ConfigError(f"{name} must be auto, off or a number, got {value!r}") from exc


def _sampling(args: argparse.Namespace) -> dict[str, object]:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "seed": args.seed}


async def _generate(args: argparse.Namespace) -> int:
    from splitllm.cli.chat_ui import speed_summary

    async with _make_client(args) as client:
        pieces = []
        stream = (client.generate_ids(client.text.encode_plain(args.prompt), **_sampling(args)) if args.raw
                  else client.generate(args.prompt, **_sampling(args)))
        async for piece in stream:
            pieces.append(piece.text)
            if not args.json:
                print(piece.text, end="", flush=True)
        stats = client.last_stats
        if args.json:
            print(json.dumps({
                "text": "".join(pieces), "new_ids": stats.new_ids, "split": stats.split,
                "codec": stats.codec, "prompt_tokens": stats.prompt_tokens, "new_tokens": stats.new_tokens,
                "ttft_ms": round(stats.ttft_ms, 1), "decode_tokens_per_s": round(stats.decode_tokens_per_s, 2),
                "draft_load_s": round(stats.draft_load_s, 3),
                "tokens_per_s": round(stats.tokens_per_s, 2), "first_token_s": round(stats.first_token_s, 4),
                "stop_reason": stats.stop_reason, "steps": stats.steps, "drafted": stats.drafted,
                "accepted": stats.accepted,
            }))
        else:
            where = "local" if client.local else f"split {stats.split}"
            spec = (f", {stats.tokens_per_step:.1f} tokens per round trip, {stats.acceptance:.0%} of drafts kept"
                    if stats.drafted else "")
            print(f"\n[{speed_summary(stats)}, {where}, {stats.codec}{spec}]", file=sys.stderr)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    return asyncio.run(_generate(args))


def _cmd_chat(args: argparse.Namespace) -> int:
    from splitllm.cli.chat_ui import run_chat

    return asyncio.run(run_chat(_make_client(args), _sampling(args), once=args.once))


def _cmd_profile(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from splitllm.planner.profile import load_or_measure

    bundle = Bundle.open(args.bundle, verify=False)
    with tqdm(total=bundle.num_units, desc="profile units", unit="unit", disable=args.json) as bar:
        profile = load_or_measure(bundle, threads=args.threads, refresh=args.refresh, repeats=args.repeats,
                                  prefill_tokens=args.prefill_tokens, progress=lambda _u: bar.update(1))
    if args.json:
        print(json.dumps(profile.to_dict()))
    else:
        names = bundle.manifest.get("units") or [str(u) for u in range(bundle.num_units)]
        print(f"{'unit':<10} {'prefill ms':>11} {'decode ms':>10}   (prefill of {profile.prefill_tokens} tokens, "
              f"decode after {profile.context})")
        for name, pre, dec in zip(names, profile.prefill_ms, profile.decode_ms, strict=True):
            print(f"{name:<10} {pre:>11.3f} {dec:>10.3f}")
        print(f"{'total':<10} {sum(profile.prefill_ms):>11.3f} {sum(profile.decode_ms):>10.3f}")
    return 0


def _cmd_gateway_moved(args: argparse.Namespace) -> int:
    print("splitllm serve-openai: the OpenAI gateway is a server-side process now: run `splitllm-gateway` "
          "(same options; install it with `pip install 'splitllm[server]'`)", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    from splitllm import __version__

    parser = argparse.ArgumentParser(prog="splitllm", description="SplitLLM client: split LLM inference.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="warning",
                        help="least severe log records printed to stderr (default: warning)")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="show a bundle's summary (verifies its hashes)")
    info.add_argument("--bundle", required=True)
    info.add_argument("--no-verify", action="store_true", help="skip hashing the files")
    info.set_defaults(func=_cmd_info)
    gen = sub.add_parser("generate", help="answer one prompt (one user message through the chat template)")
    _client_args(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    gen.add_argument("--raw", action="store_true",
                     help="the prompt as plain text, no chat template (BOS added where the tokenizer adds it)")
    gen.add_argument("prompt")
    gen.set_defaults(func=_cmd_generate)
    chat = sub.add_parser("chat", help="an interactive chat through the split")
    _client_args(chat)
    chat.add_argument("--once", action="append", default=None, metavar="PROMPT",
                      help="answer this message (repeat for more turns) and exit")
    chat.set_defaults(func=_cmd_chat)
    prof = sub.add_parser("profile", help="time every unit on this device (cached) for the planner")
    prof.add_argument("--bundle", required=True)
    prof.add_argument("--threads", type=int, default=0)
    prof.add_argument("--repeats", type=int, default=5)
    prof.add_argument("--prefill-tokens", type=int, default=64)
    prof.add_argument("--refresh", action="store_true", help="measure again even if a cached profile exists")
    prof.add_argument("--json", action="store_true")
    prof.set_defaults(func=_cmd_profile)
    moved = sub.add_parser("serve-openai", help="moved: the OpenAI gateway is now `splitllm-gateway`")
    moved.set_defaults(func=_cmd_gateway_moved)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # serve-openai's old options are only reported, not parsed
    if extra and args.command != "serve-openai":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except SplitLLMError as exc:
        print(f"splitllm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
