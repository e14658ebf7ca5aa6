"""Shared test setup: a per-session trust store, and the `cuda` marker's skip.

Test modules import their helpers (helpers.py, _native_cases.py) as top-level modules: pytest puts
this folder on sys.path. A subprocess that needs them gets it on PYTHONPATH.
"""

import functools
import os
import tempfile
from typing import Optional

import pytest


def pytest_configure(config):
    # Exports record their hashes in the user's trust store; tests must neither read the real
    # one nor fill it. Set at configure time so module fixtures and subprocesses inherit it.
    os.environ["FLASH_EXPORT_TRUST_STORE"] = tempfile.mkdtemp(prefix="flash_export_trust_")


@functools.cache
def _cuda_unusable() -> Optional[str]:
    """Why no CUDA test can run here, or None. Asked when the first test that cares runs, never
    at import (collection stays free of device queries)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU usable (torch.cuda.is_available() is False)"
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # Before fixtures: a `cuda` test's fixtures may need the GPU themselves.
    if item.get_closest_marker("cuda") is not None:
        reason = _cuda_unusable()
        if reason is not None:
            pytest.skip(reason)


@pytest.fixture
def cuda_unusable() -> Optional[str]:
    """Why no CUDA test can run here, or None: for the tests of the no-GPU behaviour."""
    return _cuda_unusable()
