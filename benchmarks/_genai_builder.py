"""Run ONNX Runtime GenAI's model builder under the transformers this project pins.

``onnxruntime_genai.models.builder`` 0.18.0 imports, at module level, transformers classes of
models newer than our transformers 4.57 (Qwen3.5, ...), so it fails before it looks at the
model. The Llama path never uses them: this shim makes transformers' lazy module answer the
missing names with inert placeholder classes (``isinstance`` against them is always False), turns a
``rope_scaling: null`` into transformers 5's ``rope_parameters``, then runs the builder as
``python -m onnxruntime_genai.models.builder`` would, with the same arguments.

Usage: ``python benchmarks/_genai_builder.py -i HF_DIR -o OUT -p int4 -e cpu``.
"""

from __future__ import annotations

import runpy
import sys

_NEWER_THAN_OURS = (
    "Gemma3ForConditionalGeneration",
    "Lfm2VlForConditionalGeneration",
    "Mistral3ForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
    "Qwen3_5ForConditionalGeneration",
    "Qwen3_5MoeForConditionalGeneration",
    "Qwen3VLForConditionalGeneration",
)


def main() -> None:
    from transformers.utils import import_utils

    lazy = import_utils._LazyModule
    original = lazy.__getattr__
    placeholders = {name: type(name, (), {}) for name in _NEWER_THAN_OURS}

    def getattr_or_placeholder(self: object, name: str) -> object:
        try:
            return original(self, name)
        except (AttributeError, ImportError):
            if name in placeholders:
                return placeholders[name]
            raise

    lazy.__getattr__ = getattr_or_placeholder  # type: ignore[method-assign]

    # The builder reads configs the transformers-5 way: rope_scaling absent or a dict, never None,
    # and rope_parameters holding the rope type and theta.
    from transformers import AutoConfig

    load_config = AutoConfig.from_pretrained

    def config_without_null_rope(*args: object, **kwargs: object) -> object:
        config = load_config(*args, **kwargs)
        if getattr(config, "rope_scaling", {}) is None:
            del config.rope_scaling
            config.rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta}
        return config

    AutoConfig.from_pretrained = config_without_null_rope  # type: ignore[method-assign]
    sys.argv[0] = "onnxruntime_genai.models.builder"
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
