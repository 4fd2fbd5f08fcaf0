"""The notebooks: each one runs top to bottom, and its paired ``.py`` / ``.ipynb`` files agree.

Notebooks are stored in two forms, paired by jupytext: ``notebooks/NN_name.py`` (percent format, the one
to edit and review) and ``notebooks/NN_name.ipynb`` (for Jupyter, stored without outputs). After editing
the ``.py``, run ``jupytext --sync notebooks/NN_name.py`` to update the ``.ipynb``.

The execution test starts a fresh kernel process, because JAX fixes its device count when it starts
(the notebooks simulate 8 CPU devices) and this pytest process has usually started JAX already.
``BPJAX_QUICK=1`` makes the notebooks train for a few hundred steps instead of thousands.
"""

import os
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
CELL_TIMEOUT = 300  # seconds per cell; the quick runs take seconds


def cells(notebook) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


def test_notebooks_found():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOKS_DIR}"
    unpaired = sorted(p.name for p in NOTEBOOKS_DIR.glob("*.py") if not p.with_suffix(".ipynb").is_file())
    assert not unpaired, f"{unpaired} have no .ipynb; run: jupytext --sync notebooks/<name>.py"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_paired_and_clean(path):
    py = path.with_suffix(".py")
    assert py.is_file(), (
        f"{path.name} has no paired {py.name}; run: jupytext --set-formats ipynb,py:percent {path}"
    )
    fix = f"run: jupytext --sync {py.relative_to(NOTEBOOKS_DIR.parent)}"
    assert cells(jupytext.read(py)) == cells(jupytext.read(path)), f"{py.name} and {path.name} differ; {fix}"

    stored = nbformat.read(path, as_version=4)
    for i, cell in enumerate(stored.cells):
        if cell.cell_type == "code":
            assert not cell.outputs, f"{path.name} cell {i} stores outputs; clear them before committing"
            assert cell.execution_count is None, f"{path.name} cell {i} stores an execution count"


# The quick-start notebook runs as the README says, with the notebooks extra's command line:
# ``jupyter nbconvert --to notebook --execute notebooks/01_quickstart.ipynb`` (the others through nbclient,
# the library nbconvert runs them with, so that none runs twice).
HEADLESS = "01_quickstart"


@pytest.mark.slow
def test_quickstart_runs_headless_with_jupyter_nbconvert(tmp_path):
    jupyter = Path(sys.executable).parent / "jupyter"
    assert jupyter.is_file(), "the notebooks extra installs jupyter (nbconvert, jupyterlab)"
    cmd = [str(jupyter), "nbconvert", "--to", "notebook", "--execute", f"notebooks/{HEADLESS}.ipynb"]
    cmd += ["--output-dir", str(tmp_path), f"--ExecutePreprocessor.timeout={CELL_TIMEOUT}"]
    env = {**os.environ, "BPJAX_QUICK": "1"}
    env.pop("MPLBACKEND", None)  # the kernel's inline backend
    out = subprocess.run(cmd, cwd=NOTEBOOKS_DIR.parent, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    executed = nbformat.read(tmp_path / f"{HEADLESS}.ipynb", as_version=4)
    code = [c for c in executed.cells if c.cell_type == "code"]
    assert code and all(c.execution_count for c in code)  # every cell ran
    errors = [o for c in code for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors


# A fresh kernel per notebook; about 20 s for 01_quickstart on 2 cores. jupyter_client and zmq have
# warned while a kernel starts or stops (platformdirs migration, zmq on the selector event loop);
# pyproject.toml ignores those two, and none of them fires with jupyter_client 8.10 and pyzmq 27.
@pytest.mark.slow
@pytest.mark.parametrize(
    "path",
    [p for p in NOTEBOOKS if p.stem != HEADLESS],
    ids=[p.stem for p in NOTEBOOKS if p.stem != HEADLESS],
)
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("BPJAX_QUICK", "1")  # inherited by the kernel process
    monkeypatch.delenv("MPLBACKEND", raising=False)  # let the kernel use its inline backend
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(path.parent)}},  # the kernel's working directory
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell raises
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
