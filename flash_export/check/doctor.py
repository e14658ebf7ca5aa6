"""`flash-export doctor`: is this install able to run the custom op, and if not, why.

The native steps (load the library with ctypes, read its build info, register it in onnxruntime
and run one tiny `com.flash_export::FlashAttention` graph; where torch is installed, also the
PyTorch operator `flash_export::attention` on the same input) run in a fresh subprocess, so a
broken library that crashes is reported as a failed check instead of killing the doctor.
"""

import ctypes
import dataclasses
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from flash_export.core.contract import DOMAIN, DOMAIN_VERSION, OP_NAME
from flash_export.core.errors import RuntimeLibraryError, first_line, summary
from flash_export.core.install import module_command, reinstall_line

_DIST_NAMES = {"onnxruntime": ("onnxruntime-gpu", "onnxruntime")}


def _upgrade_onnxruntime(minimum: str = "") -> str:
    """The pip line that upgrades the onnxruntime distribution installed (CPU or GPU build)."""
    installed = _distribution("onnxruntime")
    return f"pip install -U '{installed[0] if installed else 'onnxruntime'}{minimum}'"


def _onnxruntime_hint() -> str:
    """How to get one working onnxruntime, from what is installed now."""
    installed = [d for d in _DIST_NAMES["onnxruntime"] if _has_distribution(d)]
    if len(installed) > 1:  # one was laid over the other, and removing either broke both
        return ("onnxruntime and onnxruntime-gpu are both installed (one over the other): "
                "pip uninstall -y onnxruntime onnxruntime-gpu, then pip install onnxruntime-gpu "
                "(CUDA, runs on the CPU too) or pip install onnxruntime")
    if installed:
        return f"reinstall it: pip install --force-reinstall --no-deps {installed[0]}"
    return "pip install onnxruntime, or for CUDA pip install onnxruntime-gpu (one of the two)"


