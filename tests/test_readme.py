"""The original README's example keeps working verbatim, and our README's Python blocks run."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEED_README = ROOT.parent / "shared" / "seed" / "original-README.md"


def _python_blocks(text: str) -> list:
    text = text.replace("\\`\\`\\`", "```")  # the seed file escapes its fences
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _run(code: str, tmp_path: Path) -> str:
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_original_example_as_quoted_in_our_readme_prints_the_shape(tmp_path):
    blocks = [b for b in _python_blocks((ROOT / "README.md").read_text())
              if "from flash_attention import FlashAttention" in b]
    assert blocks, "README.md must quote the original example"
    assert _run(blocks[0], tmp_path).strip() == "torch.Size([1, 50, 128])"


@pytest.mark.skipif(not SEED_README.is_file(), reason=f"{SEED_README} is not beside this checkout")
def test_original_readme_examples_run_verbatim(tmp_path):
    first, second = _python_blocks(SEED_README.read_text())[:2]
    assert _run(first, tmp_path).strip() == "torch.Size([1, 50, 128])"
    # The second block continues the first (it reuses its imports), as a reader would run it.
    assert _run(first + "\n" + second, tmp_path).split() == ["torch.Size([1,", "50,", "128])"] * 2


# --------------------------------------------------------------------------- runtime blocks

RUNTIME_MARKERS = ("flash_export.runtime", "onnxruntime")


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    """A folder holding what `make demo` writes first: out/flash_attention.onnx (custom target)."""
    from flash_export import FlashAttention
    from flash_export.export.onnx import export_onnx

    folder = tmp_path_factory.mktemp("readme")
    (folder / "out").mkdir()
    export_onnx(FlashAttention(128, 8, 64).eval(), folder / "out" / "flash_attention.onnx")
    return folder


def _runtime_blocks() -> list:
    return [b for b in _python_blocks((ROOT / "README.md").read_text())
            if any(marker in b for marker in RUNTIME_MARKERS)]


def test_every_readme_block_that_touches_the_runtime_runs_verbatim(demo_folder):
    blocks = _runtime_blocks()
    assert len(blocks) >= 2, "the Serving section's blocks went missing"
    for block in blocks:
        _run(block, demo_folder)


def _stated_runtime_dependencies() -> list:
    """The distributions the README says `flash_export.runtime` needs."""
    text = (ROOT / "README.md").read_text()
    found = re.search(r"`flash_export\.runtime` needs (?:only )?([a-z, ]+?)(?: \(|:|\.)", text)
    assert found, "the README must state the runtime's dependencies"
    return [n.strip() for n in re.split(r",| and ", found.group(1)) if n.strip()]


def _closure(names: list) -> set:
    """`names` and everything they require, as normalised distribution names."""
    from importlib import metadata

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    # "onnxruntime" is satisfied by either of its distributions (CPU or GPU build).
    todo, seen = [norm(n) for n in names] + [norm(n) + "-gpu" for n in names], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for req in requires:
            if "extra ==" not in req:
                todo.append(norm(re.match(r"[A-Za-z0-9_.-]+", req).group(0)))
    return seen


def test_the_serving_example_runs_with_exactly_the_stated_dependencies(demo_folder):
    """As in a venv holding only what the README lists: every other distribution is blocked."""
    from importlib import metadata

    allowed = _closure(_stated_runtime_dependencies())
    blocked = sorted(module for module, dists in metadata.packages_distributions().items()
                     if not any(re.sub(r"[-_.]+", "-", d).lower() in allowed for d in dists)
                     and module not in ("flash_export", "flash_attention")
                     and not module.startswith("_"))
    assert "torch" in blocked
    guard = (f"import sys\nBLOCKED = set({blocked!r})\n"
             "class _Block:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] in BLOCKED:\n"
             "            raise ImportError(name + ' is not a stated runtime dependency')\n"
             "sys.meta_path.insert(0, _Block())\n")
    serving = next(b for b in _runtime_blocks() if "create_session" in b and "torch" not in b)
    _run(guard + serving, demo_folder)


# --------------------------------------------------------------------------- command-line blocks

def _section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def test_command_line_section_runs_verbatim_in_a_new_folder(tmp_path):
    """The `## Command line` blocks as a new user types them, checkpoint example included."""
    section = _section((ROOT / "README.md").read_text(), "Command line")
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 2 and any("--weights ckpt.pt" in b for b in blocks)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for block in blocks:
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", block], capture_output=True,
                             text=True, cwd=tmp_path, env=env, timeout=900)
        assert run.returncode == 0, block + run.stdout[-2000:] + run.stderr[-2000:]
    assert (tmp_path / "ckpt.pt").is_file() and (tmp_path / "out" / "trained.onnx").is_file()


def test_which_artifact_section_runs_verbatim_in_a_new_folder(tmp_path):
    """Its first Python block, then its commands: a zoo model compiled to .pt2 from the CLI (a
    real subprocess of the entry point, saying what it does while g++ runs) and validated at
    lengths it was not exported at; then the block that loads that package in a fresh process
    with torch's loader after `import flash_export.torch_op`, positionally, and with
    `load_pt2`."""
    section = _section((ROOT / "README.md").read_text(), "Which artifact? TorchScript, native, "
                       "`.pt2` or ONNX")
    python, load = _python_blocks(section)
    assert _run(python, tmp_path).strip() == "torch.Size([2, 40, 128])"
    (commands,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    assert "flash-export pt2 --model flash_export.models." in commands
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", commands], capture_output=True,
                         text=True, cwd=tmp_path, env=env, timeout=900)
    assert run.returncode == 0, commands + run.stdout[-2000:] + run.stderr[-2000:]
    assert "validation passed" in run.stdout
    assert "exporting pt2: compiling with AOTInductor" in run.stderr, run.stderr[-2000:]
    assert (tmp_path / "out" / "encoder.pt2").is_file()
    assert (tmp_path / "out" / "fa_native.pt").is_file()
    assert _run(load, tmp_path).split("\n")[:2] == ["torch.Size([2, 7, 64]) trust store", "True"]


def test_hugging_face_section_runs_verbatim_in_a_new_folder(tmp_path):
    """In the order a reader meets them: a checkpoint folder saved and loaded, swapped, compared
    on a padded batch, generating; exported from the CLI for text-generation (a real subprocess
    of the entry point) and validated at lengths it was not exported at; exported with its KV
    cache, then generating through onnxruntime alone."""
    pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
    section = _section((ROOT / "README.md").read_text(), "Hugging Face models")
    blocks = [(kind, code) for kind, code in re.findall(r"```(python|bash)\n(.*?)```", section,
                                                        flags=re.S)
              if kind == "python" or code.startswith("flash-export ")]  # not the pip line
    assert [kind for kind, _ in blocks] == ["python", "bash", "bash", "python"]
    assert "swap_attention" in blocks[0][1] and "runtime import generate" in blocks[3][1]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    outputs = []
    for kind, code in blocks:
        if kind == "python":
            outputs.append(_run(code, tmp_path))
            continue
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", code], capture_output=True,
                             text=True, cwd=tmp_path, env=env, timeout=900)
        assert run.returncode == 0, code + run.stdout[-2000:] + run.stderr[-2000:]
        assert "check: passed at lengths 17 and 40" in run.stdout, run.stdout[-2000:]
        outputs.append(run.stdout)
    assert (tmp_path / "out" / "tiny-llama" / "config.json").is_file()
    assert "validation passed" in outputs[1] and "B=3 seq=70" in outputs[1]
    assert outputs[3].strip() == "(2, 21)"


def test_op_contract_v2_section_runs_verbatim(tmp_path):
    """The grouped-query decode node against a cache with NaN padding past seqlens_k, and the
    torch op on head-major views with a broadcast bias, print what the text says."""
    text = (ROOT / "README.md").read_text()
    start = text.index("\n### Op contract v2")
    section = text[start:text.index("\n### ", start + 1)]
    node, torch_op = _python_blocks(section)
    assert _run(node, tmp_path).strip() == "(2, 1, 512) True"
    assert _run(torch_op, tmp_path).strip() == "torch.Size([2, 5, 512])"
