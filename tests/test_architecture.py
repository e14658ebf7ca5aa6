"""The package's shape, checked from its source: layers, forbidden imports, no cycles, sizes.

Every import counts, at module level, inside functions and under TYPE_CHECKING alike. Read with
`ast`, nothing is imported, so the whole file takes well under a second. `check_tree` takes any
checkout's folder: pointed at the flat layout before the layer subpackages it reports the modules
outside any layer and its three import cycles.
"""

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

from flash_export import _codemap

ROOT = Path(__file__).resolve().parents[1]
# Top-level modules: the package's face. Anything may sit above the layers here, and the layers
# may import only `_version` from it.
TOP = {"flash_export", "flash_export.__main__", "flash_export._version", "flash_export._codemap",
       "flash_export.torch_op"}
RANK = {name: len(_codemap.LAYERS) - i for i, row in enumerate(_codemap.LAYERS) for name in row}
TORCH_SIDE = ("torch", "onnxscript", "transformers")
# Third-party imports each torch-free layer must never make, at any depth.
FORBIDDEN = {
    "core": (*TORCH_SIDE, "onnx", "onnxruntime", "ray", "click"),
    "artifacts": (*TORCH_SIDE, "onnxruntime", "ray", "click"),
    "runtime": (*TORCH_SIDE, "ray", "click"),
    "serving": (*TORCH_SIDE, "click"),
    "export": ("ray", "click"),
}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def modules(package: Path) -> Dict[str, Path]:
    """Dotted module name -> file, for every .py under `package`."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: Dict[str, Path]) -> Iterator[Tuple[str, int]]:
    """(imported module, line) for every import in the file, wherever it is written."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield (full if full in known else base), node.lineno


def owner(module: str, known: Dict[str, Path]) -> str:
    """The package module a dotted name lives in (`flash_export.nn.spec.ModelSpec` -> its file)."""
    while module not in known and "." in module:
        module = module.rsplit(".", 1)[0]
    return module


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and module not in TOP) else ""


def graph(package: Path) -> Tuple[Dict[str, Set[str]], List[str]]:
    """The package's import graph and the rule breaks found while building it."""
    known = modules(package)
    edges: Dict[str, Set[str]] = {m: set() for m in known}
    broken = []
    for name, path in known.items():
        where = f"{path.relative_to(package.parent)}"
        if name not in TOP and layer(name) not in RANK:
            broken.append(f"{where}: {name} is in no layer ({', '.join(sorted(RANK))})")
        for target, line in imports(name, path, known):
            top = target.split(".")[0]
            mine = layer(name)
            if top != "flash_export":
                if top in FORBIDDEN.get(mine, ()):
                    broken.append(f"{where}:{line}: {mine} imports {target}")
                continue
            target = owner(target, known)
            if target == name or name in TOP:
                edges[name].add(target) if target != name else None
                continue
            edges[name].add(target)
            theirs = layer(target)
            if target in TOP and target != "flash_export._version":
                broken.append(f"{where}:{line}: imports the top-level {target}")
            elif theirs and theirs != mine and RANK.get(theirs, 0) >= RANK.get(mine, 0):
                broken.append(f"{where}:{line}: {mine} imports {target} ({theirs} is not below)")
    return edges, broken


def cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def sizes(package: Path) -> List[str]:
    """Modules over 400 lines; functions over 60 lines without a reason comment beside the def."""
    broken = []
    for path in sorted(package.rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        where = path.relative_to(package.parent)
        if len(lines) > MAX_MODULE_LINES:
            broken.append(f"{where}: {len(lines)} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                said = any("# long:" in line for line in lines[start - 2: node.body[0].lineno])
                if length > MAX_FUNCTION_LINES and not said:
                    broken.append(f"{where}:{node.lineno}: {node.name} is {length} lines and "
                                  "says no reason (a `# long: ...` comment beside its def)")
    return broken


def check_tree(package: Path) -> List[str]:
    """Every break of the layer, forbidden-import and no-cycle rules in `package`."""
    edges, broken = graph(package)
    return broken + [f"import cycle: {' -> '.join(c)}" for c in cycles(edges)]


def test_imports_point_down_the_layers_and_never_circle():
    assert check_tree(ROOT / "flash_export") == []


def test_no_module_over_400_lines_and_long_functions_say_why():
    assert sizes(ROOT / "flash_export") == []


def test_the_contract_catches_a_climbing_import_inside_a_function(tmp_path):
    package = tmp_path / "flash_export"
    for sub in ("core", "nn", "serving"):
        (package / sub).mkdir(parents=True)
        (package / sub / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "core" / "a.py").write_text("def f():\n    from flash_export.nn import b\n")
    (package / "nn" / "b.py").write_text("from flash_export.core import a\n")
    (package / "serving" / "c.py").write_text("def g():\n    import torch\n"
                                               "    from flash_export.nn.b import x\n")
    broken = check_tree(package)
    assert "flash_export/core/a.py:2: core imports flash_export.nn.b (nn is not below)" in broken
    assert "flash_export/serving/c.py:2: serving imports torch" in broken
    assert "flash_export/serving/c.py:3: serving imports flash_export.nn.b (nn is not below)" \
        in broken
    assert "import cycle: flash_export.core.a -> flash_export.nn.b" in broken


def test_code_map_and_submodule_table_are_generated_and_current():
    run = subprocess.run([sys.executable, "-m", "flash_export._codemap", "--check"],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr


def test_every_subpackage_resolves_after_a_bare_import():
    code = ("import flash_export, sys\n"
            "names = sorted(flash_export._SUBMODULES - {'hf', 'torch_op'})\n"
            "print([n for n in names if getattr(flash_export, n).__name__ != f'flash_export.{n}'])"
            "\nprint(sorted(m for m in ('torch', 'onnxruntime') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.split("\n")[:2] == ["[]", "[]"]


@pytest.mark.parametrize("name", _codemap.subpackages())
def test_each_subpackage_says_what_it_owns_and_may_import(name):
    doc = ast.get_docstring(ast.parse((ROOT / "flash_export" / name / "__init__.py").read_text()))
    assert doc and "import" in doc, f"flash_export/{name}/__init__.py lacks its paragraph"
