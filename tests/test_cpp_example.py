"""The C++ program in examples/cpp loads our TorchScript archives and matches Python."""

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from flash_export import ModelSpec, export_torchscript
from flash_export.tensor_io import read_tensor, write_tensor

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")


@pytest.fixture(scope="session")
def cpp_program(tmp_path_factory) -> Path:
    build = tmp_path_factory.mktemp("cpp-build")
    prefix = torch.utils.cmake_prefix_path
    subprocess.run(["cmake", "-S", str(ROOT / "examples" / "cpp"), "-B", str(build),
                    f"-DCMAKE_PREFIX_PATH={prefix}", "-DCMAKE_BUILD_TYPE=Release"],
                   check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True)
    return build / "flash_attention_run"


SPECS = {
    "flash-attention": ModelSpec(embed=128, heads=8, chunk=64),
    "causal": ModelSpec(embed=64, heads=4, chunk=16, causal=True, seed=3),
    "encoder": ModelSpec(embed=64, heads=4, chunk=16, model=str(ROOT / "models/encoder.py:build")),
}


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("name", list(SPECS), ids=list(SPECS))
def test_cpp_loader_matches_python(cpp_program, tmp_path, name, masked):
    spec = SPECS[name]
    model = spec.build()
    pt = export_torchscript(model, tmp_path / "model.pt", spec=spec)
    g = torch.Generator().manual_seed(7)
    v, k, q = (torch.randn(2, n, spec.embed, generator=g) for n in (77, 77, 30))
    mask = torch.rand(2, 1, 30, 77, generator=g) > 0.3
    files = []
    for label, t in (("values", v), ("keys", k), ("queries", q)):
        write_tensor(tmp_path / f"{label}.bin", t.numpy())
        files.append(str(tmp_path / f"{label}.bin"))
    args = [str(cpp_program), str(pt), *files, str(tmp_path / "out.bin")]
    if masked:
        write_tensor(tmp_path / "mask.bin", mask.numpy())
        args.append(str(tmp_path / "mask.bin"))
    # One thread on both sides: how a GEMM splits over threads moves the last bits, and the bound
    # below is for the same arithmetic, not for two thread counts.
    run = subprocess.run(args, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            expected = model(v, k, q, mask if masked else None).numpy()
    finally:
        torch.set_num_threads(threads)
    got = read_tensor(tmp_path / "out.bin")
    assert got.shape == expected.shape
    assert float(np.abs(got - expected).max()) <= 1e-6


def test_cpp_loader_reports_a_bad_input_file(cpp_program, tmp_path):
    pt = export_torchscript(ModelSpec(embed=32, heads=4, chunk=8).build(), tmp_path / "m.pt",
                            spec=ModelSpec(embed=32, heads=4, chunk=8))
    (tmp_path / "bad.bin").write_bytes(b"not a tensor")
    run = subprocess.run([str(cpp_program), str(pt), *(str(tmp_path / "bad.bin"),) * 3,
                          str(tmp_path / "o.bin")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "not a flash-export tensor file" in run.stderr


def test_tensor_files_round_trip(tmp_path):
    a = np.random.default_rng(0).standard_normal((2, 3, 5)).astype(np.float32)
    write_tensor(tmp_path / "a.bin", a)
    assert np.array_equal(read_tensor(tmp_path / "a.bin"), a)
    with pytest.raises(ValueError, match="float32 or bool"):
        write_tensor(tmp_path / "b.bin", a.astype(np.float64))
