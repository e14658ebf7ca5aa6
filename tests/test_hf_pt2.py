"""`flash-export pt2 --hf DIR --task TASK`: a transformers checkpoint compiled to an AOTInductor
package calling `flash_export::attention`, validated against transformers' eager attention in
float64 at lengths it was not compiled at."""

import pytest

pytest.importorskip("transformers", reason="flash_export.hf needs transformers: the hf extra "
                    "(pip install -e '.[hf]'; make test installs it)")

import torch  # noqa: E402
import transformers as tf  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from flash_export.artifacts.metadata import read_metadata  # noqa: E402
from flash_export.check.validate import validate  # noqa: E402
from flash_export.cli.main import main  # noqa: E402
from flash_export.core.contract import NATIVE_REQUIRES  # noqa: E402
from flash_export.core.errors import ModelError  # noqa: E402
from flash_export.hf.export import export_hf_pt2  # noqa: E402


def test_a_bert_folder_compiles_to_pt2_and_validates_at_new_lengths(tmp_path):
    torch.manual_seed(0)
    tf.BertModel(tf.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=96,
                               max_position_embeddings=64)).save_pretrained(tmp_path / "bert")
    out = tmp_path / "bert.pt2"
    result = CliRunner().invoke(main, ["pt2", "--hf", str(tmp_path / "bert"), "--task",
                                       "feature-extraction", str(out)])
    assert result.exit_code == 0, result.output
    meta = read_metadata(out)
    assert (meta["hf_task"], meta["attention"], meta["requires"]) == (
        "feature-extraction", "native", NATIVE_REQUIRES)
    report = validate(out, seq=[3, 40], batch=[1, 3])  # compiled at length 17
    assert report.passed, report.failure_lines()
    assert [b.name for b in report.backends] == ["pytorch", "pt2"]
    assert report.kind == "pt2" and all(len(b.cases) == 8 for b in report.backends)


def test_a_task_with_a_cache_is_refused_before_compiling(tmp_path):
    with pytest.raises(ModelError, match="pt2 --hf exports feature-extraction, text-generation, "
                                         "image-classification; for text-generation-with-past"):
        export_hf_pt2(tmp_path, tmp_path / "m.pt2", task="text-generation-with-past")
