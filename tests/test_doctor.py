"""flash-export doctor: a healthy install exits 0; a broken library exits 1 with a precise hint."""

import ctypes.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from flash_export.check.doctor import DoctorReport, _interpret, runtime_api_version
from flash_export.cli.main import main
from flash_export.runtime import LIBRARY_ENV, library_path


def entry_point() -> list:
    """The installed console script when present, else `python -m flash_export.cli`."""
    beside = Path(sys.executable).parent / "flash-export"
    if beside.is_file():
        return [str(beside)]
    return [sys.executable, "-m", "flash_export.cli"]


def run_doctor(library=None, *args, cwd=None, env=None):
    env = dict(os.environ if env is None else env)
    env.pop(LIBRARY_ENV, None)
    if library is not None:
        env[LIBRARY_ENV] = str(library)
    return subprocess.run([*entry_point(), "doctor", *args], capture_output=True, text=True,
                          timeout=180, env=env, cwd=cwd)


def _system_library_without_entry_point(tmp_path: Path) -> Path:
    found = ctypes.util.find_library("z") or ctypes.util.find_library("m")
    candidates = [Path(p) / found for p in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu",
                                             "/lib64", "/usr/lib", "/lib")] if found else []
    for c in candidates:
        if c.is_file():
            dst = tmp_path / "libnot_flash_export.so"
            shutil.copy(c, dst)
            return dst
    pytest.skip("no system shared library found to copy")


@pytest.mark.skipif(not Path(library_path()).is_file(),
                    reason=f"native library not built at {library_path()}")
def test_healthy_install_exits_0_even_run_from_a_folder_that_shadows_the_package(
        shadowing_folder):
    """The probe subprocess imports the installed flash-export, never `./flash_export`."""
    out = shadowing_folder / "doctor.json"
    proc = run_doctor(os.environ.get(LIBRARY_ENV), "--json", str(out), cwd=shadowing_folder)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for text in ("flash-export", "torch", "onnx", "onnxruntime", "providers", "library",
                 "ORT API", "CPU kernel", "[ok] registers com.flash_export::FlashAttention",
                 "[ok] runs a tiny graph", "[ok] torch op flash_export::attention"):
        assert text in proc.stdout
    data = json.loads(out.read_text())
    assert data["ok"] is True and data["build_info"]["op_domain"] == "com.flash_export"


@pytest.mark.parametrize("make, check, hint", [
    (lambda d: d / "missing.so", "[FAIL] library found",
     f"{LIBRARY_ENV}="),
    (lambda d: (d / "text.so").write_text("not a library") and d / "text.so",
     "[FAIL] library loads (ctypes)", "reinstall: pip install"),
    (_system_library_without_entry_point, "[FAIL] RegisterCustomOps exported",
     "symbol not exported"),
], ids=["missing-file", "text-file", "library-without-RegisterCustomOps"])
def test_broken_library_exits_1_with_hint(tmp_path, make, check, hint):
    proc = run_doctor(make(tmp_path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert check in proc.stdout
    assert "hint:" in proc.stdout and hint in proc.stdout


def test_a_broken_onnxruntime_gets_a_hint_not_a_traceback(tmp_path):
    """What uninstalling one of onnxruntime and onnxruntime-gpu leaves when one was laid over the
    other: an `onnxruntime` that imports and holds nothing (here an empty package first on the
    path)."""
    (tmp_path / "onnxruntime").mkdir()
    (tmp_path / "onnxruntime" / "__init__.py").write_text("")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = run_doctor(None, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert "[FAIL] onnxruntime" in proc.stdout and "imports but is broken" in proc.stdout
    assert "hint: reinstall it: pip install --force-reinstall --no-deps onnxruntime" in \
        proc.stdout


def test_runtime_api_version_from_release():
    assert runtime_api_version("1.31.1") == 31
    assert runtime_api_version("1.17.0") == 17
    assert runtime_api_version("2.0") is None


def _report() -> DoctorReport:
    return DoctorReport(versions={"onnxruntime": "1.16.3"}, providers=["CPUExecutionProvider"],
                        library_path="/x/libflash_export.so", library_source="package",
                        runtime_api_version=16)


@pytest.mark.parametrize("probe, failed, hint", [
    ({"loaded": True, "has_register": True,
      "build_info": {"ort_api_version": 21, "cuda": False, "cpu_isa": "avx2"}},
     "onnxruntime new enough", "runtime too old: pip install -U 'onnxruntime-gpu>=1.21'"),
    ({"crash": "probe killed by signal 11", "step": "register"},
     "native probe (register)", "crashed"),
    ({"loaded": True, "has_register": True, "build_info": None,
      "build_info_error": "flash_export_build_info is not exported"},
     "build info", "not a flash-export library"),
], ids=["runtime-too-old", "crash", "no-build-info"])
def test_interpret_probe_failures(probe, failed, hint):
    report = _report()
    _interpret(report, probe, Path(report.library_path))
    assert not report.ok
    bad = [c for c in report.checks if not c.ok]
    assert bad[-1].name == failed and hint in bad[-1].hint


def test_the_torch_op_check_says_where_the_kernel_runs_and_fails_on_an_error():
    healthy = {"loaded": True, "has_register": True, "registered": True, "ran": True,
               "max_abs_error": 1e-7,
               "build_info": {"ort_api_version": 16, "cuda": False, "cpu_isa": "avx2"}}
    report = _report()
    _interpret(report, {**healthy, "torch_op": {"max_abs_error": 2e-7,
                                                 "threads": "torch's OpenMP team"}},
               Path(report.library_path))
    assert report.ok and "runs on torch's OpenMP team" in report.checks[-1].detail
    report = _report()
    _interpret(report, {**healthy, "torch_op": {"error": "RuntimeLibraryError: no symbol"}},
               Path(report.library_path))
    assert not report.ok
    assert report.checks[-1].name == "torch op flash_export::attention"
    assert "onnxruntime is unaffected" in report.checks[-1].hint
    report = _report()
    _interpret(report, healthy, Path(report.library_path))  # no torch: no such check
    assert report.ok and "torch op" not in " ".join(c.name for c in report.checks)


def test_cli_doctor_in_process_runs():
    result = CliRunner().invoke(main, ["doctor"])
    assert result.exit_code in (0, 1)
    assert "onnxruntime" in result.output and "library" in result.output
