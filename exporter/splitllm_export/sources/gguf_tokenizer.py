"""A GGUF's tokenizer as llama.cpp reads it, where transformers' conversion of it differs.

Our exactness tests compare split generation with transformers on the ids transformers'
tokenizer gives, so a tokenizer bug there is invisible to them. transformers 4.57.6 converts
GGUF vocabularies wrongly in two cases that our built-in models hit (``tests/test_tokenizers.py``
compares every builtin with llama.cpp on the quality texts and a mixed one):

- A SentencePiece vocabulary (``tokenizer.ggml.model == "llama"``, Gemma 3's) becomes
  near-character pieces: "The tallest mountain in the world is" was 17 ids where llama.cpp reads
  8, and the ``pydoc`` text 201,415 ids instead of 112,659. The model then sees text it was
  never trained on. :func:`spm_tokenizer` rebuilds it from the GGUF's own tables.
- SmolLM2's byte-level BPE (``tokenizer.ggml.pre == "smollm"``) loses the split of every digit
  into its own piece that llama.cpp applies before the GPT-2 pattern: "\\n   2" became
  "\\n  " + " " + "2" instead of "\\n   " + "2" (two of the three quality texts differed).

How llama.cpp tokenises a SentencePiece vocabulary: control and user-defined tokens are matched
as literals in the raw text first; in each stretch between them spaces become ``▁`` (and one is
prepended if ``add_space_prefix``); then the adjacent pair whose concatenation is a vocabulary
entry of the highest score is merged, again and again, leftmost first among equals; a character
left over that is not in the vocabulary is written as ``<0xXX>`` byte tokens. That is a
byte-fallback BPE whose merges are every split of every normal token into two normal tokens,
ranked by the merged token's score, which the ``tokenizers`` library runs (its "added tokens"
match before normalisation, as llama.cpp's literals do).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from splitllm.errors import ModelSourceError
from splitllm_export.sources.gguf_reader import read_gguf_metadata

__all__ = ["faithful_backend", "spm_tokenizer"]

log = logging.getLogger("splitllm.export")

# llama.cpp's token types (llama_token_type).
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4

# Byte-level BPE pre-tokenizers whose transformers conversion was checked against llama.cpp on
# our texts (qwen2 as converted; smollm once its digits are split, below).
_CHECKED_PRE = frozenset({"qwen2", "smollm"})

_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.scores",
         "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.unknown_token_id",
         "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix")


def faithful_backend(path: Path, converted: Any) -> Any:
    """The ``tokenizers.Tokenizer`` a bundle should carry for the GGUF at ``path``, given the one
    transformers converted (``converted``, returned as it is where it already agrees with
    llama.cpp). Logs a warning for a vocabulary kind nobody checked against llama.cpp."""
    meta = read_gguf_metadata(path, _KEYS)
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre")
    if kind == "llama":
        return spm_tokenizer(meta)
    if kind == "gpt2" and pre == "smollm":
        from tokenizers import pre_tokenizers

        converted.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True),
        ])
        return converted
    if not (kind == "gpt2" and pre in _CHECKED_PRE):
        log.warning("%s: tokenizer %r (pre-tokenizer %r) as transformers converts it; it has not been checked "
                    "against llama.cpp's", path.name, kind, pre)
    return converted


def spm_tokenizer(meta: dict[str, Any]) -> Any:
    """A ``tokenizers.Tokenizer`` that tokenises as llama.cpp does for a SentencePiece GGUF
    vocabulary, from its metadata (tokens, scores, token types, BOS and space-prefix flags).
    Raises ModelSourceError when a table is missing or the tables disagree in length."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    try:
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        scores = np.asarray(meta["tokenizer.ggml.scores"], dtype=np.float64)
        types = np.asarray(meta["tokenizer.ggml.token_type"], dtype=np.int64)
    except KeyError as exc:
        raise ModelSourceError(f"the GGUF's SentencePiece vocabulary lacks {exc.args[0]}") from exc
    if not len(tokens) == len(scores) == len(types):
        raise ModelSourceError(f"the GGUF's vocabulary tables disagree: {len(tokens)} tokens, {len(scores)} scores, "
                               f"{len(types)} types")
    vocab: dict[str, int] = {}
    for i, text in enumerate(tokens):
        vocab.setdefault(text, i)  # a repeated text keeps its first id, as llama.cpp's text-to-id map does
    normal = {text: i for i, text in enumerate(tokens) if types[i] == _NORMAL and vocab[text] == i}
    # Every split of a normal token into two normal tokens, best merged score first. The splits
    # of one token share its score; their order cannot change a result, since no two of them can
    # apply to the same characters.
    ranked: list[tuple[float, int, int, str, str]] = []
    for text, i in normal.items():
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[i], normal[left], normal[right], left, right))
    ranked.sort()
    unk = tokens[int(meta.get("tokenizer.ggml.unknown_token_id", 0))]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(left, right) for *_, left, right in ranked], unk_token=unk,
                               fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.normalizer = normalizers.Sequence([*([normalizers.Prepend("▁")] if prefix else []),
                                           normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     *([decoders.Strip(" ", 1, 0)] if prefix else [])])
    tok.add_tokens([AddedToken(tokens[i], special=bool(types[i] == _CONTROL), normalized=False)
                    for i in range(len(tokens)) if types[i] in (_CONTROL, _USER_DEFINED)])
    if meta.get("tokenizer.ggml.add_bos_token") and "tokenizer.ggml.bos_token_id" in meta:
        bos_id = int(meta["tokenizer.ggml.bos_token_id"])
        bos = tokens[bos_id]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                           special_tokens=[(bos, bos_id)])
    return tok
