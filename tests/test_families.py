"""Every registered family: tiny random-weight models exact at every split, fused and exported."""

from __future__ import annotations

import pytest
from helpers import chat_ids

from splitllm import errors
from splitllm.model.bundle import Bundle
from splitllm_export.registry import ARCHS, spec_named
from splitllm_export.validate import reference_run, run_split

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
    from splitllm_export.sources import load_tiny

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
