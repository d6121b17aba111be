"""Every notebook runs top to bottom in a fresh kernel, and is committed without outputs."""

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


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS][:2] == ["01_quickstart.ipynb", "02_compare_methods.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear the outputs"
    assert notebook.metadata.kernelspec.name == "python3"


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
    notebook = nbformat.read(path, as_version=4)
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
