"""The committed notebook is exactly what its reviewed source builds, and keeps the outputs of a full run."""

from __future__ import annotations

import importlib.util

import nbformat

from tests.conftest import REPO

NOTEBOOKS = REPO / "notebooks"


def load_builder():
    spec = importlib.util.spec_from_file_location("build_notebook", NOTEBOOKS / "build_notebook.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parse_cells_splits_code_and_markdown():
    builder = load_builder()
    text = "# header, ignored\n# %% [markdown]\n# # Title\n#\n# words\n\n# %%\nx = 1\n\n# %%\n\n# %%\ny = 2\n"
    assert builder.parse_cells(text) == [("markdown", "# Title\n\nwords"), ("code", "x = 1"), ("code", "y = 2")]


def test_committed_notebook_matches_its_source():
    builder = load_builder()
    built = builder.build()
    committed = nbformat.read(builder.NOTEBOOK, as_version=4)
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in built.cells], (
        "notebooks/Coin_Regression_Pipeline.ipynb is out of date with Coin_Regression_Pipeline.py: "
        "run `python notebooks/build_notebook.py --execute`")


def test_committed_notebook_keeps_a_full_error_free_run():
    committed = nbformat.read(NOTEBOOKS / "Coin_Regression_Pipeline.ipynb", as_version=4)
    code = [cell for cell in committed.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code), "every code cell has been run"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"], "no cell failed"
    first = "".join(o.get("text", "") for o in code[0].outputs)
    assert "SMALL=False" in first, "the committed outputs come from a full (not SMALL) run"
    figures = sum(1 for c in code for o in c.outputs if "image/png" in o.get("data", {}))
    assert figures >= 10


def test_text_only_refresh_keeps_outputs_and_refuses_code_changes():
    builder = load_builder()
    existing = builder.build()
    existing.cells[1].outputs = [nbformat.v4.new_output("stream", text="kept")]
    edited = builder.build()
    edited.cells[0].source = "# A new title"
    refreshed = builder.refresh_text(edited, existing)
    assert refreshed.cells[0].source == "# A new title" and refreshed.cells[1].outputs[0].text == "kept"
    edited.cells[1].source += "\nprint('changed')"
    try:
        builder.refresh_text(edited, builder.build())
    except SystemExit as refusal:
        assert "code cells changed" in str(refusal)
    else:
        raise AssertionError("a code change must need a new run")
