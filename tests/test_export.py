"""The exporter and the bundle: every split exact, weights once, clear errors, nothing half-written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import chat_ids

from splitllm import errors
from splitllm.model.bundle import MANIFEST, Bundle
from splitllm.model.runtime import KVCache, Segment
from splitllm_export.validate.splits import reference_run, run_split

NEW_TOKENS = 16


def _ids(source, text: str = "Tell me about the sea.") -> list[int]:
    return chat_ids(source, text)


def _export_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``splitllm-export ARGV`` in this process: (exit code, stdout, stderr).

    In-process because a subprocess spends most of its time importing torch and transformers,
    which this process has loaded already. What the command does between its arguments and its
    exit code is all in ``main``; an exception it does not turn into a message propagates here
    and fails the test, as a traceback on stderr would. The killed-export test keeps a real process.
    """
    from splitllm_export.cli import main

    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err



@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tiny_models_match_transformers_at_every_split(tiny_export, family):
    path, source = tiny_export(family, layers=3)
    bundle = Bundle.open(path)
    ids = _ids(source)
    ref = reference_run(source.model, ids, NEW_TOKENS - 1)
    # reference_run is greedy decoding with a KV cache: it must agree with generate() itself.
    import torch

    generated = source.model.generate(
        torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
    )[0, len(ids):].tolist()
    assert ref.tokens == generated
    for split in range(bundle.num_layers + 1):
        tokens, _ = run_split(bundle, split, ids, NEW_TOKENS - 1)
        assert tokens == ref.tokens, f"split {split}"


@pytest.mark.smollm
def test_smollm2_splits_match_transformers(smollm2_bundle):
    """The export compared every split with transformers (run_split against reference_run, the
    comparison this test used to repeat) and wrote what it found; the long decode through the
    real server is test_generation's."""
    from importlib import metadata

    v = Bundle.open(smollm2_bundle, verify=False).manifest["validation"]
    assert v["skipped"] is False and v["reference"] == f"transformers {metadata.version('transformers')}"
    assert v["prompt_tokens"] > 0 and len(v["reference_tokens"]) == v["decode_steps"] + 1 >= 5
    by_split = {r["split"]: r for r in v["splits"]}
    for split in (0, 1, 15, 29, 30):
        assert by_split[split]["tokens_match"], f"split {split}"
        assert by_split[split]["max_abs_diff"] < 1e-3, f"split {split}"  # fp32 logits, not just the argmax
    assert v["max_abs_diff"] == max(r["max_abs_diff"] for r in v["splits"]) < 1e-3


@pytest.mark.smollm
def test_smollm2_manifest_records_validation_and_costs(smollm2_bundle):
    bundle = Bundle.open(smollm2_bundle, verify=False)
    m = bundle.manifest
    assert m["validation"]["skipped"] is False
    assert [r["split"] for r in m["validation"]["splits"]] == list(range(31))
    assert all(r["tokens_match"] for r in m["validation"]["splits"])
    units = m["cost"]["units"]
    assert [u["name"] for u in units] == ["embed"] + [f"layer.{i}" for i in range(30)] + ["head"]
    assert units[1]["kv_bytes_per_token"] == 2 * 3 * 64 * 4
    assert units[1]["out_bytes_per_token"] == 576 * 4
    assert len(m["segments"]) == 62
    weights = m["files"]["weights.bin"]["size_bytes"]
    # 134.5M fp32 parameters with the tied embedding stored once; blocks add only graph structure.
    assert 530e6 < weights < 545e6
    graphs = sum(f["size_bytes"] for n, f in m["files"].items() if n.endswith(".onnx"))
    assert graphs < 0.01 * weights


def test_any_contiguous_ranges_chain_to_the_reference(tiny_export):
    path, source = tiny_export("llama", layers=4)
    bundle = Bundle.open(path)
    ids = _ids(source)
    ref = reference_run(source.model, ids, 5)
    # client: embed + layer 0, server: layers 1-2, client: layer 3 + head (two switches)
    ranges = [(0, 2), (2, 4), (4, 6)]
    segments = [Segment(bundle, a, b) for a, b in ranges]
    caches = [KVCache(bundle.shapes) for _ in ranges]
    x = np.asarray([ids], dtype=np.int64)
    past, tokens = 0, []
    for _ in range(6):
        out = x
        for seg, cache in zip(segments, caches, strict=True):
            out = seg.run(out, cache, past)
        past += x.shape[1]
        tokens.append(int(out[0, -1].argmax()))
        x = np.asarray([[tokens[-1]]], dtype=np.int64)
    assert tokens == ref.tokens


def test_manifest_lists_every_file_and_skip_validate_is_recorded(tmp_path, capsys):
    out = tmp_path / "b"
    code, stdout, stderr = _export_cli(capsys, "--tiny", "gpt2", "--layers", "2", "--skip-validate", "-q",
                                       "-o", str(out))
    assert code == 0, stderr
    assert "not validated" in stdout
    m = json.loads((out / MANIFEST).read_text())
    assert m["validation"] == {"skipped": True}
    on_disk = {p.name for p in out.iterdir()} - {MANIFEST}
    assert set(m["files"]) == on_disk
    assert {"weights.bin", "tokenizer.json", "embed.onnx", "head.onnx", "layer_1.onnx"} <= on_disk


