"""The flash-export CLI: parses, forwards, prints one line on errors, exits 0/1/2."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from flash_export import __version__, load_torchscript
from flash_export.cli.main import main

ROOT = Path(__file__).resolve().parents[1]


def _entry_point() -> list:
    script = Path(sys.executable).parent / "flash-export"
    if script.is_file():
        return [str(script)]
    found = shutil.which("flash-export")
    if found:
        return [found]
    pytest.skip("the flash-export console script is not installed (pip install .)")


def test_version_and_help():
    runner = CliRunner()
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output
    result = runner.invoke(main, ["torchscript", "--help"])
    assert result.exit_code == 0
    assert "default: 128" in result.output and "default: 64" in result.output


def test_torchscript_command_writes_an_archive_that_rebuilds_exactly(tmp_path):
    out = tmp_path / "fa.pt"
    result = CliRunner().invoke(main, ["torchscript", "--embed", "64", "--heads", "4",
                                       "--chunk", "16", "--causal", "--seed", "5", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output and " MB) in " in result.output
    module, meta = load_torchscript(out)
    from flash_export import ModelSpec
    spec = ModelSpec.from_json(meta["model_spec"])
    assert (spec.embed, spec.heads, spec.chunk, spec.causal, spec.seed) == (64, 4, 16, True, 5)
    x = torch.randn(1, 10, 64)
    with torch.no_grad():
        assert torch.equal(module(x, x.clone(), x.clone()), spec.build()(x, x.clone(), x.clone()))


def test_model_and_weights_options(tmp_path):
    weights = tmp_path / "w.pt"
    from flash_export import ModelSpec
    model = ModelSpec(embed=32, heads=2, chunk=8, model="flash_export.models.encoder:build").build()
    torch.save(model.state_dict(), weights)
    result = CliRunner().invoke(main, [
        "torchscript", "--embed", "32", "--heads", "2", "--chunk", "8",
        "--model", "flash_export.models.encoder:build", "--weights", str(weights),
        str(tmp_path / "enc.pt")])
    assert result.exit_code == 0, result.output


def test_library_error_is_one_line_and_exit_1(tmp_path):
    torch.save({"nonsense": torch.zeros(1)}, tmp_path / "w.pt")
    result = CliRunner().invoke(main, ["torchscript", "--weights", str(tmp_path / "w.pt"),
                                       str(tmp_path / "x.pt")])
    assert result.exit_code == 1
    assert result.output.startswith("error: weights in") and result.output.count("\n") == 1
    assert not (tmp_path / "x.pt").exists()


def test_debug_shows_the_traceback(tmp_path):
    result = CliRunner().invoke(main, ["--debug", "torchscript", "--model",
                                       f"{tmp_path / 'missing.py'}:build", str(tmp_path / "x.pt")])
    assert result.exit_code == 1
    assert "ModelError" in repr(result.exception)


def test_heads_not_dividing_embed_is_a_usage_error():
    result = CliRunner().invoke(main, ["torchscript", "--embed", "30", "--heads", "4", "x.pt"])
    assert result.exit_code == 2
    assert "heads (4) must divide embed (30)" in result.output


@pytest.mark.parametrize("args", [["torchscript"], ["torchscript", "--heads", "0", "x.pt"],
                                  ["nosuchcommand"]], ids=["no-out", "heads-0", "unknown"])
def test_usage_errors_exit_2(args):
    assert CliRunner().invoke(main, args).exit_code == 2


def test_installed_entry_point_runs_in_a_subprocess(tmp_path):
    cmd = _entry_point()
    run = subprocess.run([*cmd, "torchscript", "--embed", "32", "--heads", "4",
                          str(tmp_path / "a.pt")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "a.pt").is_file() and "wrote" in run.stdout
    bad = subprocess.run([*cmd, "torchscript", "--model", f"{tmp_path / 'missing.py'}:build",
                          str(tmp_path / "b.pt")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ")
    assert "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1
