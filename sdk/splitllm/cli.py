"""The `splitllm` command: inspect bundles, generate and chat through a split."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from splitllm.bundle import Bundle
from splitllm.errors import SplitLLMError


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitllm", description="SplitLLM client: split LLM inference.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="show a bundle's summary (verifies its hashes)")
    info.add_argument("--bundle", required=True)
    info.add_argument("--no-verify", action="store_true", help="skip hashing the files")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SplitLLMError as exc:
        print(f"splitllm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
