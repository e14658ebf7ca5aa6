"""Runs test inputs through one ONNX file in a process of its own (the native kernel can crash).

    python tests/_onnx_case_worker.py MODEL.onnx FOLDER

Every `<case>.npz` in FOLDER (arrays named after the graph's inputs; extra ones are ignored) is
run: its output is saved as `<case>.npy`, or onnxruntime's error as one line in `<case>.err`.
Imports no torch (flash_export.runtime only), so a worker starts in a fraction of a second.
"""

import sys
from pathlib import Path

import numpy as np

from flash_export.runtime import create_session


def run_cases(path: str, folder: str) -> None:
    session = create_session(path)
    names = {i.name for i in session.get_inputs()}
    for case_file in sorted(Path(folder).glob("*.npz")):
        data = np.load(case_file)
        feed = {n: data[n] for n in ("values", "keys", "queries", "mask") if n in names}
        try:
            np.save(case_file.with_suffix(".npy"), session.run(["output"], feed)[0])
        except Exception as exc:  # onnxruntime's own error: reported as the backend's gap
            case_file.with_suffix(".err").write_text(
                f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:600])


if __name__ == "__main__":
    run_cases(sys.argv[1], sys.argv[2])
