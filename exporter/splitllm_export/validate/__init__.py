"""Stage 4, validation: the exported bundle checked against the model it came from.

``splits`` (transformers' reference run, and every split's agreement with it) and ``quality``
(how far a weight variant's next-token distribution drifts from fp32's). Kept free of imports so
that importing one module does not load the others.
"""
