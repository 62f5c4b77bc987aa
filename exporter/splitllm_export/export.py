"""Write a bundle: blocks, shared weights, tokenizer, validation, then the manifest, atomically.

Everything is written into a hidden sibling directory; the manifest goes in last and the
directory is renamed into place only after validation passed. An interrupted export therefore
never leaves a directory that opens as a bundle.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from splitllm.errors import ConfigError, ExportError, NotEnoughDiskSpace, SplitLLMError
from splitllm.model.bundle import FORMAT, FORMAT_VERSION, MANIFEST, Bundle, file_sha256
from splitllm_export.graphs.arch import ArchSpec, Shapes
from splitllm_export.graphs.blocks import OPSET, BlockInfo, export_blocks
from splitllm_export.graphs.registry import spec_for
from splitllm_export.sources import Source
from splitllm_export.validate.splits import reference_run, validate_splits

if TYPE_CHECKING:
    from splitllm_export.variants.quantize import Scheme

VALIDATION_PROMPT = "What is the capital of France? Answer in one short sentence."
VALIDATION_STEPS = 4
QUALITY_TOKENS = 512  # pydoc text tokens each device variant is scored on at export (one window)
REFERENCE_CONTEXT = 512  # context length at which attention FLOPs in the cost table are counted


def cost_table(spec: ArchSpec, shapes: Shapes, blocks: Sequence[BlockInfo]) -> dict[str, Any]:
    """Per-unit costs (embed, layer.0..layer.{L-1}, head) for the planner.

    FLOPs count multiply-adds as 2. Attention FLOPs are counted at ``reference_context``
    cached positions for a decode step and at half of it (causal average) per prefill token.
    """
    h, v = shapes.hidden_size, shapes.vocab_size
    params = {b.name: b.params for b in blocks}
    attn_decode = 2 * 2 * shapes.num_heads * shapes.head_dim * REFERENCE_CONTEXT
    units: list[dict[str, Any]] = [{
        "name": "embed", "kind": "embed", "params": params["embed"],
        "flops_per_token_prefill": h, "flops_per_token_decode": h,
        "out_bytes_per_token": 4 * h, "kv_bytes_per_token": 0,
    }]
    for i in range(shapes.num_layers):
        p = params[f"layer.{i}"]
        units.append({
            "name": f"layer.{i}", "kind": "decoder", "params": p,
            "flops_per_token_prefill": 2 * p + attn_decode // 2,
            "flops_per_token_decode": 2 * p + attn_decode,
            "out_bytes_per_token": 4 * h,
            "kv_bytes_per_token": shapes.kv_bytes_per_position,
        })
    units.append({
        "name": "head", "kind": "head", "params": params["head"],
        "flops_per_token_prefill": 2 * h * v, "flops_per_token_decode": 2 * h * v,
        "out_bytes_per_token": 4 * v, "kv_bytes_per_token": 0,
    })
    return {"reference_context": REFERENCE_CONTEXT, "input_bytes_per_token": 4, "units": units}


def _prepare_output(out_dir: Path, force: bool) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ExportError(f"output {out_dir} exists and is not a directory")
        if any(out_dir.iterdir()) and not force:
            raise ExportError(f"output directory {out_dir} is not empty (use --force to replace it)")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create {out_dir.parent}: {exc}") from exc


def estimate_bundle_bytes(model: Any, schemes: Sequence[Scheme] = ()) -> int:
    """An upper estimate of a bundle's size on disk: float32 weights, each tensor once (a tied
    table is stored once), plus each weight variant at its widest width and its block scales,
    plus 5% and 128 MiB for the rotary tables, the tokenizer and the graphs. (Measured against
    real bundles: SmolLM2 544 MB, Gemma 3 270M 1,155 MB, Qwen2.5-Coder-0.5B 2,541 MB on disk,
    ``du -sb``; this gives 699, 1,260 and 2,781.)"""
    seen: set[int] = set()
    fp32 = 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            fp32 += p.numel() * 4
    per_variant = sum(max(s.layer_bits or 16, s.table_bits or 16) + 2 for s in schemes) / 32  # None: 16-bit
    return int(fp32 * (1 + per_variant) * 1.05) + (128 << 20)


def _check_space(out_dir: Path, need: int) -> None:
    """NotEnoughDiskSpace before any work when the output's filesystem cannot take ``need`` bytes."""
    free = shutil.disk_usage(out_dir.parent).free
    if free < need:
        raise NotEnoughDiskSpace(
            f"the bundle needs about {need / 1e9:.1f} GB at {out_dir.parent} and only {free / 1e9:.1f} GB is free; "
            "free some space or export elsewhere")


