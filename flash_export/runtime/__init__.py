"""The runtime layer: exported graphs run without torch.

The native library's path (`library`), onnxruntime sessions with the library registered (`sessions`)
and the one ctypes binding of the library's C ABI (`native`, over the struct mirrors and entry
signatures in `native_abi`), and token generation with an exported with-past graph
(`generation`). May import `artifacts` and `core`; never torch. `library_path`,
`create_session`, `session_io`, the other session helpers and `generate` are importable from
here, as the README shows.
"""

from flash_export.runtime.generation import Sampling, generate
from flash_export.runtime.library import LIBRARY_ENV, library_path
from flash_export.runtime.sessions import (
    create_session,
    model_domains,
    ort_session,
    register_library,
    session_inputs,
    session_io,
    session_options,
)

__all__ = ["LIBRARY_ENV", "Sampling", "create_session", "generate", "library_path",
           "model_domains", "ort_session", "register_library", "session_inputs", "session_io",
           "session_options"]
