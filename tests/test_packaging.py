"""What users install: the metadata pip reads, what make installs, what the README tells them.

The metadata comes from setuptools' own hook (no native build); building, auditing and installing
the wheel is .ci/wheel's job (about a minute).
"""

import os
import re
import shutil
import subprocess
import sys
from email.message import Message
from email.parser import Parser
from pathlib import Path
from typing import Dict, List, Set

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
RUNTIMES = {"onnxruntime", "onnxruntime-gpu"}  # two distributions of the module onnxruntime


@pytest.fixture(scope="module")
def metadata(tmp_path_factory) -> Message:
    out = tmp_path_factory.mktemp("metadata")
    code = ("import sys\nfrom setuptools.build_meta import prepare_metadata_for_build_wheel\n"
            "prepare_metadata_for_build_wheel(sys.argv[1])\n")
    subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, check=True,
                   capture_output=True)
    (dist_info,) = out.glob("*.dist-info")
    return Parser().parsestr((dist_info / "METADATA").read_text())


def _requirements(metadata: Message) -> Dict[str, Set[str]]:
    """Distribution names by extra; "" holds what every install gets."""
    by_extra: Dict[str, Set[str]] = {extra: set() for extra in metadata.get_all("Provides-Extra")}
    by_extra[""] = set()
    for line in metadata.get_all("Requires-Dist"):
        req = Requirement(line)
        extra = re.search(r"""extra == "([^"]+)\"""", str(req.marker or ""))
        by_extra[extra.group(1) if extra else ""].add(req.name)
    return by_extra


def test_requires_python_is_what_torch_2_13_supports_and_the_readme_says_so(metadata):
    supported = SpecifierSet(metadata["Requires-Python"])
    assert "3.10" in supported and "3.9" not in supported, metadata["Requires-Python"]
    stated = re.search(r"Python >= (\d+\.\d+)", (ROOT / "README.md").read_text())
    assert stated and f">={stated.group(1)}" == metadata["Requires-Python"]


def test_the_light_install_runs_graphs_without_torch_or_a_forced_onnxruntime(metadata):
    base = _requirements(metadata)[""]
    assert {"onnx", "numpy"} <= base  # what flash_export.runtime needs besides onnxruntime
    assert not base & ({"torch", "onnxscript"} | RUNTIMES), base


def test_no_extra_names_an_onnxruntime_so_none_replaces_an_installed_one(metadata):
    """`pip install 'flash-export[serve,cpu]'` into make demo's venv laid onnxruntime over its
    onnxruntime-gpu (one module, two distributions; removing either then broke the import)."""
    by_extra = _requirements(metadata)
    assert not any(names & RUNTIMES for names in by_extra.values()), by_extra


def test_the_export_extra_brings_torch_pinned_and_onnxscript(metadata):
    assert _requirements(metadata)["export"] == {"torch", "onnxscript"}
    (torch,) = [Requirement(r) for r in metadata.get_all("Requires-Dist")
                if Requirement(r).name == "torch" and 'extra == "export"' in r]
    assert "2.13.0" in torch.specifier and "2.14.0" not in torch.specifier, torch


def test_the_dev_extra_holds_what_the_tests_and_lint_import(metadata):
    assert {"pytest", "ruff", "mypy", "psutil"} <= _requirements(metadata)["dev"]


