"""Runs the notebooks in place, at their full sizes, so that the committed notebooks show the outputs of a real run.

    python scripts/run_notebooks.py                      # every notebook (about 10 minutes on 2 CPU cores)
    python scripts/run_notebooks.py 02_compare_methods   # only those whose name contains one of these

``make notebooks`` runs this. Each notebook runs top to bottom in a fresh kernel of this interpreter, from the
repository root, its runs under ``runs/notebooks/<notebook>`` (an earlier folder there is renamed, never deleted,
since the notebooks read back every run in theirs); the executed notebook (outputs, plots) replaces the file, with
``metadata.distill`` saying how it was made. A notebook that fails is left as it was and the exit status is 1.
With ``DISTILL_NOTEBOOK_QUICK=1`` (the test suite's setting) the notebooks would train a few batches only: this
script refuses it, as those outputs would say nothing.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"


def this_python_kernel(folder: Path) -> str:
    """A ``python3`` kernelspec in ``folder`` that runs this interpreter; put ``folder`` first on JUPYTER_PATH."""
    spec = folder / "kernels" / "python3"
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3", "language": "python"}))
    return "python3"


def source_sha256(notebook) -> str:
    """The hash of the notebook's cells' sources: which text the committed outputs were made from."""
    import hashlib

    return hashlib.sha256("\n\x00".join(c.cell_type + ":" + c.source for c in notebook.cells).encode()).hexdigest()


def run(path: Path, kernel: str) -> float:
    import nbclient
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    started = time.time()
    nbclient.NotebookClient(notebook, kernel_name=kernel, timeout=1800, allow_errors=False,
                            resources={"metadata": {"path": str(REPO)}}).execute()
    seconds = time.time() - started
    notebook.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.metadata["distill"] = {"executed_by": "scripts/run_notebooks.py", "quick": False,
                                    "date": time.strftime("%Y-%m-%d"), "seconds": round(seconds),
                                    "source_sha256": source_sha256(notebook)}
    nbformat.write(notebook, path)
    return seconds


def main(argv: list[str]) -> int:
    if os.environ.get("DISTILL_NOTEBOOK_QUICK") == "1":
        print("run_notebooks: unset DISTILL_NOTEBOOK_QUICK: committed outputs come from full runs", file=sys.stderr)
        return 2
    paths = [p for p in sorted(NOTEBOOKS.glob("*.ipynb")) if not argv or any(a in p.name for a in argv)]
    failed = []
    with tempfile.TemporaryDirectory() as jupyter:
        kernel = this_python_kernel(Path(jupyter))
        os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [jupyter, os.environ.get("JUPYTER_PATH")]))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        os.environ.setdefault("DISTILL_NOTEBOOK_RUNS", "runs/notebooks")
        for path in paths:
            runs = REPO / os.environ["DISTILL_NOTEBOOK_RUNS"] / path.stem
            if runs.exists():  # the notebook reads back every run in its folder: start from an empty one
                runs.rename(runs.with_name(f"{path.stem}-before-{time.strftime('%Y%m%d-%H%M%S')}"))
            try:
                print(f"{path.name}: {run(path, kernel):.0f} s", flush=True)
            except Exception as error:  # the cell and its traceback, then the next notebook
                print(f"{path.name}: FAILED\n{error}", file=sys.stderr, flush=True)
                failed.append(path.name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
