"""The model zoo end to end: every model exports (custom and standard), validates, benches and
runs in a service with onnxruntime and numpy only."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Tuple

import pytest
from _service_check import SERVICE_CHECK  # a sibling module

from flash_export.bench.benchmark import BenchConfig, benchmark
from flash_export.check.validate import validate
from flash_export.core.io_spec import IOSpec
from flash_export.export.onnx import export_onnx
from flash_export.models import ZOO
from flash_export.nn.model_io import resolve_io
from flash_export.nn.spec import ModelSpec
from flash_export.runtime import library_path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("custom", "standard")
# Small but real: 2 layers, 4 heads of 8, chunk 8 so lengths 7 and 20 cross chunk boundaries.
SPECS = {name: ModelSpec(embed=32, heads=4, chunk=8, seed=5, model=f"flash_export.models.{name}"
                         ":build") for name in ZOO}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Dict[Tuple[str, str], Path]:
    folder = tmp_path_factory.mktemp("zoo")
    out = {}
    for name, spec in SPECS.items():
        for target in TARGETS:
            if target == "custom" and not Path(library_path()).is_file():
                continue
            out[name, target] = export_onnx(spec.build(), folder / f"{name}-{target}.onnx",
                                            target=target, spec=spec)
    return out


def _artifact(exported: Dict[Tuple[str, str], Path], name: str, target: str) -> Path:
    if (name, target) not in exported:
        pytest.skip(f"native library not built at {library_path()}")
    return exported[name, target]


@pytest.mark.parametrize("name", ZOO)
def test_every_zoo_model_declares_its_inputs(name: str) -> None:
    io = resolve_io(SPECS[name].build())
    assert isinstance(io, IOSpec) and io.outputs
    assert IOSpec.from_json(io.to_json()) == io


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", ZOO)
def test_every_zoo_model_validates(exported, name: str, target: str) -> None:
    report = validate(_artifact(exported, name, target), seq=[1, 7, 20], batch=[2])
    assert report.passed, report.failure_lines()
    assert report.spec == SPECS[name] and report.spec_source == "artifact"
    outputs = {c.output for b in report.backends for c in b.cases}
    assert outputs == set(resolve_io(SPECS[name].build()).outputs)


@pytest.mark.parametrize("name", ZOO)
def test_every_zoo_models_standard_graph_validates_in_openvino_too(exported, name: str) -> None:
    """A second runtime (`validate --runtime openvino`): the same cases, the same rule."""
    report = validate(_artifact(exported, name, "standard"), seq=[1, 7, 20], batch=[2],
                      runtime="openvino")
    assert report.passed, report.failure_lines()
    assert [b.name for b in report.backends] == ["eager", "openvino:standard"]
    assert report.provider == "openvino CPU" and all(b.cases for b in report.backends)


@pytest.mark.parametrize("name", ZOO)
def test_every_zoo_model_benches(exported, name: str) -> None:
    report = benchmark(_artifact(exported, name, "standard"),
                       config=BenchConfig(seqs=(16,), iters=2, warmup=1, memory=False))
    rows = {r.backend: r for r in report.rows}
    assert set(rows) == {"standard", "eager", "sdpa"}
    assert all(r.status == "ok" and r.p50_ms and r.gflops_per_s for r in rows.values()), rows


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", ZOO)
def test_every_zoo_graph_runs_in_a_service_without_torch(exported, name: str,
                                                         target: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", SERVICE_CHECK,
                          str(_artifact(exported, name, target))],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "service ok" in run.stdout


def test_the_readme_zoo_flow_works_from_another_folder(tmp_path: Path) -> None:
    """flash-export onnx --model flash_export.models.gpt:build, then validate and bench."""
    exe = Path(sys.executable).with_name("flash-export")
    cli = [str(exe)] if exe.is_file() else [sys.executable, "-m", "flash_export.cli"]
    (tmp_path / "out").mkdir()
    small = ["--embed", "32", "--heads", "4", "--chunk", "8"]
    steps = [["onnx", "--model", "flash_export.models.gpt:build", *small, "--target", "standard",
              "out/gpt.onnx"],
             ["validate", "out/gpt.onnx", "--seq", "1,7,20", "--batch", "2"],
             ["bench", "out/gpt.onnx", "--seq", "16", "--iters", "2", "--warmup", "1",
              "--no-memory"]]
    outputs = []
    for step in steps:
        run = subprocess.run([*cli, *step], capture_output=True, text=True, timeout=600,
                             cwd=tmp_path)
        assert run.returncode == 0, (step, run.stdout[-1500:], run.stderr[-1500:])
        outputs.append(run.stdout)
    assert "check: " in outputs[0] and "validation passed" in outputs[1]
    assert "standard" in outputs[2] and "eager" in outputs[2]
