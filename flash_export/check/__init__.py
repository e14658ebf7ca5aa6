"""The check layer: is an artifact right.

`validate` against a float64 reference, the structural checks (`structural`), the parity case runner
(`parity`), the check `flash-export onnx` runs after writing a file (`export_check`) and `doctor`
(can this install run the op). May import `export`, `models`, `nn`, `runtime`, `artifacts` and
`core`.
"""
