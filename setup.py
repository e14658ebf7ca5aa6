"""Packaging: the flash_export package plus its native kernel library, built with g++ (and nvcc).

The library has no torch or Python dependency, so the build environment never installs torch.
"""

import importlib.util
import os
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parent


def _version() -> str:
    scope: dict = {}
    exec((ROOT / "flash_export" / "_version.py").read_text(), scope)
    return scope["__version__"]


def _build_library(out_dir: Path) -> None:
    build_py_file = ROOT / "custom_ops" / "build.py"
    spec = importlib.util.spec_from_file_location("_fe_native_build", build_py_file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.build_library(
        out_dir,
        cuda=os.environ.get("FLASH_EXPORT_CUDA", "auto"),
        werror=os.environ.get("FLASH_EXPORT_WERROR", "0") == "1",
        verbose=True,
    )


class BuildPyWithNative(build_py):
    """Builds libflash_export.so into flash_export/_native (in place for editable installs)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            out = ROOT / "flash_export" / "_native"
        else:
            out = Path(self.build_lib) / "flash_export" / "_native"
        _build_library(out)


class BinaryDistribution(Distribution):
    """The wheel carries a native library, so it is platform specific."""

    def has_ext_modules(self) -> bool:
        return True


class PlatformWheel(bdist_wheel):
    """Tag the wheel py3-none-<platform>: the library is loaded by path and uses no Python ABI,
    so one wheel serves every CPython the package supports.

    `auditwheel repair --plat manylinux_2_34_x86_64` (.ci/wheel) then gives the platform tag an
    index accepts. 2.34 is the floor of a build on glibc >= 2.34: glibc 2.34 moved libpthread and
    libdl into libc under new symbol versions, and the library calls them (pthread_once through
    std::call_once; with CUDA, the static CUDA runtime's pthread, dl, sem and shm calls). A lower
    floor (torch's and onnxruntime's 2.28) needs a build on an older glibc, e.g. in the
    manylinux_2_28 image with the CUDA toolkit.
    """

    def get_tag(self) -> tuple:
        _, _, platform = super().get_tag()
        return "py3", "none", platform


EXPORT = ["torch>=2.8,<=2.13.0", "onnxscript>=0.5"]

setup(
    name="flash-export",
    version=_version(),
    description="Take a chunked FlashAttention PyTorch module to TorchScript and onnxruntime",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    # torch 2.13, the export side, needs Python >= 3.10.
    python_requires=">=3.10",
    packages=find_packages(include=["flash_export", "flash_export.*"]),
    py_modules=["flash_attention"],
    package_data={"flash_export": ["_native/*.so", "py.typed"]},
    # The light install runs exported graphs: numpy, onnx (for the checks before a file loads)
    # and click, plus the onnxruntime the user installs. No requirement, base or extra, names
    # onnxruntime: its CPU and GPU builds are two distributions of one import name, pip cannot
    # ask for either, and one named here would be laid over an installed other (make demo's
    # onnxruntime-gpu), leaving a broken `import onnxruntime` once either is uninstalled.
    install_requires=[
        "onnx>=1.21,<1.24",
        "click>=8.1",
        "numpy>=1.24",
    ],
    extras_require={
        # Pinned: any range admitting a newer torch makes pip fetch a multi-GB CUDA build.
        "export": EXPORT,
        # flash_export.hf: transformers models on our kernel. Pinned to the releases tested
        # (flash_export.hf.TESTED_TRANSFORMERS): the mask function follows transformers'
        # mask-function arguments, which change between minor releases.
        "hf": [*EXPORT, "transformers>=5.23,<5.24"],
        "plot": ["matplotlib>=3.7"],
        # `validate --runtime openvino`: standard-target graphs in a second runtime. Pinned to
        # the release tested (its precision hint and ONNX frontend change between releases).
        "openvino": ["openvino>=2026.4,<2026.5"],
        # `flash-export serve`. Pinned: Serve's proxy and replica internals (how a request body
        # is streamed, which the limits rely on) change between releases.
        "serve": ["ray[serve]==2.60.0"],
        # psutil: the native fuzz and serve tests measure RSS with it; tritonclient: the serve
        # tests' client and Triton's config schema (model_config_pb2); hypothesis: the property
        # tests (tests/test_properties_*.py); filelock: test workers share one C++ build.
        # mutmut is not here: `make mutate` installs it.
        "dev": ["pytest>=8", "pytest-xdist>=3.6", "ruff>=0.6", "mypy>=1.10", "psutil>=5.9",
                "tritonclient[http]==2.73.0", "hypothesis>=6.100", "filelock>=3.13"],
    },
    entry_points={"console_scripts": ["flash-export=flash_export.cli.main:run"]},
    cmdclass={"build_py": BuildPyWithNative, "bdist_wheel": PlatformWheel},
    distclass=BinaryDistribution,
)
