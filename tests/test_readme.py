"""The original README's example keeps working verbatim, and our README's Python blocks run."""

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
