"""The README's Serving example, verbatim: `flash-export serve` on port 8000 and its client.

A module of its own so its cluster starts after test_serve.py's has stopped.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the serve extra (ray[serve]) is not installed")
pytest.importorskip("tritonclient.http", reason="tritonclient[http] (dev extra) is not installed")

from _serving import serving  # noqa: E402  (a sibling module)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own pydantic use


ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_serve_example_runs_verbatim(tmp_path):
    """The Serving section's command and client, as typed."""
    from flash_export import FlashAttention
    from flash_export.export.onnx import export_onnx

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Serving: `flash-export serve`"):]
    section = section[:section.index("\n## ", 10)]
    (command,) = [line for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)
                  for line in block.splitlines() if line.startswith("flash-export serve")]
    (client,) = [b for b in re.findall(r"```python\n(.*?)```", section, flags=re.S)
                 if "tritonclient" in b]
    printed = re.search(r"prints `(serving .*?)`", section, flags=re.S).group(1)
    (tmp_path / "out").mkdir()
    export_onnx(FlashAttention(128, 8, 64).eval(), tmp_path / "out" / "flash_attention.onnx")
    with serving(command.split()[2:], cwd=tmp_path) as (_, banner):
        assert banner.strip() == " ".join(printed.split())
        run = subprocess.run([sys.executable, "-c", client], capture_output=True, text=True,
                             timeout=120, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.strip() == "(1, 40, 128)"
