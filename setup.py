"""Packaging: the flash_export package plus its native kernel library, built with g++ (and nvcc).

The library has no torch or Python dependency, so the build environment never installs torch.
"""

import importlib.util
import os
from pathlib import Path

from setuptools import setup
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


setup(
    name="flash-export",
    version=_version(),
    description="Take a chunked FlashAttention PyTorch module to TorchScript and onnxruntime",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=["flash_export"],
    py_modules=["flash_attention"],
    package_data={"flash_export": ["_native/*.so", "py.typed"]},
    install_requires=[
        # Pinned: any range admitting a newer torch makes pip fetch a multi-GB CUDA build.
        "torch>=2.8,<=2.13.0",
        "onnx>=1.21,<1.24",
        "onnxscript>=0.5",
        "click>=8.1",
        "numpy>=1.24",
        'onnxruntime-gpu>=1.20; sys_platform == "linux" and platform_machine == "x86_64"',
        'onnxruntime>=1.20; sys_platform != "linux" or platform_machine != "x86_64"',
        "psutil>=5.9",
    ],
    extras_require={
        "plot": ["matplotlib>=3.7"],
        "dev": ["pytest>=8", "ruff>=0.6", "mypy>=1.10"],
    },
    entry_points={"console_scripts": ["flash-export=flash_export.cli:run"]},
    cmdclass={"build_py": BuildPyWithNative},
    distclass=BinaryDistribution,
)
