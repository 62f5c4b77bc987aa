"""The model as both sides run it: the bundle on disk (``bundle``, ``graphs``), ONNX Runtime
segments with their KV cache (``runtime``), token sampling (``sampling``) and text in and out
(``text``). Import the modules themselves; this door re-exports nothing, so that importing one
does not load the others (the tokenizer and jinja2 are not free)."""
