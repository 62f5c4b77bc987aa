"""Stage 3, the device weight variants: fp16, int8 and int4 copies of the fp32 blocks.

``quantize`` (the schemes and how a variant's graphs are written), ``blockquant`` (the block
quantisation numerics) and ``calibrate`` (activation statistics that weight the scale search).
Kept free of imports so that importing one module does not load the others.
"""
