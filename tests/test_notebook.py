"""The example notebooks run top to bottom (their cells assert what they show) and are stored with their
outputs, so they read on GitHub without running them."""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
# notebook -> (seconds per cell, a line its outputs must print)
NOTEBOOKS = {
    "objectives.ipynb": (120, "MC-PO with one negative equals DPO on the whole grid"),
    "custom_objective.ipynb": (900, "custom objective trained through the same step, kernel, reference and "
                                    "evaluation as the built-ins"),
}


def _text(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_is_stored_with_its_outputs(name):
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code), "store the notebook executed"
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "executed top to bottom once"
    assert not any(o.get("output_type") == "error" for c in code for o in c.outputs)
    assert NOTEBOOKS[name][1] in _text(nb)


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_executes(monkeypatch, tmp_path, name):
    # The kernel inherits this environment: headless matplotlib, CPU jax, this checkout importable, no hub, and
    # a temp folder of the test's own (custom_objective.ipynb trains into tempfile.mkdtemp(): ~15 MB a run),
    # removed below.
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    try:
        _execute(monkeypatch, name)
    finally:
        import shutil

        shutil.rmtree(tmp_path, ignore_errors=True)


def _execute(monkeypatch, name):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = str(EXAMPLES.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    for cell in nb.cells:  # run from a clean copy: the stored outputs prove nothing about this checkout
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    timeout, expected = NOTEBOOKS[name]
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(EXAMPLES)}})
    client.execute()  # raises CellExecutionError on any failing cell / assert
    assert expected in _text(nb)
