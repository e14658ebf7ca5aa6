"""The C++ program in examples/cpp loads our TorchScript archives and .pt2 packages (with the
libtorch shim for the native kernel) and matches Python."""

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from flash_export import ModelSpec, export_torchscript
from flash_export.artifacts.tensor_io import read_tensor, write_tensor
from flash_export.core.feeds import make_feed
from flash_export.nn.model_io import call, resolve_io

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")


@pytest.fixture(scope="session")
def cpp_program(cpp_build) -> Path:
    return cpp_build / "flash_attention_run"


SPECS = {
    "flash-attention": ModelSpec(embed=128, heads=8, chunk=64),
    "causal": ModelSpec(embed=64, heads=4, chunk=16, causal=True, seed=3),
    "encoder": ModelSpec(embed=64, heads=4, chunk=16, model="flash_export.models.encoder:build"),
    "gpt": ModelSpec(embed=64, heads=4, chunk=16, model="flash_export.models.gpt:build"),
}


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("name", list(SPECS), ids=list(SPECS))
def test_cpp_loader_matches_python(cpp_program, tmp_path, name, masked):
    spec = SPECS[name]
    model = spec.build()
    pt = export_torchscript(model, tmp_path / "model.pt", spec=spec)
    io = resolve_io(model, mask=True)
    sizes = io.clamp({"batch": 2, "seq": 77, "k_len": 77, "q_len": 30})
    feed = make_feed(io, sizes, seed=7, padded=masked)
    files = []
    for t in io.inputs:  # in forward order; an optional mask only when masked
        if t.role == "attention" and not masked:
            continue
        write_tensor(tmp_path / f"{t.name}.bin", feed[t.name])
        files.append(str(tmp_path / f"{t.name}.bin"))
    # One thread on both sides: how a GEMM splits over threads moves the last bits, and the bound
    # below is for the same arithmetic, not for two thread counts.
    run = subprocess.run([str(cpp_program), str(pt), str(tmp_path / "out.bin"), *files],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        inputs = {t.name: torch.from_numpy(feed[t.name]) for t in io.inputs
                  if t.role != "attention" or masked}
        expected = call(model, inputs)[0].numpy()
    finally:
        torch.set_num_threads(threads)
    got = read_tensor(tmp_path / "out.bin")
    assert got.shape == expected.shape
    assert float(np.abs(got - expected).max()) <= 1e-6 * max(1.0, float(np.abs(expected).max()))


def test_cpp_loader_reports_a_bad_input_file(cpp_program, tmp_path):
    pt = export_torchscript(ModelSpec(embed=32, heads=4, chunk=8).build(), tmp_path / "m.pt",
                            spec=ModelSpec(embed=32, heads=4, chunk=8))
    (tmp_path / "bad.bin").write_bytes(b"not a tensor")
    run = subprocess.run([str(cpp_program), str(pt), str(tmp_path / "o.bin"),
                          *(str(tmp_path / "bad.bin"),) * 3], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 1 and "not a flash-export tensor file" in run.stderr


def test_tensor_files_round_trip(tmp_path):
    a = np.random.default_rng(0).standard_normal((2, 3, 5)).astype(np.float32)
    write_tensor(tmp_path / "a.bin", a)
    assert np.array_equal(read_tensor(tmp_path / "a.bin"), a)
    ids = np.arange(6, dtype=np.int64).reshape(2, 3)
    write_tensor(tmp_path / "ids.bin", ids)
    assert np.array_equal(read_tensor(tmp_path / "ids.bin"), ids)
    with pytest.raises(ValueError, match="float32, bool or int64"):
        write_tensor(tmp_path / "b.bin", a.astype(np.float64))


# --------------------------------------------------------------------------- the native kernel

def _attention_files(tmp_path, b, lq, lk, embed, masked):
    """values, keys, queries (and a mask) as tensor files, in forward order."""
    g = torch.Generator().manual_seed(lq * 1000 + lk)
    tensors = {"values": torch.randn(b, lk, embed, generator=g),
               "keys": torch.randn(b, lk, embed, generator=g),
               "queries": torch.randn(b, lq, embed, generator=g)}
    if masked:
        mask = torch.rand(b, 1, lq, lk, generator=g) > 0.25
        mask[0, 0, 0] = False  # a row that sees no key
        tensors["mask"] = mask
    for name, t in tensors.items():
        write_tensor(tmp_path / f"{name}.bin", t.numpy())
    return tensors, [str(tmp_path / f"{name}.bin") for name in tensors]


def _check_against_float64(model, tensors, got):
    from helpers import assert_matches_reference

    from flash_export import reference_forward

    args = [tensors[n] for n in ("values", "keys", "queries")] + [tensors.get("mask")]
    reference = reference_forward(model, *args)
    baseline = reference_forward(model, *args, dtype=torch.float32)
    assert_matches_reference(torch.tensor(got), reference, baseline)


@pytest.mark.parametrize("causal,masked,lq,lk", [(True, True, 37, 90), (False, False, 65, 7)],
                         ids=["causal-mask-37x90", "full-65x7"])
def test_cpp_runs_a_torchscript_native_archive_with_the_shim(cpp_program, shim_library, tmp_path,
                                                             causal, masked, lq, lk):
    spec = ModelSpec(embed=64, heads=4, chunk=16, causal=causal, seed=5)
    model = spec.build()
    pt = export_torchscript(model, tmp_path / "native.pt", spec=spec, attention="native")
    tensors, files = _attention_files(tmp_path, 2, lq, lk, 64, masked)
    run = subprocess.run([str(cpp_program), "--library", str(shim_library), str(pt),
                          str(tmp_path / "out.bin"), *files], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    _check_against_float64(model, tensors, read_tensor(tmp_path / "out.bin"))


def test_cpp_without_the_shim_names_the_missing_op(cpp_program, tmp_path):
    spec = ModelSpec(embed=32, heads=4, chunk=8)
    pt = export_torchscript(spec.build(), tmp_path / "native.pt", spec=spec, attention="native")
    _, files = _attention_files(tmp_path, 1, 5, 5, 32, False)
    run = subprocess.run([str(cpp_program), str(pt), str(tmp_path / "out.bin"), *files],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "flash_export::attention" in run.stderr


@pytest.mark.parametrize("lq,lk", [(29, 71), (100, 100)], ids=["29x71", "100x100"])
def test_cpp_runs_the_pt2_package_with_the_shim(cpp_program, shim_library, pt2_package, tmp_path,
                                                lq, lk):
    path, spec = pt2_package  # causal, with a mask input; exported at other lengths
    tensors, files = _attention_files(tmp_path, 3, lq, lk, spec.embed, True)
    run = subprocess.run([str(cpp_program), "--library", str(shim_library), str(path),
                          str(tmp_path / "out.bin"), *files], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    _check_against_float64(spec.build(), tensors, read_tensor(tmp_path / "out.bin"))


def test_cpp_reports_a_library_it_cannot_load(cpp_program, tmp_path):
    _, files = _attention_files(tmp_path, 1, 3, 3, 32, False)
    run = subprocess.run([str(cpp_program), "--library", str(tmp_path / "missing.so"),
                          str(tmp_path / "m.pt2"), str(tmp_path / "out.bin"), *files],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "cannot load" in run.stderr and "missing.so" in run.stderr
