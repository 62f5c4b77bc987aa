"""Tiny random-weight models of every registered family, for tests and smoke runs (no download)."""

from __future__ import annotations

from typing import Any

from splitllm.errors import ConfigError, UnsupportedArchitecture
from splitllm_export.graphs.registry import family_names, spec_named
from splitllm_export.sources import Source

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 384) -> Any:
    """A small byte-level BPE trained here on Python's own docs (no hub), with a ChatML template."""
    import pydoc_data.topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = list(pydoc_data.topics.topics.values())[:40]
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def load_tiny(family: str, num_layers: int = 4, seed: int = 0) -> Source:
    """A random-weight model of a registered family, small enough to export in seconds."""
    import torch

    if num_layers < 1:
        raise ConfigError(f"--layers must be >= 1, got {num_layers}")
    if family not in family_names():
        raise UnsupportedArchitecture(
            f"no tiny config for {family!r}; tiny models exist for {', '.join(family_names())}")
    spec = spec_named(family)
    tokenizer = tiny_tokenizer()
    config = spec.tiny_config(len(tokenizer), num_layers)
    torch.manual_seed(seed)
    model = spec.reference(config).to(torch.float32)
    model.eval()
    return Source(model, tokenizer, {"kind": "tiny", "id": f"tiny-{family}-{num_layers}l-s{seed}", "seed": seed})
