"""The pipeline notebook runs, top to bottom, in SMALL mode: every cell, including training, the pyfunc
model and the REST API section against a real `coinyear serve` process."""

from __future__ import annotations

import time

import nbformat
import pytest

from tests.conftest import REPO

NOTEBOOK = REPO / "notebooks" / "Coin_Regression_Pipeline.ipynb"


def text_of(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            parts.append(output.text)
        elif "data" in output:
            parts.append(output.data.get("text/plain", ""))
    return "\n".join(parts)


@pytest.mark.slow
def test_notebook_runs_in_small_mode(ocre_dir, tmp_path, monkeypatch):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    # The kernel inherits this environment: SMALL settings, the data in place, temp state under tmp_path.
    monkeypatch.setenv("COINYEAR_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("COINYEAR_DATA_DIR", str(ocre_dir))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    # The notebook honours MLFLOW_TRACKING_URI (as all of coinyear does), so drop one from the caller's shell or
    # exported into this process by mlflow.set_tracking_uri() in earlier tests (seen in CI): it would register
    # into that store instead of its own, as test_serve.py and test_retrain_e2e.py also guard against.
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    started = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as error:
        pytest.fail(f"a notebook cell failed:\n{error}")
    print(f"notebook (SMALL) executed in {time.perf_counter() - started:.0f} s")

    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code), "every code cell ran"
    everything = "\n".join(text_of(cell) for cell in code)
    assert "SMALL=True" in everything
    assert "registered coinyear version 1" in everything
    assert "REST predictions:" in everything and "databricks-sdk ->" in everything
    assert "not an image -> 400" in everything
    assert "feedback     -> 200" in everything
    figures = sum(1 for cell in code for output in cell.get("outputs", []) if "image/png" in output.get("data", {}))
    assert figures >= 10, f"only {figures} figures rendered"
    # The notebook's state went to a temporary COINYEAR_HOME, never into the repository.
    assert not (REPO / "notebooks" / ".coinyear").exists()
