"""The op contract has one Python home: every list of targets, domain and dtypes derives from it.

Adding a fifth ONNX target or renaming the domain is a change in `flash_export/core/contract.py`
(plus the target's implementation, and the C++ adapter for the domain); these tests fail when
another module states a contract fact again instead of importing it.
"""

import ast
from pathlib import Path

import pytest
from click.testing import CliRunner

from flash_export.cli.main import main
from flash_export.core import contract

PACKAGE = Path(contract.__file__).resolve().parent.parent  # flash_export/, every subpackage


def _code_constants(path: Path) -> list:
    """Every str constant of `path` outside docstrings, and every tuple/list of str constants."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef))
                  and n.body and isinstance(n.body[0], ast.Expr)
                  and isinstance(n.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in docstrings:
            found.append(node.value)
        elif isinstance(node, (ast.Tuple, ast.List)) and node.elts and all(
                isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
            found.append(tuple(e.value for e in node.elts))
    return found


@pytest.mark.parametrize("module", sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                                          if p != Path(contract.__file__).resolve()))
def test_no_module_restates_the_domain_or_the_target_list(module: str) -> None:
    constants = _code_constants(PACKAGE / module)
    assert contract.DOMAIN not in constants, f"{module} spells the domain out"
    assert not [c for c in constants if isinstance(c, tuple) and set(contract.TARGETS) <= set(c)], \
        f"{module} lists the targets again"


def test_every_consumer_offers_exactly_the_contracts_targets() -> None:
    from flash_export.bench import runners
    from flash_export.export import onnx_targets

    assert tuple(onnx_targets.TARGETS) == contract.TARGETS  # one implementation per name
    assert runners.ONNX_BACKENDS == contract.TARGETS
    onnx_command = main.commands["onnx"]
    target_option = next(p for p in onnx_command.params if p.name == "target")
    assert tuple(target_option.type.choices) == contract.TARGETS
    help_text = CliRunner().invoke(main, ["onnx", "--help"]).output
    assert all(name in help_text for name in contract.TARGETS)


def test_every_target_exports_a_graph_that_declares_the_contracts_domain(tmp_path) -> None:
    from flash_export.artifacts.safety import load_graph
    from flash_export.export.onnx import export_onnx
    from flash_export.nn.attention import FlashAttention

    for target in contract.TARGETS:
        path = export_onnx(FlashAttention(16, 2, 4).eval(), tmp_path / f"{target}.onnx",
                           target=target)
        graph = load_graph(path)
        meta = {p.key: p.value for p in graph.metadata_props}
        assert meta["domain"] == contract.DOMAIN and meta["target"] == target
        assert meta["domain_version"] == str(contract.DOMAIN_VERSION)
        if target == "custom":
            assert {(o.domain, o.version) for o in graph.opset_import} >= {
                (contract.DOMAIN, contract.DOMAIN_VERSION)}
