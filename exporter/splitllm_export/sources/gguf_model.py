"""A model from a GGUF file (the built-in models are GGUF files too), dequantized to fp32.

The file is parsed once (:class:`~splitllm_export.sources.gguf_reader.GGUFParse`, which says why)
and everything is built from that parse and handed to transformers explicitly: the config, the
tokenizer's backend (``tokenizer_object``) and the dequantized weights (``state_dict``), so that
transformers never parses the file itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from splitllm.errors import ModelSourceError
from splitllm_export.graphs.registry import check_gguf_arch, spec_for
from splitllm_export.sources import Source
from splitllm_export.sources.gguf_reader import GGUFParse, gguf_architecture
from splitllm_export.sources.gguf_tokenizer import faithful_backend


def load_gguf(path: str | os.PathLike[str], model_id: str | None = None) -> Source:
    """A GGUF of a registered family as an fp32 transformers model and its tokenizer.

    ``model_id`` (default: the file's stem) is the manifest's model id. UnsupportedArchitecture
    for an unregistered ``general.architecture``; ModelSourceError for anything unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelSourceError(f"no GGUF file at {path}")
    check_gguf_arch(gguf_architecture(path))
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    parse, metadata, config = _parse(path)
    spec_for(config)  # refuse an unregistered model_type before reading the weights
    try:
        tokenizer = _tokenizer(path, config, metadata)
        model = _model(parse, config)
    except Exception as exc:
        raise ModelSourceError(f"transformers could not load GGUF {path}: {exc}") from exc
    model.eval()
    return Source(model, tokenizer, {"kind": "gguf", "file": path.name, "id": model_id or path.stem})


def load_gguf_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The tokenizer :func:`load_gguf` gives the GGUF at ``path``, without loading its weights."""
    path = Path(path)
    _, metadata, config = _parse(path)
    try:
        return _tokenizer(path, config, metadata)
    except ModelSourceError:
        raise
    except Exception as exc:  # transformers raises many types for unreadable checkpoints
        raise ModelSourceError(f"transformers could not read the tokenizer of GGUF {path}: {exc}") from exc


def _parse(path: Path) -> tuple[GGUFParse, dict[str, Any], Any]:
    """One parse of the GGUF, transformers' metadata from it and the config it describes."""
    from transformers import AutoConfig

    try:
        parse = GGUFParse(path)
        metadata = parse.metadata()
        return parse, metadata, AutoConfig.for_model(**metadata["config"])
    except Exception as exc:  # transformers raises many types for unreadable checkpoints
        raise ModelSourceError(f"transformers could not read GGUF {path}: {exc}") from exc


def _tokenizer(path: Path, config: Any, metadata: dict[str, Any]) -> Any:
    """The tokenizer class transformers picks for ``config``, around the GGUF's own vocabulary.

    The backend is converted from the parsed vocabulary as transformers converts it, then made to
    tokenise as llama.cpp does where that conversion differs (``gguf_tokenizer``); given as
    ``tokenizer_object`` (and ``config``), transformers does not parse the GGUF again.
    """
    from transformers import AutoTokenizer
    from transformers.integrations.ggml import convert_gguf_tokenizer

    backend, extra = convert_gguf_tokenizer(metadata["config"]["model_type"], metadata["tokenizer"])
    backend = faithful_backend(path, backend)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, config=config, tokenizer_object=backend,
                                         **{**metadata["tokenizer_config"], **extra})


def _model(parse: GGUFParse, config: Any) -> Any:
    """The fp32 model: a meta-device skeleton names the GGUF's tensors, its class's from_pretrained loads them.

    (The concrete class, as AutoModelForCausalLM picks it for ``config``: the Auto class insists
    on a checkpoint path, which a state dict replaces.)
    """
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    state = parse.tensors(skeleton)
    return type(skeleton).from_pretrained(None, config=config, state_dict=state, dtype=torch.float32)
