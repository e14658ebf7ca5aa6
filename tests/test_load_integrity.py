"""What is checked is what runs: loading under a racing attacker, the trust store's location,
temp files an attacker can plant, and an io_spec edited to get past `--max-memory`.

Each test is one finding of issue 24 ("Loading and trust"), tried as the attacker would.
"""

import json
import os
import threading
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import onnx
import pytest

from flash_export.artifacts import files as artifact
from flash_export.artifacts.trust import (
    TRUST_STORE_ENV,
    provenance,
    require_provenance,
    trust_store,
)
from flash_export.bench.benchmark import BenchConfig, benchmark
from flash_export.check.validate import validate
from flash_export.core.errors import ArtifactError, FlashExportError
from flash_export.export import onnx as onnx_export
from flash_export.export.onnx import export_onnx
from flash_export.nn.spec import ModelSpec
from flash_export.runtime import create_session

SPEC = ModelSpec(embed=32, heads=4, chunk=8, seed=5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SPEC exported with its weights in an external data file (threshold 0)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
        return export_onnx(SPEC.build(), tmp_path_factory.mktemp("m") / "m.onnx",
                           target="standard", spec=SPEC)


def _copy(exported: Path, folder: Path) -> Path:
    """The export and its data file, copied into `folder`."""
    folder.mkdir()
    for f in exported.parent.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder / exported.name


def _feed() -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 9, 32), dtype=np.float32)
    return {"values": x, "keys": x.copy(), "queries": x[:, :4].copy()}


# --------------------------------------------------------------------------- finding 7


def _swap(data: Path, good: bytes, evil: bytes, how: str, stop: threading.Event,
          swaps: List[int]) -> None:
    """Replace `data`'s bytes with `evil` and back until `stop`, as another process could."""
    spare = data.with_name(".swap")
    while not stop.is_set():
        for body in (evil, good):
            if how == "rename":  # a fresh file renamed over the name the graph gives
                spare.write_bytes(body)
                os.replace(spare, data)
            else:  # the same file rewritten in place
                with open(data, "r+b") as f:
                    f.write(body)
            swaps[0] += 1
        stop.wait(0.002 if how == "rename" else 0.1)  # in place: let loads through between


@pytest.mark.parametrize("how", ["rename", "in place"])
def test_a_load_never_runs_data_swapped_in_while_it_loads(exported, tmp_path, how):
    """A thread swaps the data file under a loading process: every load either refuses or runs
    the exact bytes that were checked against the graph's pinned hash (48 of 200 loads ran the
    swapped-in weights when onnxruntime reopened the data file by name)."""
    model = _copy(exported, tmp_path / "m")
    (data,) = model.parent.glob("m.onnx.*.data")
    good = data.read_bytes()
    evil = (np.frombuffer(good, dtype=np.float32) * 0.5).tobytes()  # other weights, same layout
    feed = _feed()
    expected = create_session(model).run(None, feed)[0]

    stop, swaps = threading.Event(), [0]
    thread = threading.Thread(target=_swap, args=(data, good, evil, how, stop, swaps))
    thread.start()
    ran_other, refused, ran = 0, 0, 0
    deadline = time.monotonic() + 120
    try:
        # Until both outcomes were seen beside enough swaps (at least 60 loads), whatever the
        # machine's load does to the timing of the two threads.
        for i in range(400):
            if i >= 60 and swaps[0] > 20 and ran and refused or time.monotonic() > deadline:
                break
            try:
                out = create_session(model).run(None, feed)[0]
            except ArtifactError:
                refused += 1
                continue
            ran += 1
            ran_other += not np.array_equal(out, expected)
    finally:
        stop.set()
        thread.join()
    assert swaps[0] > 20, "the swapping thread barely ran"
    assert ran_other == 0, f"{ran_other} of {ran} loads ran data that was not checked"
    assert ran > 0 and refused > 0, (ran, refused)


def test_onnxruntime_never_opens_the_data_file_by_name(exported, tmp_path, monkeypatch):
    """The session gets the graph and its data from the descriptors that were checked: with the
    data file renamed away the moment the checks are done, the session still loads and runs."""
    from flash_export.artifacts import safety

    model = _copy(exported, tmp_path / "m")
    folder = model.parent
    (data,) = folder.glob("m.onnx.*.data")
    expected = create_session(model).run(None, _feed())[0]
    real = safety.open_onnx

    def checked_then_moved(path: object) -> object:
        opened = real(path)
        data.rename(folder / "gone")
        (folder / "m.onnx").write_bytes(b"not a graph any more")
        return opened

    monkeypatch.setattr(safety, "open_onnx", checked_then_moved)
    out = create_session(model).run(None, _feed())[0]
    np.testing.assert_array_equal(out, expected)


