"""`validate --runtime openvino`: a standard-target graph checked in OpenVINO (float32) by the
same cases and rule as onnxruntime; a wrong graph fails there too, and the targets OpenVINO
cannot read are refused by name before anything runs. (Every zoo model: tests/test_zoo.py.)"""

import onnx
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("openvino", reason="the openvino extra (pip install -e '.[openvino]'; make "
                    "test installs it)")

from flash_export.check.validate import validate  # noqa: E402
from flash_export.cli.main import main  # noqa: E402
from flash_export.core.errors import FlashExportError  # noqa: E402
from flash_export.export.onnx import export_onnx  # noqa: E402
from flash_export.nn.attention import FlashAttention  # noqa: E402


@pytest.fixture(scope="module")
def standard(tmp_path_factory):
    torch.manual_seed(0)
    return export_onnx(FlashAttention(64, 4, 16).eval(),
                       tmp_path_factory.mktemp("ov") / "fa.onnx", target="standard", mask=True)


def test_the_cli_validates_a_standard_graph_in_openvino_at_new_lengths(standard):
    result = CliRunner().invoke(main, ["validate", str(standard), "--runtime", "openvino",
                                       "--seq", "1,15,17,53"])
    assert result.exit_code == 0, result.output
    assert "provider openvino CPU" in result.output and "openvino:standard" in result.output


def test_openvino_fails_a_graph_whose_weights_were_edited(standard, tmp_path):
    proto = onnx.load(str(standard))
    weight = max(proto.graph.initializer, key=lambda t: t.ByteSize())
    values = onnx.numpy_helper.to_array(weight).copy()
    values.flat[::7] += 0.1
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    edited = tmp_path / "edited.onnx"
    onnx.save(proto, str(edited))
    report = validate(edited, seq=[17], batch=[2], runtime="openvino")
    assert {b.name for b in report.backends if not b.passed} == {"openvino:standard"}


def test_targets_openvino_cannot_read_are_refused_by_name(tmp_path):
    custom = export_onnx(FlashAttention(64, 4, 16).eval(), tmp_path / "fa.onnx")
    with pytest.raises(FlashExportError, match="is an ONNX custom target artifact; OpenVINO "
                                               "runs ONNX graphs of the standard target only"):
        validate(custom, runtime="openvino")
    with pytest.raises(FlashExportError, match="runtime must be one of"):
        validate(custom, runtime="tensorrt")
