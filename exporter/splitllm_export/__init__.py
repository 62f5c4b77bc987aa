"""splitllm-export: turn a Hugging Face checkpoint, a GGUF file or the built-in model into a bundle.

By stage: ``sources`` (where a model comes from: the built-in catalogue, GGUF, transformers
directories, tiny test models), ``graphs`` (architecture specs and registry, the ONNX blocks),
``variants`` (device weight variants: fp16, int8, int4), ``validate`` (every split against
transformers, variant quality). ``families`` holds one file per architecture. ``export`` runs the
stages and writes the bundle; ``cli`` is the ``splitllm-export`` command line.
"""
