"""The core layer: the facts every other layer shares.

The op's contract (node name, attributes, targets, dtypes), the typed errors, the one tolerance
rule, the IOSpec (what a model takes and gives) and install hints. Pure Python with numpy at most:
it imports nothing else of the package, and never torch, onnx or onnxruntime.
"""
