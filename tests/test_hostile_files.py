"""Hostile artifacts: external-data references that escape the model folder, untrusted .pt files.

Every fixture is built here from one tiny exported model, converted to external data with
`onnx.external_data_helper` and then tampered with. `create_session`, `validate` and `benchmark`
must reject each with one clear ArtifactError line before onnxruntime opens anything.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Set

import onnx
import onnxruntime
import pytest
import torch
from click.testing import CliRunner
from onnx import external_data_helper

from flash_export.bench.benchmark import BenchConfig, benchmark
from flash_export.check.validate import validate
from flash_export.cli.main import main
from flash_export.core.errors import ArtifactError, ExportError
from flash_export.export import onnx as onnx_export
from flash_export.export.onnx import export_onnx
from flash_export.export.torchscript import export_torchscript
from flash_export.nn.attention import FlashAttention
from flash_export.runtime import create_session

DATA = "weights.data"


def _tiny() -> FlashAttention:
    torch.manual_seed(0)
    return FlashAttention(32, 4, 8).eval()


@pytest.fixture(scope="module")
def plain_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small standard-target export, every tensor inline."""
    return export_onnx(_tiny(), tmp_path_factory.mktemp("plain") / "tiny.onnx",
                       target="standard")


def _external_copy(plain: Path, folder: Path, location: str = DATA) -> Path:
    """`plain` re-saved into `folder` with every initializer in one external file `location`."""
    folder.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(plain))
    external_data_helper.convert_model_to_external_data(
        model, all_tensors_to_one_file=True, location=location)
    out = folder / "model.onnx"
    onnx.save_model(model, str(out))
    return out


def _relocate(model_file: Path, location: str) -> None:
    """Point every external tensor of `model_file` at `location` (the tampering step)."""
    model = onnx.load(str(model_file), load_external_data=False)
    for tensor in external_data_helper._get_all_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(model_file))


def _outside(root: Path) -> Path:
    """A folder beside the model folder holding a copy of the real data (the 'secret')."""
    out = root / "outside"
    out.mkdir(exist_ok=True)
    return out


def _dotdot(plain: Path, root: Path) -> Path:
    model = _external_copy(plain, root / "m")
    shutil.move(str(root / "m" / DATA), _outside(root) / "x.data")
    shutil.copy(_outside(root) / "x.data", root / "x.data")
    _relocate(model, "../x.data")
    return model


def _nested_dotdot(plain: Path, root: Path) -> Path:
    model = _external_copy(plain, root / "m")
    (root / "m" / "a").mkdir()
    shutil.move(str(root / "m" / DATA), root / "x.data")
    _relocate(model, "a/../../x.data")
    return model


def _absolute(plain: Path, root: Path) -> Path:
    model = _external_copy(plain, root / "m")
    secret = _outside(root) / "passwd"
    shutil.move(str(root / "m" / DATA), secret)
    _relocate(model, str(secret.resolve()))  # an /etc/passwd-style absolute path
    return model


def _symlinked_file(plain: Path, root: Path) -> Path:
    model = _external_copy(plain, root / "m")
    secret = _outside(root) / DATA
    shutil.move(str(root / "m" / DATA), secret)
    (root / "m" / DATA).symlink_to(secret)
    return model


def _symlinked_folder(plain: Path, root: Path) -> Path:
    model = _external_copy(plain, root / "m")
    shutil.move(str(root / "m" / DATA), _outside(root) / DATA)
    (root / "m" / "sub").symlink_to(_outside(root), target_is_directory=True)
    _relocate(model, f"sub/{DATA}")
    return model


def _hardlinked_file(plain: Path, root: Path) -> Path:
    model = _external_copy(plain, root / "m")
    secret = _outside(root) / DATA
    shutil.move(str(root / "m" / DATA), secret)
    os.link(secret, root / "m" / DATA)
    return model


def _past_end(plain: Path, root: Path) -> Path:
    model_file = _external_copy(plain, root / "m")
    model = onnx.load(str(model_file), load_external_data=False)
    size = (root / "m" / DATA).stat().st_size
    tensor = next(t for t in external_data_helper._get_all_tensors(model)
                  if external_data_helper.uses_external_data(t))
    fields = {e.key: e for e in tensor.external_data}
    fields["offset"].value, fields["length"].value = str(size - 4), "4096"
    onnx.save_model(model, str(model_file))
    return model_file


HOSTILE: Dict[str, Callable[[Path, Path], Path]] = {
    "dotdot": _dotdot,
    "nested-dotdot": _nested_dotdot,
    "absolute": _absolute,
    "symlinked-file": _symlinked_file,
    "symlinked-folder": _symlinked_folder,
    "hardlinked-file": _hardlinked_file,
    "offset-past-end": _past_end,
}
# The words the one-line message must carry, so a user sees why.
REASONS = {"dotdot": "'..'", "nested-dotdot": "'..'", "absolute": "absolute",
           "symlinked-file": "symlink", "symlinked-folder": "symlink",
           "hardlinked-file": "hard link", "offset-past-end": "reads bytes"}


def _no_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any onnxruntime session construction fail the test: rejection must come first."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"onnxruntime.InferenceSession was reached with {args[:1]}")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)


def _entry_points() -> Dict[str, Callable[[Path], object]]:
    return {
        "create_session": lambda p: create_session(p).run(None, {}),
        "validate": lambda p: validate(p, seq=[1], batch=[1]),
        "bench": lambda p: benchmark(p, config=BenchConfig(seqs=(4,), warmup=0, iters=1,
                                                           memory=False)),
    }