def _install(tmp: Path, out_dir: Path) -> None:
    """Move the finished bundle into place; an old one (with --force) is removed only afterwards."""
    trash = None
    if out_dir.exists():
        trash = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out_dir, trash)
    os.rename(tmp, out_dir)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def export_bundle(
    source: Source,
    out_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    validate: bool = True,
    splits: Sequence[int] | None = None,
    show_progress: bool = True,
    client_weights: Sequence[str] = (),
    block_size: int = 32,
    fused_layers: bool = True,
) -> Path:
    """Export ``source`` as a bundle at ``out_dir`` and return its path.

    ``splits`` limits validation to some splits (all of 0..L by default). ``client_weights``
    adds device weight variants ("fp16", "int8", "int4"; see splitllm_export.variants.quantize) next to
    the fp32 blocks, which stay byte-for-byte what they are without them; with validation on,
    each variant's teacher-forced quality against fp32 goes into its manifest entry.
    ``fused_layers`` builds the decoder layers of families with a fused form (registry entry) from the weights with ONNX Runtime's
    fused kernels (splitllm_export.graphs.fused) instead of exporting them from PyTorch.
    Raises ExportError (or a subclass) and leaves nothing at ``out_dir`` on failure.
    """
    from splitllm.model.text import TextCodec
    from splitllm_export.variants.quantize import scheme_for

    schemes = [scheme_for(name, block_size) for name in dict.fromkeys(client_weights) if name != "fp32"]

    out_dir = Path(out_dir)
    model = source.model
    spec = spec_for(model.config)
    shapes = spec.shapes(model.config)
    all_splits = list(range(shapes.num_layers + 1))
    chosen = all_splits if splits is None else sorted(set(splits))
    bad = [k for k in chosen if k not in all_splits]
    if bad:
        raise ConfigError(f"splits {bad} are outside 0..{shapes.num_layers}")
    _prepare_output(out_dir, force)
    _check_space(out_dir, estimate_bundle_bytes(model, schemes))
    tmp = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    try:
        tmp.mkdir()
        n_blocks = shapes.num_layers + 3
        with tqdm(total=n_blocks, desc="export blocks", unit="block", disable=not show_progress) as bar:
            def on_block(name: str) -> None:
                bar.set_postfix_str(name)
                bar.update(1)

            blocks = export_blocks(model, spec, shapes, tmp, progress=on_block, fused_layers=fused_layers)
        variants = _write_variants(tmp, blocks, schemes, model, spec, shapes)
        tokenizer_meta = TextCodec.save_from_transformers(source.tokenizer, tmp, _model_stop_tokens(source))
        import torch
        import transformers

        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": {"id": source.description.get("id", "unknown"), "family": spec.family,
                      "model_type": model.config.model_type, "source": source.description},
            "shapes": {k: getattr(shapes, k) for k in shapes.__dataclass_fields__},
            "dtype": "float32",
            "units": ["embed"] + [f"layer.{i}" for i in range(shapes.num_layers)] + ["head"],
            "blocks": {b.name: {"file": b.file, "inputs": b.inputs, "outputs": b.outputs, "params": b.params}
                       for b in blocks},
            "segments": _segment_list(shapes.num_layers),
            "cost": cost_table(spec, shapes, blocks),
            "tokenizer": tokenizer_meta,
            "export": {"opset": OPSET, "torch": torch.__version__, "transformers": transformers.__version__,
                       "created_unix": int(time.time()),
                       "layer_graphs": "fused" if "seqlens_k" in blocks[1].inputs else "exported"},
        }
        if variants:
            manifest["variants"] = variants
        manifest["files"] = {
            p.name: {"sha256": file_sha256(p), "size_bytes": p.stat().st_size}
            for p in sorted(tmp.iterdir()) if p.is_file()
        }
        validation: dict[str, Any] = {"skipped": not validate}
        if validate:
            (tmp / MANIFEST).write_text(json.dumps(manifest))
            bundle = Bundle.open(tmp, verify=False)
            messages = [{"role": "user", "content": VALIDATION_PROMPT}]
            if getattr(source.tokenizer, "chat_template", None):
                prompt = source.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                prompt_ids = bundle.text.encode(prompt)
            else:  # a base model: the prompt as plain text, tokenised as transformers does
                prompt_ids = list(source.tokenizer(VALIDATION_PROMPT)["input_ids"])
            ref = reference_run(model, prompt_ids, VALIDATION_STEPS)
            with tqdm(total=len(chosen), desc="validate splits", unit="split", disable=not show_progress) as bar:
                results = validate_splits(bundle, ref, chosen, progress=lambda _k: bar.update(1))
            validation.update({
                "reference": f"transformers {transformers.__version__}",
                "prompt_tokens": len(prompt_ids), "decode_steps": VALIDATION_STEPS,
                "reference_tokens": ref.tokens, "splits": results,
                "max_abs_diff": max(float(r["max_abs_diff"]) for r in results),
            })
            _measure_variants(bundle, variants)
        manifest["validation"] = validation
        manifest["export"]["seconds"] = round(time.perf_counter() - started, 1)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _install(tmp, out_dir)
    except SplitLLMError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"cannot write the bundle to {out_dir}: {exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _model_stop_tokens(source: Source) -> list[str]:
    """Tokens the model's generation config ends on (Qwen: <|im_end|> and <|endoftext|>)."""
    config = getattr(source.model, "generation_config", None)
    ids = getattr(config, "eos_token_id", None)
    if ids is None:
        return []
    ids = [ids] if isinstance(ids, int) else list(ids)
    tokens = source.tokenizer.convert_ids_to_tokens(ids)
    return [t for t in tokens if isinstance(t, str)]


