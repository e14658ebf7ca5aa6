"""The export layer: models to deployable artifacts.

Shared preparation (`prepare`: layers, spec, IOSpec, metadata), TorchScript (`torchscript`), ONNX
(`onnx`) with its `Target` registry (`onnx_targets`, `onnx_guard`, `opsets`) and AOTInductor `.pt2`
packages (`pt2`). May import `models`, `nn`, `runtime`, `artifacts` and `core`; never `check`,
`bench`, `serving` or `cli`.
"""
