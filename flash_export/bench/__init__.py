"""The bench layer: how fast and how big.

The benchmark (`benchmark`), the per-backend runners (`runners`), interleaved timing (`timing`),
peak memory in a fresh process (`memory`) and the CSV/PNG report files (`files`). May import
`check`, `export`, `models`, `nn`, `runtime`, `artifacts` and `core`.
"""
