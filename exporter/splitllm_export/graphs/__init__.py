"""Stage 2, the graphs: architecture specs and their registry, and the ONNX blocks built from a model.

``arch`` (what a family is), ``registry`` (the families by name, model_type and GGUF architecture),
``layers`` (the PyTorch layers a family is exported from), ``fused`` (decoder layers built directly
as ONNX Runtime contrib kernels), ``blocks`` (the per-layer ONNX blocks of a bundle) and
``onnx_util`` (graph building and the shared weight store). Kept free of imports so that importing
one module does not load the others.
"""
