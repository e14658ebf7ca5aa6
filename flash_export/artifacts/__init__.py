"""The artifacts layer: exported files as data.

Artifact kinds and their registry (suffixes, loader, exporter, validate backend, bench runner),
hashing and atomic writes, metadata read without running anything, the manifest, the trust store,
the ONNX safety checks and the recorded IOSpec. May import `core`, and onnx to parse graphs; never
torch or onnxruntime.
"""
