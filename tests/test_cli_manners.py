"""CLI conventions users of Click, Polygraphy and optimum-cli expect, each proven on the real CLI.

-h, --debug/--quiet/--verbose anywhere, `--json -` on stdout, `python -m flash_export`, usage
errors before torch loads, output suffixes, FLASH_EXPORT_CPU_ISA checked, a validate table whose
bound is read against the right column, help that does not claim defaults the artifact overrides,
plot axes named by the lengths run, hints that work from a clone, and recorded model files and
checkpoints that resolve from any folder.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from flash_export import FlashAttention, ModelSpec
from flash_export.cli.main import main
from flash_export.core.errors import ExportError, ModelError, RuntimeLibraryError
from flash_export.core.install import (
    InstallSource,
    install_source,
    pip_install_line,
    reinstall_line,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--embed", "32", "--heads", "4", "--chunk", "8"]
COMMANDS = ["torchscript", "onnx", "validate", "bench", "doctor", "serve", "triton"]


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    out = tmp_path_factory.mktemp("manners") / "tiny.onnx"
    result = _invoke("onnx", *TINY, "--no-check", str(out))
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_dash_h_is_help_for_the_group_and_every_command(command):
    args = ["-h"] if command is None else [command, "-h"]
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Usage: ") and "-h, --help" in result.stdout


@pytest.mark.parametrize("before", [True, False], ids=["before-command", "after-command"])
def test_debug_shows_the_traceback_before_or_after_the_command(tmp_path, before):
    rest = ["torchscript", "--model", f"{tmp_path / 'missing.py'}:build", str(tmp_path / "x.pt")]
    result = _invoke(*(["--debug", *rest] if before else [*rest, "--debug"]))
    assert result.exit_code == 1 and isinstance(result.exception, ModelError)
    plain = _invoke(*rest)
    assert plain.exit_code == 1 and plain.stderr.startswith("error: model file not found")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_quiet_and_verbose_and_refuses_both(command):
    for flag in ("-q", "--quiet", "-v", "--verbose"):
        help_text = _invoke(command, flag, "--help")
        assert help_text.exit_code == 0, (flag, help_text.output)
        assert "-q, --quiet" in help_text.stdout and "-v, --verbose" in help_text.stdout
    both = _invoke(command, "-q", "-v")
    assert both.exit_code == 2 and "exclude each other" in both.stderr


def test_quiet_export_prints_nothing_and_verbose_validate_prints_each_case(tmp_path, tiny_onnx):
    out = tmp_path / "q.pt"
    quiet = _invoke("-q", "torchscript", *TINY, str(out))
    assert quiet.exit_code == 0 and out.is_file()
    assert quiet.stdout == "" and quiet.stderr == ""
    loud = _invoke("torchscript", *TINY, str(out))
    assert loud.stdout.startswith(f"wrote {out}")

    args = ["validate", str(tiny_onnx), "--seq", "5,9", "--batch", "1"]
    quiet = _invoke(*args, "--quiet")
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stdout == "validation passed\n" and quiet.stderr == ""
    default = _invoke(*args)
    verbose = _invoke(*args, "--verbose")
    assert verbose.exit_code == 0, verbose.output
    # one row per backend by default ("worst of N"), one per case with -v
    (row,) = [line for line in default.stdout.splitlines() if line.startswith("onnx:custom ")]
    cases = int(row.split(" worst of ")[1].split(":")[0])
    assert cases >= 3
    assert sum(line.startswith("onnx:custom ") for line in verbose.stdout.splitlines()) == cases
    assert "validating [" in verbose.stderr  # a line per step instead of a bar


def test_doctor_quiet_prints_nothing_when_healthy():
    result = _invoke("doctor", "-q")
    assert result.exit_code == 0, result.output
    assert result.output == ""


@pytest.mark.parametrize("command", ["validate", "bench", "doctor"])
def test_json_dash_writes_the_report_alone_to_stdout(tiny_onnx, command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = {"validate": ["validate", str(tiny_onnx), "--seq", "5", "--batch", "1"],
            "bench": ["bench", *TINY, "--seq", "8", "--iters", "1", "--warmup", "0",
                      "--backends", "eager", "--no-memory"],
            "doctor": ["doctor"]}[command]
    result = _invoke(*args, "--json", "-")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # nothing but the JSON on stdout
    assert isinstance(report, dict) and report
    assert not Path("-").exists()
    assert result.stderr.strip()  # the human lines moved to stderr


def test_csv_dash_writes_the_rows_to_stdout():
    result = _invoke("bench", *TINY, "--seq", "8", "--iters", "1", "--warmup", "0",
                     "--backends", "eager", "--no-memory", "--csv", "-")
    assert result.exit_code == 0, result.output
    header, row = result.stdout.splitlines()
    assert header.startswith("backend,") and row.startswith("eager,")


def test_python_dash_m_runs_the_cli(tmp_path):
    version = subprocess.run([sys.executable, "-m", "flash_export", "--version"],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert version.returncode == 0 and "flash-export" in version.stdout
    usage = subprocess.run([sys.executable, "-m", "flash_export", "onnx"], capture_output=True,
                           text=True, timeout=120, cwd=tmp_path)
    assert usage.returncode == 2 and "Usage: python -m flash_export onnx" in usage.stderr


def test_heads_not_dividing_embed_is_a_usage_error_before_torch_loads(tmp_path):
    code = ("import sys\n"
            "from flash_export.cli.main import main\n"
            "try:\n"
            "    main(['torchscript', '--embed', '30', '--heads', '4', 'x.pt'],\n"
            "         prog_name='flash-export')\n"
            "except SystemExit as exc:\n"
            "    print('exit', exc.code, 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.stdout.strip() == "exit 2 False", proc.stdout + proc.stderr
    assert "heads (4) must divide embed (30)" in proc.stderr and "ValueError" not in proc.stderr


@pytest.mark.parametrize("command,name", [("onnx", "x.pt"), ("onnx", "x"),
                                          ("torchscript", "x.onnx"), ("onnx", "-")])
def test_export_refuses_an_output_name_of_another_kind(tmp_path, command, name):
    out = tmp_path / name if name != "-" else Path("-")
    result = _invoke(command, *TINY, str(out))
    assert result.exit_code == 2, result.output
    assert not list(tmp_path.iterdir())


def test_library_exporters_refuse_another_kinds_suffix(tmp_path):
    from flash_export import export_onnx, export_torchscript

    model = FlashAttention(32, 4, 8).eval()
    with pytest.raises(ExportError, match=r"must be written to a file ending in \.onnx"):
        export_onnx(model, tmp_path / "x.pt")
    with pytest.raises(ExportError, match=r"ending in \.pt"):
        export_torchscript(model, tmp_path / "x.onnx")
    assert not list(tmp_path.iterdir())


def _with_isa(value: str, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLASH_EXPORT_CPU_ISA": value}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)


def test_an_unknown_cpu_isa_setting_is_refused_not_ignored(tiny_onnx):
    session = (
        "import numpy as np, onnxruntime as ort\n"
        "from flash_export.runtime import library_path\n"
        "options = ort.SessionOptions()\n"
        "options.register_custom_ops_library(library_path())\n"
        f"s = ort.InferenceSession(r'{tiny_onnx}', options, providers=['CPUExecutionProvider'])\n"
        "x = np.ones((1, 5, 32), np.float32)\n"
        "print(s.run(None, {'values': x, 'keys': x, 'queries': x})[0].shape)\n")
    bad = _with_isa("bogus", session)
    assert bad.returncode != 0
    assert "FLASH_EXPORT_CPU_ISA=bogus names no CPU kernel path" in bad.stderr
    assert _with_isa("portable", session).stdout.strip() == "(1, 5, 32)"

    ctypes_path = ("from flash_export.runtime.native import NativeLibrary\n"
                   "from flash_export.runtime import library_path\n"
                   "NativeLibrary(library_path())\n")
    refused = _with_isa("avx-512", ctypes_path)
    assert refused.returncode == 1 and RuntimeLibraryError.__name__ in refused.stderr
    assert "use portable, avx2, avx512 or amx" in refused.stderr

    doctor = subprocess.run([sys.executable, "-m", "flash_export", "doctor"],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "FLASH_EXPORT_CPU_ISA": "bogus"})
    assert doctor.returncode == 1
    assert "hint: set FLASH_EXPORT_CPU_ISA to one of the paths" in doctor.stdout


def test_validate_reads_the_bound_against_the_max_abs_column(tiny_onnx, tmp_path):
    weights = tmp_path / "w.pt"
    torch.manual_seed(3)
    torch.save(FlashAttention(32, 4, 8).state_dict(), weights)
    result = _invoke("validate", str(tiny_onnx), "--weights", str(weights), "--seq", "5",
                     "--batch", "1")
    # The artifact holds seed-0 weights, not these: the point here is the report's wording.
    lines = result.stdout.splitlines()
    reference = next(line for line in lines if line.startswith("reference:"))
    assert f"weights {weights}" in reference and "seed" not in reference
    header = next(line for line in lines if line.startswith("backend"))
    columns = header.split()
    assert columns[columns.index("max") + 2:columns.index("max") + 5] == ["abs", "bound", "used"]
    assert columns.index("rel") > columns.index("used")

    passing = _invoke("validate", str(tiny_onnx), "--seq", "5", "--batch", "1")
    row = next(line for line in passing.stdout.splitlines() if line.startswith("onnx:custom "))
    fields = row.split()
    max_abs, bound, used = float(fields[-7]), float(fields[-6]), fields[-5]
    assert max_abs <= bound and used.endswith("%") and float(used[:-1]) <= 100
    assert abs(100 * max_abs / bound - float(used[:-1])) <= 1  # 3-digit columns


@pytest.mark.parametrize("command", ["validate", "bench"])
def test_help_does_not_claim_defaults_the_artifact_overrides(command):
    text = " ".join(_invoke(command, "--help").stdout.split())
    assert "default: 128]" not in text and "default: 8]" not in text
    assert "Default: the artifact's (128 without one)" in text
    export_help = " ".join(_invoke("onnx", "--help").stdout.split())
    assert "default: 128" in export_help


def test_bench_plot_names_the_lengths_run_on_its_log_axes():
    pytest.importorskip("matplotlib")
    from flash_export.bench.benchmark import BenchConfig, benchmark
    from flash_export.bench.files import figure

    report = benchmark(spec=ModelSpec(embed=16, heads=2, chunk=8),
                       config=BenchConfig(seqs=(600, 1000, 2000), backends=("eager",), warmup=0,
                                          iters=1, memory=False))
    fig = figure(report)
    fig.canvas.draw()
    for ax in fig.axes:
        assert ax.get_xscale() == "log"
        assert [t.get_text() for t in ax.get_xticklabels()] == ["600", "1000", "2000"]
        assert not [t.get_text() for t in ax.get_xticklabels(minor=True) if t.get_text()]


def test_hints_name_what_works_from_this_install():
    source = install_source()
    direct = ROOT / "flash_export"
    if source.kind == "editable":
        assert Path(source.location or "") == ROOT and direct.is_dir()
        assert reinstall_line().startswith(f"pip install --no-deps -e {ROOT}")
    # The plot hint installs matplotlib itself, which works from a clone, a wheel or an index;
    # there is no flash-export on a package index to take `flash-export[plot]` from.
    assert pip_install_line("plot") == "pip install 'matplotlib>=3.7'"
    wheel = InstallSource("wheel", "/tmp/dist/flash_export-0.1.0-py3-none-any.whl")
    assert wheel.requirement("plot") == "'/tmp/dist/flash_export-0.1.0-py3-none-any.whl[plot]'"
    assert InstallSource("editable", "/src/fe").requirement() == "-e /src/fe"
    assert InstallSource("index").requirement("gpu") == "'flash-export[gpu]'"


def _model_file(folder: Path) -> Path:
    (folder / "models").mkdir(parents=True)
    path = folder / "models" / "mine.py"
    path.write_text("from flash_export import FlashAttention\n\n\n"
                    "def build(embed_size, heads, chunk_size, causal=False):\n"
                    "    return FlashAttention(embed_size, heads, chunk_size, causal=causal)\n")
    return path


def test_recorded_model_file_and_weights_work_from_any_folder(tmp_path, monkeypatch):
    export_dir, elsewhere, shipped = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    _model_file(export_dir)
    elsewhere.mkdir()
    torch.manual_seed(1)
    torch.save(FlashAttention(32, 4, 8).state_dict(), export_dir / "ckpt.pt")
    monkeypatch.chdir(export_dir)  # the paths are typed relative, as users do
    result = _invoke("onnx", *TINY, "--model", "models/mine.py:build", "--weights", "ckpt.pt",
                     "--no-check", "x.onnx")
    assert result.exit_code == 0, result.output

    monkeypatch.chdir(elsewhere)
    check = ["--trust", "--seq", "5", "--batch", "1"]
    ok = _invoke("validate", str(export_dir / "x.onnx"), *check)
    assert ok.exit_code == 0, ok.output
    assert f"weights {export_dir / 'ckpt.pt'}" in ok.stdout

    # The folder shipped whole to another place: the files are found beside the artifact.
    shipped.mkdir()
    for name in ("x.onnx", "models/mine.py", "ckpt.pt"):
        shutil.copy(export_dir / name, shipped / Path(name).name)
    shutil.rmtree(export_dir)
    moved = _invoke("validate", str(shipped / "x.onnx"), *check)
    assert moved.exit_code == 0, moved.output

    # A file that changed since the export is not the reference: refused, by its hash.
    with open(shipped / "ckpt.pt", "ab") as f:
        f.write(b"\0")
    changed = _invoke("validate", str(shipped / "x.onnx"), *check)
    assert changed.exit_code == 1
    assert "is not the file the artifact was exported from" in changed.stderr


def test_a_spec_records_absolute_paths_and_hashes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _model_file(tmp_path)
    spec = ModelSpec(embed=32, heads=4, chunk=8, model="models/mine.py:build").pinned()
    assert spec.model == f"{tmp_path / 'models' / 'mine.py'}:build"
    assert spec.model_sha256 is not None and len(spec.model_sha256) == 64
    with pytest.raises(ValueError, match="64 lowercase hex"):
        ModelSpec(model_sha256="abc")


def test_an_export_command_without_torch_says_how_to_add_the_export_extra(tmp_path):
    """A light install (flash-export[cpu]) has no torch: one line naming the fix, no traceback."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from flash_export.cli.main import run\n"
            "sys.argv = ['flash-export', 'onnx', 'x.onnx']\n"
            "run()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: onnx needs torch, which this install lacks: pip install")
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in proc.stderr
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("command", ["serve", "triton"])
def test_every_serving_option_states_its_default(command):
    for param in main.commands[command].params:
        if isinstance(param, click.Option) and param.name not in ("help", "debug", "quiet",
                                                                    "verbose"):
            assert param.show_default or "Default" in (param.help or ""), param.name


def test_serve_without_ray_says_how_to_install_the_serve_extra(tiny_onnx):
    block = ("import sys\n"
             "class _Block:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] == 'ray':\n"
             "            raise ImportError(name + ' is blocked', name=name)\n"
             "sys.meta_path.insert(0, _Block())\n"
             "from flash_export.cli.main import run\n"
             f"sys.argv = ['flash-export', 'serve', {str(tiny_onnx)!r}]\n"
             "run()\n")
    done = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == ("error: serve needs Ray Serve (ray is missing): pip install "
                                   "'flash-export[serve]' (Ray Serve)")


def test_serve_refuses_a_bad_model_name_as_a_usage_error(tiny_onnx):
    result = _invoke("serve", str(tiny_onnx), "--name", "a/b")
    assert result.exit_code == 2 and "model name 'a/b'" in result.stderr
