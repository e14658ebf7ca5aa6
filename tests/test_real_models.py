"""Real models end to end: PyTorch's own Transformer layers, converted, exported and run.

`convert` swaps every nn.MultiheadAttention for FlashAttention; the converted model then goes
through `export_onnx` with its own signature (inputs named after its forward, batch and
sequence dynamic) and onnxruntime, and must match the UNconverted PyTorch model against float64
at a length never seen at export, under the STYLE.md rule.
"""

from pathlib import Path
from typing import Any, Dict

import onnx
import pytest
import torch
from torch import nn

from flash_export import convert
from flash_export.core.errors import ExportError
from flash_export.core.tolerance import compare, max_abs_error
from flash_export.export.onnx import export_onnx
from flash_export.runtime import create_session, library_path

E, H = 32, 4


def _encoder(batch_first: bool) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()


def _src(batch: int, length: int, batch_first: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, length, E) if batch_first else (length, batch, E)
    return torch.randn(*shape, generator=g)


def _padding(batch: int, length: int) -> torch.Tensor:
    pad = torch.zeros(batch, length, dtype=torch.bool)  # True = padding (PyTorch's convention)
    pad[1, length // 2 + 1:] = True
    return pad


def _kwargs(variant: str, batch: int, length: int) -> Dict[str, Any]:
    if variant == "padding":
        return {"src_key_padding_mask": _padding(batch, length)}
    return {"mask": nn.Transformer.generate_square_subsequent_mask(length), "is_causal": True}


@pytest.mark.parametrize("target", ["custom", "standard"])
@pytest.mark.parametrize("variant", ["padding", "causal"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
def test_converted_transformer_encoder_exports_and_matches_pytorch_at_an_unseen_length(
        tmp_path: Path, target: str, variant: str, batch_first: bool) -> None:
    if target == "custom" and not Path(library_path()).is_file():
        pytest.skip(f"native library not built at {library_path()}")
    original = _encoder(batch_first)
    converted = convert(original).eval()
    path = export_onnx(converted, tmp_path / "encoder.onnx", target=target,
                       args=(_src(2, 17, batch_first, 0),), kwargs=_kwargs(variant, 2, 17))
    session = create_session(path)
    names = [i.name for i in session.get_inputs()]
    assert names[0] == "src" and [o.name for o in session.get_outputs()] == ["output"]

    length = 65  # never seen at export (17)
    src = _src(3, length, batch_first, 1)
    kwargs = _kwargs(variant, 3, length)
    feed = {"src": src.numpy()}
    feed.update({n: kwargs[n].numpy() for n in names if n != "src"})
    (got,) = session.run(None, feed)
    with torch.no_grad():
        reference = original.double()(src.double(), **{
            k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in kwargs.items()}).numpy()
        baseline = _encoder(batch_first)(src, **kwargs).double().numpy()
    c = compare(got, reference, baseline_error=max_abs_error(baseline, reference),
                dtype="float32")
    assert c.passed, (c.max_abs, c.bound, c.nonfinite)


def test_seq_first_layout_names_its_dims_from_the_padding_mask(tmp_path: Path) -> None:
    converted = convert(_encoder(False)).eval()
    path = export_onnx(converted, tmp_path / "e.onnx", target="standard",
                       args=(_src(2, 17, False, 0),),
                       kwargs={"src_key_padding_mask": _padding(2, 17)})
    graph = onnx.load(str(path))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in graph.graph.input}
    assert dims == {"src": ["seq", "batch", E], "src_key_padding_mask": ["batch", "seq"]}


class _Specialised(nn.Module):
    """A model that only works at one length: a fixed-size positional table added to the input."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = convert(_encoder(True))
        self.position = nn.Parameter(torch.zeros(17, E))

    def forward(self, src: torch.Tensor) -> torch.Tensor:
        return self.encoder(src + self.position)


def test_a_dynamic_dim_the_model_specialises_is_named(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"specialises input 'src' dim 1 \(seq\) to 17"):
        export_onnx(_Specialised().eval(), tmp_path / "s.onnx", target="standard",
                    args=(_src(2, 17, True, 0),))


def test_example_inputs_that_do_not_match_the_forward_are_named(tmp_path: Path) -> None:
    converted = convert(_encoder(True)).eval()
    with pytest.raises(ExportError, match=r"do not match TransformerEncoder.forward\(src, mask"):
        export_onnx(converted, tmp_path / "x.onnx", args=(_src(2, 17, True, 0),),
                    kwargs={"padding": _padding(2, 17)})


def test_a_model_without_flash_attention_after_conversion_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="contains no FlashAttention layer"):
        export_onnx(_encoder(True), tmp_path / "x.onnx", args=(_src(2, 17, True, 0),))


class _TwoHeads(nn.Module):
    """A model with several outputs, returned as a dict: they are named after its keys."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = convert(_encoder(True))
        self.head = nn.Linear(E, 3)

    def forward(self, src: torch.Tensor, src_key_padding_mask: torch.Tensor) -> Dict[str, Any]:
        hidden = self.encoder(src, src_key_padding_mask=src_key_padding_mask)  # (B, L, E)
        return {"hidden": hidden, "scores": self.head(hidden[:, 0])}  # (B, L, E), (B, 3)


def test_several_outputs_are_named_exported_and_each_validated(tmp_path: Path) -> None:
    from flash_export.check.validate import validate

    model = _TwoHeads().eval()
    path = export_onnx(model, tmp_path / "two.onnx", target="standard",
                       args=(_src(2, 17, True, 0), _padding(2, 17)))
    session = create_session(path)
    assert [o.name for o in session.get_outputs()] == ["hidden", "scores"]
    report = validate(path, model=model, seq=[1, 20], batch=[3])
    assert report.passed, report.failure_lines()
    assert {c.output for b in report.backends for c in b.cases} == {"hidden", "scores"}


def test_a_zoo_model_validates_as_torchscript_too(tmp_path: Path) -> None:
    from flash_export.check.validate import validate
    from flash_export.export.torchscript import export_torchscript
    from flash_export.nn.spec import ModelSpec

    spec = ModelSpec(embed=32, heads=4, chunk=8, model="flash_export.models.bert:build")
    path = export_torchscript(spec.build(), tmp_path / "bert.pt", spec=spec)
    report = validate(path, seq=[1, 9, 20], batch=[2])
    assert report.passed, report.failure_lines()
    assert [b.name for b in report.backends] == ["eager", "torchscript"]
    assert {c.case.mask for c in report.backends[1].cases} == {False, True}  # padded and not