def _make_dry_run(target: str, tmp_path: Path, *assignments: str) -> List[str]:
    """The commands `make -n` prints for a fresh venv, with the Makefile's defaults."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # Under `make test` (.ci/run passes TORCH_INDEX=), the outer make's variables would reach
    # this one through MAKEFLAGS; so would an exported TORCH_INDEX or ORT.
    unset = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "TORCH_INDEX", "ORT", "VENV"}
    env = {k: v for k, v in os.environ.items() if k not in unset}
    run = subprocess.run(["make", "-n", target, f"VENV={tmp_path / 'venv'}", *assignments],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return run.stdout.splitlines()


def _installed_extras(lines: List[str]) -> Set[str]:
    """The extras of the one `python -m pip install ... -e '.[extras]'` in `lines`."""
    pattern = re.compile(r"-m pip install .*-e '\.\[([^\]]*)\]'")
    (spec,) = [m.group(1) for m in map(pattern.search, lines) if m]
    return set(spec.split(","))


def test_the_serve_extra_pins_ray_serve_and_dev_pins_the_triton_client(metadata):
    pins = {Requirement(r).name: (str(Requirement(r).specifier), Requirement(r).extras)
            for r in metadata.get_all("Requires-Dist")}
    assert _requirements(metadata)["serve"] == {"ray"}
    assert pins["ray"] == ("==2.60.0", {"serve"}), pins["ray"]
    assert pins["tritonclient"] == ("==2.73.0", {"http"}), pins["tritonclient"]
    assert "tritonclient" in _requirements(metadata)["dev"]


def _installed_runtimes(lines: List[str]) -> List[str]:
    """The onnxruntime distributions the `pip install ... -e` line in `lines` names."""
    (line,) = [x for x in lines if re.search(r"-m pip install .*-e '\.\[", x)]
    return [name for name in sorted(RUNTIMES)
            if re.search(rf"'{re.escape(name)}(?:[<>=!~][^']*)?'", line)]


def test_make_demo_installs_export_and_one_onnxruntime_and_make_test_adds_the_test_extras(
        tmp_path, metadata):
    demo_lines = _make_dry_run("demo", tmp_path)
    demo = _installed_extras(demo_lines)
    assert demo == {"export"}, demo
    assert len(_installed_runtimes(demo_lines)) == 1, demo_lines
    test_lines = _make_dry_run("test", tmp_path)
    # hf: CI runs the transformers tests; openvino: validate --runtime openvino
    assert _installed_extras(test_lines) == demo | {"dev", "plot", "serve", "hf", "openvino"}
    assert _installed_runtimes(test_lines) == _installed_runtimes(demo_lines)
    assert _installed_runtimes(_make_dry_run("demo", tmp_path, "ORT=cpu")) == ["onnxruntime"]
    assert demo <= set(metadata.get_all("Provides-Extra"))


def test_the_hf_extra_pins_the_transformers_releases_flash_export_hf_is_tested_with(metadata):
    assert _requirements(metadata)["hf"] == {"torch", "onnxscript", "transformers"}
    pins = {Requirement(r).name: Requirement(r).specifier for r in metadata.get_all("Requires-Dist")
            if 'extra == "hf"' in r}
    # Read from the source: importing flash_export.hf needs transformers itself.
    tested = re.search(r'^TESTED_TRANSFORMERS = "([^"]+)"$',
                       (ROOT / "flash_export" / "hf" / "swap.py").read_text(), flags=re.M)
    assert tested and pins["transformers"] == SpecifierSet(tested.group(1)), pins
    assert "5.23.0" in pins["transformers"] and "5.24.0" not in pins["transformers"]
    assert "2.13.0" in pins["torch"] and "2.14.0" not in pins["torch"]  # the export extra's pin


def test_make_takes_torch_from_the_cpu_index_unless_torch_index_is_emptied(tmp_path):
    def torch_line(*assignments: str) -> str:
        (line,) = [x for x in _make_dry_run("demo", tmp_path, *assignments) if "torch==" in x]
        return line

    assert f"--extra-index-url {TORCH_CPU_INDEX} torch==" in torch_line()
    assert "--extra-index-url" not in torch_line("TORCH_INDEX=")


def test_git_ignores_what_make_demo_writes():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a checkout")
    # *.onnx was ignored already; the demo's other outputs (a bench CSV, tensors) were not.
    for path in ("out/report.csv", "out/values.bin"):
        assert subprocess.run(["git", "check-ignore", "--no-index", "-q", path],
                              cwd=ROOT).returncode == 0, path


def _readme_install_lines() -> List[str]:
    """The README's command lines that pip-install flash-export (comments dropped)."""
    text = (ROOT / "README.md").read_text()
    return [line.split("#")[0] for line in text.splitlines()
            if re.match(r"\s*pip install .*\bflash-export\b", line)]


def test_readme_gives_a_light_and_a_full_install_line_with_real_extras(metadata):
    offered = set(metadata.get_all("Provides-Extra"))
    lines = _readme_install_lines()
    extras = [set(m.group(1).split(",")) if (m := re.search(r"flash-export\[([^\]]+)\]", x))
              else set() for x in lines]
    runtimes = [set(re.findall(r"\b(onnxruntime(?:-gpu)?)\b", x)) for x in lines]
    assert all(e <= offered for e in extras), (extras, offered)
    assert all(len(r) <= 1 for r in runtimes), lines
    assert any(not e and r for e, r in zip(extras, runtimes)), "no light line (a runtime, no torch)"
    assert any("export" in e and r for e, r in zip(extras, runtimes)), "no full line (export)"
    for line, names in zip(lines, extras):
        if "export" in names:  # from PyPI alone, pip would take a CUDA torch
            assert TORCH_CPU_INDEX in line, line
        if "serve" in names:  # added to an install that has its onnxruntime already
            assert "onnxruntime" not in line, line
