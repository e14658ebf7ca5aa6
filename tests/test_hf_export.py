"""A swapped transformers model exported to ONNX (one FlashAttention node per layer), run by
onnxruntime through flash_export.runtime, against float64 eager at sizes it was not exported at.

Issue 27's phase A prototype: `flash_export.hf.onnx.export_swapped`, without the metadata `validate`
and `serve` read (phase B)."""

import copy

import pytest

pytest.importorskip("transformers", reason="flash_export.hf needs transformers: the hf extra "
                    "(pip install -e '.[hf]'; make test installs it)")

import onnx  # noqa: E402
import torch  # noqa: E402
from _hf_models import (  # noqa: E402
    FAMILIES,
    LAYERS,
    one_thread,  # noqa: F401  (an autouse fixture)
    padding_mask,
    token_ids,
)
from helpers import assert_matches_reference  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from flash_export.core.contract import DOMAIN, OP_NAME  # noqa: E402
from flash_export.hf import swap_attention  # noqa: E402
from flash_export.hf.onnx import export_swapped  # noqa: E402
from flash_export.hf.reference import reference_model  # noqa: E402
from flash_export.runtime import create_session  # noqa: E402

FAMILY = {f.name: f for f in FAMILIES}


class TextOutput(nn.Module):
    """One output of a text model as forward(input_ids, attention_mask), without a cache."""

    def __init__(self, model: nn.Module, output: str) -> None:
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        kwargs = {"use_cache": False} if "use_cache" in self.model.config else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          **kwargs)[self.output]


@pytest.mark.parametrize("name", ["llama-gqa", "bert"])
def test_a_swapped_model_exports_one_node_per_layer_and_matches_eager_at_new_sizes(
        name, tmp_path):
    family = FAMILY[name]
    model, sample = family.build()  # batch 3, length 11, with right and left padding
    ((output, _),) = family.outputs
    ours = TextOutput(swap_attention(copy.deepcopy(model)), output).eval()
    path = export_swapped(ours, tmp_path / f"{name}.onnx", kwargs=sample,
                       dynamic_shapes={"input_ids": (0, 1), "attention_mask": (0, 1)},
                       output_names=[output])

    graph = onnx.load(str(path)).graph
    attention = [n for n in graph.node if n.domain == DOMAIN]
    assert [n.op_type for n in attention] == [OP_NAME] * LAYERS
    # Key padding as (B, 1, 1, Lk) plus the causal flag, never a materialised (Lq, Lk) mask:
    # under export the sizes are symbolic, and a guarded size comparison would say unequal.
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
              for v in graph.value_info}
    for node in attention:
        _, one, one_again, keys = shapes[node.input[3]]
        assert (one, one_again) == (1, 1) and isinstance(keys, str), shapes[node.input[3]]
        causal = next(a.i for a in node.attribute if a.name == "causal")
        assert causal == (name == "llama-gqa")
        # Grouped heads reach the node unrepeated (op contract v2), key and value head-major:
        # Llama's 2 key/value heads as (B, 2, Lk, D) beside kv_num_heads = 2.
        attrs = {a.name: a.i for a in node.attribute}
        kv_heads = model.config.num_key_value_heads if name == "llama-gqa" else None
        assert attrs.get("kv_num_heads") == kv_heads
        if kv_heads is not None:
            assert [shapes[node.input[i]][1] for i in (1, 2)] == [kv_heads, kv_heads]
    assert not [n.op_type for n in graph.node if n.op_type == "Softmax"]
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert all(d.dim_param for i in graph.input for d in i.type.tensor_type.shape.dim)

    session = create_session(path)
    reference = reference_model(model)
    for batch, length in ((1, 5), (4, 23)):
        mask = padding_mask(batch, length)
        ids = token_ids(mask, pad=0)
        (got,) = session.run([output], {"input_ids": ids.numpy(),
                                        "attention_mask": mask.numpy()})
        with torch.no_grad():
            baseline = model(input_ids=ids, attention_mask=mask)[output]
            expected = reference(input_ids=ids, attention_mask=mask)[output]
        real = mask.bool()  # padded query rows: zeros here, a mean in eager; never read
        assert_matches_reference(torch.from_numpy(got)[real], expected[real], baseline[real])