def _has_distribution(name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def _reinstall() -> str:
    return f"reinstall: {reinstall_line()}"


def _unless_setting(error: str, otherwise: str) -> str:
    """The hint for a library error: fix FLASH_EXPORT_CPU_ISA when that is what it names."""
    if "FLASH_EXPORT_CPU_ISA" in error:
        return "set FLASH_EXPORT_CPU_ISA to one of the paths the error names, or unset it"
    return otherwise


@dataclass(frozen=True)
class DoctorCheck:
    """One step of the diagnosis; `hint` says how to fix a failure."""

    name: str
    ok: bool
    detail: str
    hint: str = ""


@dataclass
class DoctorReport:
    """Versions, the native library's whereabouts and build, and the checks in order."""

    versions: Dict[str, str]
    providers: List[str]
    library_path: str
    library_source: str  # "FLASH_EXPORT_LIBRARY" or "package"
    build_info: Optional[Dict[str, Any]] = None
    runtime_api_version: Optional[int] = None
    cuda_provider_usable: Optional[bool] = None
    checks: List[DoctorCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return all(c.ok for c in self.checks)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready view."""
        d = dataclasses.asdict(self)
        d["ok"] = self.ok
        return d


def _distribution(module: str) -> Optional[Tuple[str, str]]:
    """(distribution, version) installed for `module`; None when none is."""
    for dist in _DIST_NAMES.get(module, (module,)):
        try:
            return dist, metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _version(module: str) -> str:
    found = _distribution(module)
    if found is None:
        return "not installed"
    return found[1] + ("" if found[0] == module else f" ({found[0]})")


def runtime_api_version(ort_version: str) -> Optional[int]:
    """The newest OrtApi version onnxruntime `1.N.x` serves: N (ORT_API_VERSION == minor)."""
    parts = ort_version.split(".")
    if len(parts) >= 2 and parts[0] == "1" and parts[1].isdigit():
        return int(parts[1])
    return None


def diagnose(timeout: float = 120.0) -> DoctorReport:
    """Check the install; never raises for a broken library (that is what the report says).

    Args:
        timeout: seconds allowed for the native probe subprocess.
    """
    from flash_export._version import __version__
    from flash_export.runtime.library import LIBRARY_ENV, library_path

    versions = {"flash-export": __version__, "python": platform.python_version(),
                "torch": _version("torch"), "onnx": _version("onnx"),
                "onnxruntime": _version("onnxruntime"), "numpy": _version("numpy")}
    providers, ort_version, ort_problem = [], "", "onnxruntime is not importable"
    try:
        import onnxruntime as ort

        providers = list(ort.get_available_providers())
        ort_version = ort.__version__
    except ImportError:
        pass
    except Exception as exc:  # a half-uninstalled onnxruntime imports as an empty package
        ort_problem = f"onnxruntime imports but is broken: {summary(exc)}"
    lib = Path(library_path())
    from_env = bool(os.environ.get(LIBRARY_ENV))
    report = DoctorReport(versions=versions, providers=providers, library_path=str(lib),
                          library_source=LIBRARY_ENV if from_env else "package",
                          runtime_api_version=runtime_api_version(ort_version))
    checks = report.checks
    if not ort_version:
        checks.append(DoctorCheck("onnxruntime", False, ort_problem, _onnxruntime_hint()))
        return report
    if not lib.is_file():
        hint = _reinstall()
        if from_env:
            hint = (f"{LIBRARY_ENV}={os.environ[LIBRARY_ENV]} points at a missing file: fix it "
                    f"or unset it to use the packaged library; or {_reinstall()}")
        checks.append(DoctorCheck("library found", False, f"no file at {lib}", hint))
        return report
    checks.append(DoctorCheck("library found", True, f"{lib} ({lib.stat().st_size / 1e6:.1f} MB)"))
    probe = _run_probe(lib, timeout)
    _interpret(report, probe, lib)
    return report


# long: one verdict per probe step, in the order the report lists them
def _interpret(report: DoctorReport, probe: Dict[str, Any], lib: Path) -> None:
    checks = report.checks
    if "crash" in probe:
        checks.append(DoctorCheck(f"native probe ({probe.get('step', 'start')})", False,
                                  probe["crash"],
                                  f"the library crashed the process; {_reinstall()}"))
        return
    if not probe.get("loaded"):
        checks.append(DoctorCheck("library loads (ctypes)", False,
                                  f"not a loadable shared library: {probe.get('load_error')}",
                                  f"{lib} is corrupt or built for another platform; "
                                  f"{_reinstall()}"))
        return
    checks.append(DoctorCheck("library loads (ctypes)", True, "dlopen ok"))
    if not probe.get("has_register"):
        checks.append(DoctorCheck(
            "RegisterCustomOps exported", False, f"{lib} does not export RegisterCustomOps",
            "not an onnxruntime custom-op library (symbol not exported): point "
            f"FLASH_EXPORT_LIBRARY at libflash_export.so or {_reinstall()}"))
        return
    checks.append(DoctorCheck("RegisterCustomOps exported", True, "symbol found"))
    info = probe.get("build_info")
    if info is None:
        error = probe.get("build_info_error") or "flash_export_build_info not exported"
        checks.append(DoctorCheck("build info", False, error, _unless_setting(
            error, f"not a flash-export library or an outdated one; {_reinstall()}")))
        return
    report.build_info = info
    cuda = info.get("cuda")
    archs = ", ".join(str(a) for a in info.get("cuda_archs", [])) or "-"
    checks.append(DoctorCheck(
        "build info", True, f"ORT API {info.get('ort_api_version')}, CPU kernel "
        f"{info.get('cpu_isa')}, CUDA {'built for sm ' + archs if cuda else 'not built'}"))
    wanted, have = info.get("ort_api_version"), report.runtime_api_version
    if isinstance(wanted, int) and have is not None and wanted > have:
        checks.append(DoctorCheck(
            "onnxruntime new enough", False, f"the library asks for ORT API {wanted}, "
            f"onnxruntime {report.versions['onnxruntime']} serves API {have}",
            f"runtime too old: {_upgrade_onnxruntime(f'>=1.{wanted}')}, or rebuild the library "
            "against this onnxruntime"))
        return
    checks.append(DoctorCheck("onnxruntime new enough", True,
                              f"needs API {wanted}, runtime serves {have}"))
    if not probe.get("registered"):
        err = probe.get("register_error", "")
        hint = (f"runtime too old: {_upgrade_onnxruntime()}" if "version" in err.lower()
                else _unless_setting(err, f"onnxruntime rejected the library; {_reinstall()}"))
        checks.append(DoctorCheck(f"registers {DOMAIN}::{OP_NAME}", False, err, hint))
        return
    checks.append(DoctorCheck(f"registers {DOMAIN}::{OP_NAME}", True, "session created"))
    if not probe.get("ran"):
        checks.append(DoctorCheck("runs a tiny graph (CPU)", False, probe.get("run_error", ""),
                                  f"the kernel failed on a (1, 5, 8) input; {_reinstall()}"))
        return
    err = float(probe.get("max_abs_error", math.inf))
    checks.append(DoctorCheck(
        "runs a tiny graph (CPU)", err <= 1e-4, f"max abs error {err:.2e} vs numpy attention",
        "" if err <= 1e-4 else "the kernel gives wrong results: please report a bug"))
    report.cuda_provider_usable = probe.get("cuda_provider_usable")
    op = probe.get("torch_op")
    if op is not None:  # torch is installed
        name = "torch op flash_export::attention"
        if "error" in op:
            checks.append(DoctorCheck(name, False, op["error"], _unless_setting(
                op["error"], "the PyTorch operator failed on a (1, 5, 8) input (onnxruntime is "
                f"unaffected); {_reinstall()}")))
            return
        op_err = float(op.get("max_abs_error", math.inf))
        checks.append(DoctorCheck(
            name, op_err <= 1e-4, f"max abs error {op_err:.2e} vs numpy attention; runs on "
            f"{op.get('threads')}",
            "" if op_err <= 1e-4 else "the operator gives wrong results: please report a bug"))


def _run_probe(lib: Path, timeout: float) -> Dict[str, Any]:
    cmd = module_command("flash_export.check.doctor", "--probe", str(lib.absolute()))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"crash": f"the probe hung for {timeout:.0f} s"}
    steps = [ln[len("step "):] for ln in proc.stdout.splitlines() if ln.startswith("step ")]
    results = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not results:
        how = (f"killed by signal {-proc.returncode}" if proc.returncode < 0
               else f"exit code {proc.returncode}")
        tail = (proc.stderr.strip().splitlines() or [""])[-1]
        return {"crash": f"probe {how} {tail}".strip(), "step": steps[-1] if steps else "start"}
    result: Dict[str, Any] = json.loads(results[-1])
    return result


# --------------------------------------------------------------------------- the probe process


def _tiny_model() -> Any:
    """X (1, 5, 8) -> FlashAttention(x, x, x), 2 heads, chunk 2: q = k = v, so order is moot."""
    from onnx import TensorProto, helper

    node = helper.make_node(OP_NAME, ["x", "x", "x"], ["y"], domain=DOMAIN, num_heads=2,
                            chunk_size=2, causal=0, scale=0.5)
    graph = helper.make_graph(
        [node], "doctor", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 8])])
    return helper.make_model(graph, ir_version=10, opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)])


def _numpy_attention(x: Any, heads: int, scale: float) -> Any:
    import numpy as np

    b, n, e = x.shape
    h = x.reshape(b, n, heads, e // heads).transpose(0, 2, 1, 3).astype(np.float64)
    s = h @ h.transpose(0, 1, 3, 2) * scale  # (B, H, L, L)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ h).transpose(0, 2, 1, 3).reshape(b, n, e)


def _cuda_usable() -> bool:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    graph = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["b"])], "cuda_probe",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        session = ort.InferenceSession(model.SerializeToString(), so,
                                       providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    except Exception:  # any failure means the CUDA provider is not usable here
        return False
    return session.get_providers()[0] == "CUDAExecutionProvider"


# long: the probe's steps in order, each recording how far it got before a crash
def probe(lib: str) -> Dict[str, Any]:
    """Load `lib`, read its build info, register it and run the tiny graph; report each step."""
    out: Dict[str, Any] = {"loaded": False}

    def step(name: str) -> None:
        print(f"step {name}", flush=True)

    step("dlopen")
    try:
        handle = ctypes.CDLL(lib)
    except OSError as exc:
        out["load_error"] = str(exc)
        return out
    out["loaded"] = True
    out["has_register"] = hasattr(handle, "RegisterCustomOps")
    if not out["has_register"]:
        return out
    step("flash_export_build_info")
    from flash_export.runtime.native import NativeLibrary

    try:  # checks every C entry point and the params layout too
        native = NativeLibrary(lib)
    except RuntimeLibraryError as exc:
        out["build_info_error"] = str(exc)
        return out
    try:
        out["build_info"] = native.build_info()
    except (ValueError, TypeError) as exc:  # not JSON, or a null pointer
        out["build_info_error"] = f"flash_export_build_info returned no JSON: {exc}"
        return out
    step("register")
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        so.register_custom_ops_library(lib)
        session = ort.InferenceSession(_tiny_model().SerializeToString(), so,
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own pybind types
        out["registered"] = False
        out["register_error"] = first_line(exc)
        return out
    out["registered"] = True
    step("run")
    x = np.random.default_rng(0).standard_normal((1, 5, 8), dtype=np.float32)
    try:
        (y,) = session.run(["y"], {"x": x})
    except Exception as exc:  # onnxruntime raises its own pybind types
        out["ran"] = False
        out["run_error"] = first_line(exc)
        return out
    out["ran"] = True
    out["max_abs_error"] = float(np.abs(y - _numpy_attention(x, 2, 0.5)).max())
    step("cuda provider")
    out["cuda_provider_usable"] = _cuda_usable()
    if importlib.util.find_spec("torch") is not None:
        step("torch op")
        out["torch_op"] = _torch_op(x)
    return out


def _torch_op(x: Any) -> Dict[str, Any]:
    """flash_export::attention on x (as the tiny graph: q = k = v, 2 heads, chunk 2, scale 0.5)."""
    import numpy as np

    try:
        import torch

        from flash_export.nn.torch_op import register, thread_pool

        register()
        t = torch.from_numpy(x)
        with torch.inference_mode():
            y = torch.ops.flash_export.attention(t, t, t, None, 2, 2, False, 0.5).numpy()
        return {"max_abs_error": float(np.abs(y - _numpy_attention(x, 2, 0.5)).max()),
                "threads": thread_pool()}
    except Exception as exc:  # torch and the ctypes binding raise many kinds: one line each
        return {"error": first_line(exc)}


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--probe":
        print("usage: python -m flash_export.check.doctor --probe LIBRARY", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(probe(sys.argv[2])), flush=True)
