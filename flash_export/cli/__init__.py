"""The cli layer: the `flash-export` command.

Click commands that parse, call one library function and render (`main`, `serve`), shared options
(`options`) and plain-text reports (`render`). May import every layer, the heavy ones lazily inside
commands so `flash-export --help` stays instant.
"""