@pytest.mark.parametrize("entry", list(_entry_points()), ids=list(_entry_points()))
@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_hostile_external_data_rejected(plain_onnx: Path, tmp_path: Path, case: str, entry: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    model = HOSTILE[case](plain_onnx, tmp_path)
    _no_onnxruntime(monkeypatch)
    with pytest.raises(ArtifactError) as info:
        _entry_points()[entry](model)
    message = str(info.value)
    assert "\n" not in message
    assert REASONS[case] in message, message


def test_onnxruntime_alone_follows_links(plain_onnx: Path, tmp_path: Path) -> None:
    """Why our own checks exist: stock onnxruntime loads a hard-linked data file."""
    model = _hardlinked_file(plain_onnx, tmp_path)
    onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("entry", ["create_session", "validate"])
def test_clean_external_data_still_loads(plain_onnx: Path, tmp_path: Path, entry: str) -> None:
    """The checks reject the tampering, not external data itself."""
    (tmp_path / "m" / "sub").mkdir(parents=True)
    model = _external_copy(plain_onnx, tmp_path / "m", location=f"sub/{DATA}")
    assert (tmp_path / "m" / "sub" / DATA).is_file()
    if entry == "create_session":
        create_session(model)
    else:
        assert validate(model, seq=[1], batch=[1]).passed


# --------------------------------------------------------------------------- export containment


@pytest.mark.parametrize("name", ["v1..2.onnx", "a\\b.onnx"], ids=["dotdot", "backslash"])
def test_export_refuses_data_names_onnx_rejects(tmp_path: Path, name: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """onnx refuses data file names with '..' or a backslash: a typed ExportError, no files."""
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    with pytest.raises(ExportError):
        export_onnx(_tiny(), tmp_path / name, target="standard")
    assert list(tmp_path.iterdir()) == []


def _snapshot(folder: Path) -> Set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.is_dir() else set()


@pytest.mark.parametrize("name", ["plain", "odd"], ids=["plain", "odd-characters"])
def test_export_writes_only_beside_its_target(tmp_path: Path, name: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    stem = "model" if name == "plain" else "we ird ;$(touch x) 'ü' #1.v2~"
    out_dir, cwd, tmp_root = tmp_path / "out", tmp_path / "cwd", tmp_path / "tmp"
    for folder in (out_dir, cwd, tmp_root):
        folder.mkdir()
    (out_dir / "existing.txt").write_text("keep")
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("TMPDIR", str(tmp_root))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_root))
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    before = {f: _snapshot(f) for f in (tmp_path, cwd, tmp_root)}

    target = out_dir / f"{stem}.onnx"
    export_onnx(_tiny(), target, target="standard")

    new = _snapshot(out_dir) - {"existing.txt"}
    data = [n for n in new if n.endswith(".data")]
    assert len(data) == 1 and re.fullmatch(re.escape(target.name) + r"\.[0-9a-f]{16}\.data",
                                           data[0]), new
    assert new == {target.name, data[0], target.name + ".manifest.json"}, new
    assert _snapshot(cwd) == before[cwd] and _snapshot(tmp_root) == before[tmp_root]
    assert {p for p in _snapshot(tmp_path) if not p.startswith(("out", "cwd", "tmp"))} == \
        {p for p in before[tmp_path] if not p.startswith(("out", "cwd", "tmp"))}
    model = onnx.load(str(target), load_external_data=False)
    locations = {e.value for t in external_data_helper._get_all_tensors(model)
                 for e in t.external_data if e.key == "location"}
    assert locations == {data[0]}
    create_session(target)  # our own checks accept what we export


# --------------------------------------------------------------------------- untrusted TorchScript


@pytest.fixture(scope="module")
def tampered_pt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported .pt whose bytes changed after export (the trust store no longer knows it)."""
    path = export_torchscript(_tiny(), tmp_path_factory.mktemp("pt") / "tiny.pt")
    with open(path, "ab") as f:
        f.write(b"\0")
    return path


def _jit_load_guard(monkeypatch: pytest.MonkeyPatch) -> List[str]:
    calls: List[str] = []
    real = torch.jit.load

    def spy(path: object, *args: object, **kwargs: object) -> object:
        calls.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(torch.jit, "load", spy)
    return calls


@pytest.mark.parametrize("command", ["validate", "bench"])
def test_cli_refuses_pt_of_unknown_origin_without_trust(tampered_pt: Path, command: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _jit_load_guard(monkeypatch)
    extra = ["--seq", "1", "--batch", "1"] if command == "validate" else \
        ["--seq", "4", "--iters", "1", "--warmup", "0", "--no-memory"]
    result = CliRunner().invoke(main, [command, str(tampered_pt), *extra])
    assert result.exit_code == 1, result.output
    assert "not exported by you here" in result.output and "--trust" in result.output
    assert "Traceback" not in result.output
    assert calls == []


def test_cli_trust_loads_pt_of_unknown_origin(tampered_pt: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _jit_load_guard(monkeypatch)
    result = CliRunner().invoke(main, ["validate", str(tampered_pt), "--seq", "1", "--batch",
                                       "1", "--trust"])
    assert calls, result.output


def test_cli_subprocess_rejects_hostile_onnx(plain_onnx: Path, tmp_path: Path) -> None:
    model = _hardlinked_file(plain_onnx, tmp_path)
    exe = Path(sys.executable).with_name("flash-export")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "flash_export.cli"]
    proc = subprocess.run([*cmd, "validate", str(model), "--seq", "1", "--batch", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "hard link" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
