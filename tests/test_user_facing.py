"""What a new user runs into (issue 24, findings 14 and 16): subprocesses that import this same
flash-export from any folder, messages that name the fix, and a README whose commands leave
nothing in a clone that git would show.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner

from flash_export import FlashAttention
from flash_export.cli.main import main
from flash_export.core import install
from flash_export.core.errors import ExportError, summary
from flash_export.export.onnx import export_onnx

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- finding 14


@pytest.mark.parametrize("python", ["3.11+", "3.10"])
def test_module_commands_import_the_installed_package_not_the_current_folder(
        shadowing_folder, monkeypatch, python):
    """Both forms of the command (`-P` from 3.11; on 3.10 the child drops sys.path[0] itself):
    the doctor's probe module prints its usage, not the shadow's ImportError."""
    if python == "3.10":
        monkeypatch.setattr(sys, "version_info", (3, 10, 0))
    run = subprocess.run(install.module_command("flash_export.check.doctor"), capture_output=True,
                         text=True, cwd=shadowing_folder, timeout=60)
    assert run.returncode == 2, run.stderr
    assert "usage: python -m flash_export.check.doctor --probe LIBRARY" in run.stderr


def test_the_bench_memory_worker_runs_from_a_folder_that_shadows_the_package(
        shadowing_folder, monkeypatch):
    from flash_export.bench.memory import measure_memory
    from flash_export.bench.runners import Job
    from flash_export.check.doctor import _tiny_model

    graph = shadowing_folder / "tiny.onnx"
    onnx.save(_tiny_model(), str(graph))
    monkeypatch.chdir(shadowing_folder)
    memory = measure_memory(Job(backend="custom", device="cpu", batch=1, seq_q=5, seq_k=5,
                                embed=8, threads=1, dtype="float32", file=graph.name))
    assert "error" not in memory and memory["peak_rss_mb"] >= 0, memory


# --------------------------------------------------------------------------- finding 16


def test_exporting_an_unconverted_multihead_attention_model_points_at_convert(tmp_path):
    model = torch.nn.TransformerEncoderLayer(32, 4, batch_first=True).eval()
    x = torch.randn(2, 7, 32)
    with pytest.raises(ExportError, match=r"contains no FlashAttention layer; it has 1 "
                                          r"nn.MultiheadAttention \(self_attn\): convert it "
                                          r"first, model = flash_export.convert\(model\)"):
        export_onnx(model, tmp_path / "m.onnx", args=(x,))


def test_weights_holding_a_whole_pickled_model_say_to_save_its_state_dict(tmp_path):
    torch.save(FlashAttention(32, 4, 8), tmp_path / "whole.pt")
    result = CliRunner().invoke(main, ["onnx", "--embed", "32", "--heads", "4", "--chunk", "8",
                                       "--weights", str(tmp_path / "whole.pt"),
                                       str(tmp_path / "m.onnx")])
    assert result.exit_code == 1, result.output
    (line,) = result.output.strip().splitlines()
    assert "holds a pickled flash_export.nn.attention.FlashAttention, not a state dict" in line
    assert line.endswith("save the weights with torch.save(model.state_dict(), PATH) and pass "
                         "that file"), line
    assert "Weights only load failed" not in line


def test_a_long_error_is_cut_at_a_word():
    text = summary(RuntimeError("word " * 200))
    assert text.endswith(" word ...") and len(text) <= 404


def test_a_misspelt_zoo_model_lists_the_zoo(tmp_path):
    result = CliRunner().invoke(main, ["onnx", "--model", "flash_export.models.gtp:build",
                                       str(tmp_path / "m.onnx")])
    assert result.exit_code == 1, result.output
    assert "flash_export.models.gtp is not a model of the zoo (did you mean " \
           "flash_export.models.gpt:build?)" in result.output
    for name in ("gpt", "bert", "vit", "encoder"):
        assert f"flash_export.models.{name}:build" in result.output


def _readme_outputs() -> list:
    """Every file name the README's commands and code write or read (the suffixes flash-export
    writes, what --json, --csv, --plot and `triton` name, and transformers' `save_pretrained`
    folders), and the manifest beside each artifact."""
    text = (ROOT / "README.md").read_text()
    code = re.findall(r"```(?:bash|python)\n(.*?)```", text, flags=re.S)
    code += [s for s in re.findall(r"`([^`\n]+)`", text) if s.startswith("flash-export ")]
    names = set()
    for block in code:
        block = block.replace("\\\n", " ")
        names.update(m.group(0) for m in re.finditer(
            r"(?<![\w/$.-])[\w.-][\w./-]*\.(?:onnx|pt2|pth|pt|ts|png|json|csv|bin|npz|data)\b",
            block))
        names.update(m.group(1) for m in re.finditer(r"--(?:json|csv|plot) (\S+)", block))
        names.update(m.group(1) for m in re.finditer(r"flash-export triton \S+ (\S+)", block))
        names.update(m.group(1) for m in re.finditer(r"save_pretrained\(\"([^\"]+)\"\)", block))
    names = {n for n in names if n != "-" and not n.isupper()}  # REPO_DIR: a placeholder
    artifacts = {n + ".manifest.json" for n in names if n.endswith((".onnx", ".pt", ".pt2"))}
    return sorted(names | artifacts)


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                    reason="needs git and a checkout")
def test_following_the_readme_in_a_clone_leaves_only_what_git_ignores():
    """No untracked manifest or report in the clone, and no tracked file (docs/bench.png)
    overwritten: every path the README's commands write is one git ignores."""
    outputs = _readme_outputs()
    assert {"out/flash_attention.onnx.manifest.json", "out/bench.png"} <= set(outputs), outputs
    tracked = set(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.splitlines())
    assert not tracked & set(outputs), tracked & set(outputs)
    shown = [p for p in outputs if subprocess.run(["git", "check-ignore", "--no-index", "-q", p],
                                                  cwd=ROOT).returncode != 0]
    assert not shown, f"git would show these files the README writes: {shown}"
