"""Every notebook is committed with the outputs of a full run (`make notebooks`), and still runs top to bottom in a
fresh kernel (the test suite runs it with DISTILL_NOTEBOOK_QUICK=1, a few batches)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from conftest import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
sys.path.insert(0, str(REPO / "scripts"))
import run_notebooks  # noqa: E402  (scripts/ is not a package)


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS][:2] == ["01_quickstart.ipynb", "02_compare_methods.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_with_the_outputs_of_a_full_run(path):
    """`make notebooks` ran it top to bottom at full size: every code cell in order, no errors, its plots included."""
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), f"{path.name}: run make notebooks"
    assert not [o for cell in code for o in cell.outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for cell in code for o in cell.outputs), f"{path.name}: no plot"
    made = notebook.metadata.get("distill", {})
    assert made.get("executed_by") == "scripts/run_notebooks.py" and made.get("quick") is False
    assert notebook.metadata.kernelspec.name == "python3"
    # the outputs were made from this text: a cell edited after the run needs `make notebooks` again
    assert made.get("source_sha256") == run_notebooks.source_sha256(notebook), f"{path.name}: run make notebooks"


def test_the_comparison_notebook_shows_a_teacher_better_than_its_students():
    notebook = nbformat.read(REPO / "notebooks" / "02_compare_methods.ipynb", as_version=4)
    text = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "teacher better than every student: True" in text


@pytest.fixture
def this_python_kernel(tmp_path, monkeypatch):
    """A ``python3`` kernelspec that runs this interpreter, found before any other.

    A user-wide or system ``python3`` kernel could belong to another Python without this package (or
    with another version of it); JUPYTER_PATH is searched first, so the notebooks run in this venv.
    """
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "distill tests", "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(filter(None, [str(tmp_path / "jupyter"),
                                                                     os.environ.get("JUPYTER_PATH")])))
    # the checkout under test, even where another copy of the package is installed
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    # one thread per op, like the rest of the suite: the test machines are small and shared
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    return "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch, this_python_kernel):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("DISTILL_NOTEBOOK_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("DISTILL_NOTEBOOK_QUICK", "1")  # a few batches: does every cell still work
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:  # from the source alone, not from the committed outputs
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    # one extra cell, in memory only: which interpreter and directory the kernel used
    notebook.cells.append(nbformat.v4.new_code_cell("import os, sys; print(sys.executable); print(os.getcwd())"))
    client = nbclient.NotebookClient(
        notebook, kernel_name=this_python_kernel, timeout=300, allow_errors=False,
        resources={"metadata": {"path": str(work)}},  # the kernel's working directory
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error
    executable, cwd = notebook.cells[-1].outputs[0]["text"].splitlines()
    assert Path(executable) == Path(sys.executable) and Path(cwd).resolve() == work.resolve()
    assert sorted((tmp_path / "runs").rglob("results.json")), "the notebook wrote no run"
    pngs = sorted((tmp_path / "runs").rglob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert not (work / "runs").exists()  # DISTILL_NOTEBOOK_RUNS was honoured
