"""Shared test setup: a per-session trust store, the `cuda` marker's skip, Hypothesis profiles.

Test modules import their helpers (helpers.py, _native_cases.py) as top-level modules: pytest puts
this folder on sys.path. A subprocess that needs them gets it on PYTHONPATH.
"""

import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import pytest
from filelock import FileLock
from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]

# Hypothesis: "ci" (the default) draws a bounded, fixed set of examples, so a run takes the same
# time and finds the same things every time; "thorough" (`make properties`) draws many more, at
# random, and keeps what fails in .hypothesis/ to replay; a failure it finds becomes an explicit
# @example. HYPOTHESIS_PROFILE picks one.
settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True,
                          database=None, print_blob=True)
settings.register_profile("thorough", max_examples=2000, deadline=None, print_blob=True)
# `make mutate`: each surviving mutant reruns every test that reaches it; fewer examples keep the
# run within the hour (a mutant the explicit tests miss is still met by 10 drawn examples).
settings.register_profile("mutation", max_examples=10, deadline=None, derandomize=True,
                          database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


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


@pytest.fixture(scope="session")
def cpp_build(tmp_path_factory) -> Path:
    """examples/cpp built once per session against the installed torch, with the libtorch shim
    (custom_ops/torch) over the installed native library: flash_attention_run and
    shim/libflash_export_torch.so."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    import torch

    from flash_export.runtime import library_path

    # pytest-xdist workers are sessions of their own: the first to ask builds in the run's shared
    # temp folder, under a lock, and the other takes that build (it costs tens of seconds).
    shared = os.environ.get("PYTEST_XDIST_WORKER") is not None
    root = tmp_path_factory.getbasetemp()
    build = (root.parent if shared else root) / "cpp-build"
    with FileLock(f"{build}.lock"):
        if not (build / "built").exists():
            subprocess.run(["cmake", "-S", str(ROOT / "examples" / "cpp"), "-B", str(build),
                            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                            f"-DFLASH_EXPORT_LIBRARY={library_path()}",
                            "-DCMAKE_BUILD_TYPE=Release"], check=True, capture_output=True)
            subprocess.run(["cmake", "--build", str(build), "-j2"], check=True,
                           capture_output=True)
            (build / "built").touch()
    return build


@pytest.fixture(scope="session")
def shim_library(cpp_build) -> Path:
    """The libtorch shim that registers flash_export::attention in a C++ process."""
    return cpp_build / "shim" / "libflash_export_torch.so"


@pytest.fixture(scope="session")
def pt2_package(tmp_path_factory):
    """(path, spec) of one .pt2 package per session: AOTInductor compiles take tens of seconds.

    Causal with a mask input, so one package covers masks, causal and Lq != Lk.
    """
    from flash_export import ModelSpec
    from flash_export.export.pt2 import export_pt2

    spec = ModelSpec(embed=32, heads=4, chunk=8, causal=True, seed=11)
    path = tmp_path_factory.mktemp("pt2") / "attention.pt2"
    return export_pt2(spec.build(), path, spec=spec, mask=True), spec


@pytest.fixture()
def shadowing_folder(tmp_path: Path) -> Path:
    """A folder holding another `flash_export` package, as a source clone does (its native
    library unbuilt): a process that imports from it fails."""
    (tmp_path / "flash_export").mkdir()
    (tmp_path / "flash_export" / "__init__.py").write_text(
        "raise ImportError('imported the flash_export folder of the current directory')\n")
    return tmp_path