# --------------------------------------------------------------------------- finding 8


@pytest.fixture()
def downloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A downloaded folder shipping a file and a trust store that vouches for it."""
    folder = tmp_path / "download"
    folder.mkdir()
    program = folder / "model.pt"
    program.write_bytes(b"PK\x03\x04 a hostile program")
    digest = artifact.sha256_file(program)
    shipped = folder / ".local" / "share" / "flash-export" / "trusted"
    shipped.mkdir(parents=True)
    (shipped / f"{digest}.json").write_text(json.dumps({"sha256": digest}))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(folder)
    return program


def test_a_relative_xdg_data_home_is_ignored_as_the_xdg_spec_says(downloaded, monkeypatch):
    monkeypatch.delenv(TRUST_STORE_ENV)
    monkeypatch.setenv("XDG_DATA_HOME", ".local/share")
    assert trust_store() == Path(os.environ["HOME"]) / ".local/share/flash-export/trusted"
    assert provenance(downloaded.name).source == "unverified"
    with pytest.raises(ArtifactError, match="not exported by you here"):
        require_provenance(downloaded.name)
    monkeypatch.setenv("XDG_DATA_HOME", str(downloaded.parent / ".local/share"))  # absolute
    assert provenance(downloaded.name).source == "trust store"


def test_a_relative_trust_store_setting_is_refused_saying_why(downloaded, monkeypatch):
    monkeypatch.setenv(TRUST_STORE_ENV, ".local/share/flash-export/trusted")
    for call in (trust_store, lambda: provenance(downloaded.name),
                 lambda: require_provenance(downloaded.name)):
        with pytest.raises(FlashExportError, match=f"{TRUST_STORE_ENV} must be an absolute "
                                                   "path"):
            call()


# --------------------------------------------------------------------------- finding 9


def test_writing_a_manifest_never_follows_a_link_planted_at_a_temp_name(tmp_path):
    """Every name write_atomically could write through is planted with a link to a victim file;
    the victim stays untouched and the manifest is written whole."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = tmp_path / "m.onnx.manifest.json"
    planted = [tmp_path / f".{target.name}.{os.getpid()}.tmp",
               tmp_path / f".{target.name}.tmp", tmp_path / f"{target.name}.tmp"]
    for link in planted:
        link.symlink_to(victim)
    artifact.write_atomically(target, "{}\n")
    assert victim.read_text() == "precious"
    assert target.read_text() == "{}\n" and not target.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [victim.name, target.name, *(p.name for p in planted)])


def test_atomic_writes_leave_files_readable_as_the_umask_allows(tmp_path):
    old = os.umask(0o022)
    try:
        artifact.write_atomically(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


# --------------------------------------------------------------------------- finding 10


@pytest.fixture()
def static_batch(exported, tmp_path) -> Path:
    """The good export with its io_spec edited to say dim 0 is a static 8000 (the graph's batch
    stays symbolic), external data beside it."""
    src = exported
    model = onnx.load(str(src), load_external_data=False)
    meta = {p.key: p for p in model.metadata_props}
    io = json.loads(meta["io_spec"].value)
    for dims in [t["dims"] for t in io["inputs"]] + list(io.get("output_dims", {}).values()):
        dims[:] = [8000 if d == "batch" else d for d in dims]  # consistently, as an attacker would
    io["sizes"].pop("batch")
    io["batch"] = None
    meta["io_spec"].value = json.dumps(io)
    out = tmp_path / "m.onnx"
    onnx.save(model, str(out))
    for f in src.parent.glob("m.onnx.*.data"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    return out


def test_an_io_spec_with_a_static_dim_where_the_graph_has_a_symbol_is_refused(static_batch):
    """Before the fix `validate --max-memory 0.25` ran such a file at batch 8000 (6.8 GB peak for
    the zoo GPT) and printed "validation passed"; here the sizes are kept small on purpose."""
    message = r"the io_spec says values has size 8000 on axis 0, the graph's is symbolic"
    with pytest.raises(ArtifactError, match=message):
        validate(static_batch, seq=[3], batch=[1], max_memory=1 << 28)
    with pytest.raises(ArtifactError, match=message):
        benchmark(static_batch, config=BenchConfig(seqs=(3,), iters=1, warmup=0, memory=False,
                                                   max_memory=1 << 28))
    with pytest.raises(ArtifactError, match=message):
        from flash_export.runtime import session_io

        session_io(create_session(static_batch))
