"""The serving layer: exported graphs behind a network API.

The Open Inference Protocol's request checks (`protocol`), its JSON wire form (`wire`), dynamic
batching (`batching`), the Ray Serve deployment (`ray_serve`) and Triton model repositories
(`triton`). Torch-free: may import `runtime`, `artifacts` and `core`.
"""