def _copy_bundle(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_edited_file_missing_file_and_bad_manifest_are_named(tiny_export, tmp_path):
    path, _ = tiny_export("llama", layers=3)
    b = _copy_bundle(path, tmp_path / "edited")
    with open(b / "weights.bin", "r+b") as f:
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(errors.BundleCorrupt, match="weights.bin"):
        Bundle.open(b)

    b = _copy_bundle(path, tmp_path / "missing")
    (b / "layer_1.onnx").unlink()
    with pytest.raises(errors.BundleCorrupt, match="layer_1.onnx is missing"):
        Bundle.open(b)

    b = _copy_bundle(path, tmp_path / "json")
    (b / MANIFEST).write_text("{not json")
    with pytest.raises(errors.BundleCorrupt, match="manifest.json"):
        Bundle.open(b)

    b = _copy_bundle(path, tmp_path / "future")
    m = json.loads((b / MANIFEST).read_text())
    m["format_version"] = 99
    (b / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(errors.BundleVersionError, match="99"):
        Bundle.open(b)

    with pytest.raises(errors.BundleNotFound):
        Bundle.open(tmp_path / "nothing-here")


def test_unsupported_architecture_names_the_supported_ones(tmp_path, capsys):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path / "bert"
    )
    code, _, stderr = _export_cli(capsys, "--hf", str(tmp_path / "bert"), "-q", "-o", str(tmp_path / "o"))
    assert code == 1
    assert "'bert'" in stderr and "gpt2" in stderr and "llama" in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "o").exists()


def test_bad_gguf_sources_give_clear_errors(tmp_path):
    from splitllm_export.sources.gguf_model import load_gguf

    with pytest.raises(errors.ModelSourceError, match="no GGUF file"):
        load_gguf(tmp_path / "absent.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"NOTGGUF" * 10)
    with pytest.raises(errors.ModelSourceError, match="not a GGUF file"):
        load_gguf(junk)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 9)
    with pytest.raises(errors.ModelSourceError, match="damaged"):
        load_gguf(truncated)
    import gguf

    other = tmp_path / "falcon.gguf"
    writer = gguf.GGUFWriter(str(other), "falcon")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(errors.UnsupportedArchitecture, match="falcon"):
        load_gguf(other)


def test_non_empty_output_is_refused_unless_forced(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cmd = ["--tiny", "llama", "--layers", "1", "-q", "-o", str(out)]
    code, _, stderr = _export_cli(capsys, *cmd)
    assert code == 1 and "not empty" in stderr and "--force" in stderr
    assert (out / "keep.txt").read_text() == "mine"
    code, _, stderr = _export_cli(capsys, *cmd, "--force")
    assert code == 0, stderr
    assert not (out / "keep.txt").exists()
    Bundle.open(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directories left behind"


def test_killed_export_leaves_nothing_that_opens(tmp_path):
    out = tmp_path / "o"
    proc = subprocess.Popen(
        [sys.executable, "-m", "splitllm_export.cli", "--tiny", "llama", "--layers", "24", "-q", "-o", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            partial = [p for p in tmp_path.glob(".o.partial-*") if (p / "layer_3.onnx").exists()]
            if partial or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "export finished before it could be interrupted"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert not out.exists()
    with pytest.raises(errors.BundleNotFound):
        Bundle.open(out)


def test_sdk_import_and_bundle_open_do_not_load_torch(tiny_export):
    path, _ = tiny_export("llama", layers=3)
    code = (
        "import sys, splitllm\n"
        "from splitllm.model.bundle import Bundle\n"
        "from splitllm.model.runtime import make_session\n"
        f"b = Bundle.open({str(path)!r})\n"
        "s = make_session(b, 0, b.num_units)\n"
        "b.text.encode('hello')\n"
        "bad = [m for m in ('torch', 'transformers', 'onnx', 'optimum') if m in sys.modules]\n"
        "print('heavy:', bad)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "heavy: []" in r.stdout


@pytest.mark.parametrize("options, messages", [
    ("size=300k", ("the bundle needs about", "free")),  # refused by the up-front check, before any work
    ("size=512m,nr_inodes=6", ("cannot write the bundle", "No space left")),  # space, too few inodes: writes fail
], ids=["too-small", "full-while-writing"])
def test_a_full_disk_is_a_clear_error_and_leaves_nothing(tmp_path, capsys, options, messages):
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        code, _, stderr = _export_cli(capsys, "--tiny", "llama", "--layers", "2", "-q", "-o", str(small / "b"))
        assert code == 1
        assert all(m in stderr for m in messages), stderr
        assert "Traceback" not in stderr
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_the_bundle_size_estimate_is_an_upper_bound(tiny_export):
    from splitllm_export.export import estimate_bundle_bytes
    from splitllm_export.variants.quantize import scheme_for

    path, source = tiny_export("llama", layers=3)
    size = sum(p.stat().st_size for p in path.iterdir())
    estimate = estimate_bundle_bytes(source.model)
    assert size <= estimate < size + (160 << 20)
    assert estimate_bundle_bytes(source.model, [scheme_for("int4")]) > estimate


def test_the_cli_offers_every_weight_variant_the_quantizer_makes():
    from splitllm_export import cli
    from splitllm_export.variants import quantize

    assert cli.WEIGHT_VARIANTS == quantize.VARIANTS
    assert cli.build_parser().parse_args(["--builtin", "smollm2", "-o", "x", "--client-weights", "int4-q41,fp16"]
                                         ).client_weights == ["int4-q41", "fp16"]
