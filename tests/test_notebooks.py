"""Every notebook under notebooks/ runs top to bottom and is stored without outputs."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_the_notebooks_are_there():
  names = {path.name for path in NOTEBOOKS}
  assert {"quickstart.ipynb", "loss_landscapes.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_is_stored_small_and_without_outputs(path):
  assert path.stat().st_size < 1_000_000
  notebook = nbformat.read(path, as_version=4)
  for cell in notebook.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_executes(path):
  notebook = nbformat.read(path, as_version=4)
  client = NotebookClient(
    notebook,
    timeout=600,
    kernel_name="python3",
    resources={"metadata": {"path": str(path.parent)}},
  )
  client.execute()  # raises CellExecutionError, naming the cell, on any error
  outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  # Every notebook draws at least one figure.
  assert any("image/png" in o.get("data", {}) for o in outputs)