def _write_variants(out_dir: Path, blocks: Sequence[BlockInfo], schemes: Sequence[Scheme], model: Any,
                    spec: ArchSpec, shapes: Shapes) -> dict[str, Any]:
    """Each scheme's variant files into ``out_dir``; returns their manifest entries by name."""
    from splitllm_export.variants.quantize import write_variant

    return {scheme.name: write_variant(out_dir, list(blocks), scheme, model, spec, shapes) for scheme in schemes}


def _measure_variants(bundle: Bundle, variants: dict[str, Any]) -> None:
    """Teacher-forced top-1 agreement and perplexity of each variant against fp32, into its entry."""
    if not variants:
        return
    from splitllm_export.validate.quality import (
        QUALITY_TEXT,
        compare_quality,
        next_token_stats,
        quality_tokens,
    )

    ids = quality_tokens(bundle, min(QUALITY_TOKENS, bundle.shapes.max_context))
    reference = next_token_stats(bundle, "fp32", ids, QUALITY_TOKENS)
    for name, entry in variants.items():
        entry["quality"] = {"text": QUALITY_TEXT, **compare_quality(reference, next_token_stats(bundle, name, ids,
                                                                                                QUALITY_TOKENS))}


def _segment_list(num_layers: int) -> list[dict[str, Any]]:
    """The candidate-split segments, named by the unit range each covers."""
    segments = []
    for k in range(num_layers + 1):
        segments.append({"name": f"prefix.{k}", "split": k, "units": [0, k + 1], "layers": [0, k]})
        segments.append({"name": f"suffix.{k}", "split": k, "units": [k + 1, num_layers + 2],
                         "layers": [k, num_layers]})
    return segments
