"""The artifact-kind registry: a new kind is one module plus one `register_kind` call.

The toy kind below is the whole of such a module: a `.toy` file holds the flash-export metadata
of a model and its program is that model rebuilt from the recorded spec. Registered in-process,
it is exported, recognised, read, loaded, validated and benchmarked through the same entry
points as ONNX, TorchScript and `.pt2`, with no other change to the library.
"""

import json
from pathlib import Path
from typing import Any, Dict, List

import pytest

from flash_export.artifacts.kinds import (
    KINDS,
    ArtifactKind,
    artifact_kind,
    kind_of,
    register_kind,
    require_kind,
)
from flash_export.artifacts.manifest import atomic_write
from flash_export.artifacts.metadata import read_metadata
from flash_export.artifacts.trust import require_provenance
from flash_export.bench.benchmark import BenchConfig, benchmark
from flash_export.check.parity import torch_backend
from flash_export.check.validate import validate
from flash_export.core.errors import ArtifactError, ExportError
from flash_export.export.prepare import prepare
from flash_export.nn.spec import ModelSpec

CALLS: List[str] = []


def _metadata(path: Path) -> Dict[str, str]:
    CALLS.append("metadata")
    meta: Dict[str, str] = json.loads(Path(path).read_text())
    return meta


def _export(model: Any, path: Path, *, spec: ModelSpec) -> Path:
    CALLS.append("exporter")
    require_kind(path, "toy")
    meta = prepare(model, model.eval(), spec=spec, io=None, args=None, kwargs=None, mask=False,
                   dtype="float32", artifact="toy").meta
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(meta)))


def _load(path: Path, *, trust: bool, expect_sha256: Any) -> Any:
    CALLS.append("loader")
    origin = require_provenance(path, expect_sha256=expect_sha256, trust=trust)
    meta = _metadata(path)
    return ModelSpec.from_json(meta["model_spec"]).build().eval(), meta, origin


def _backend(program: Any, source: str, io: Any, meta: Dict[str, str], dtype: str) -> Any:
    CALLS.append("validate_backend")
    import torch

    return torch_backend("toy", program.to(getattr(torch, dtype)), source, io)


TOY = ArtifactKind("toy", "a toy artifact", (".toy",), metadata=_metadata, exporter=_export,
                   loader=_load, validate_backend=_backend, bench_backend=lambda meta: "toy",
                   bench_backends=("toy",))


@pytest.fixture()
def toy_kind():
    register_kind(TOY)
    CALLS.clear()
    yield TOY
    del KINDS["toy"]


def test_a_registered_kind_is_exported_read_loaded_validated_and_benched(toy_kind, tmp_path):
    spec = ModelSpec(embed=16, heads=2, chunk=4)
    path = kind_of(tmp_path / "m.toy").handler("exporter")(spec.build(), tmp_path / "m.toy",
                                                          spec=spec)
    assert artifact_kind(path) == "toy" and CALLS == ["exporter"]
    assert read_metadata(path)["chunk_size"] == "4"
    report = validate(path, seq=[5], batch=[1])
    assert report.passed and report.kind == "toy"
    assert [b.name for b in report.backends] == ["eager", "toy"]
    bench = benchmark(path, config=BenchConfig(seqs=(8,), backends=("toy",), warmup=0, iters=1,
                                               memory=False))
    assert [(r.backend, r.status) for r in bench.rows] == [("toy", "ok")]
    assert CALLS.count("loader") == 2 and "validate_backend" in CALLS


def test_unregistered_suffixes_and_claimed_ones_are_refused(toy_kind, tmp_path):
    with pytest.raises(ArtifactError, match=r"expected a \.onnx, \.pt, \.pt2 or \.toy artifact"):
        artifact_kind(tmp_path / "m.bin")
    with pytest.raises(ExportError, match=r"a toy artifact must be written to a file ending in "
                                          r"\.toy"):
        require_kind(tmp_path / "m.onnx", "toy")
    with pytest.raises(ValueError, match=r"suffix \.onnx is already onnx's"):
        register_kind(ArtifactKind("other", "another", (".onnx",), metadata=None, exporter=None))
