"""Build `Coin_Regression_Pipeline.ipynb` from its reviewable source `Coin_Regression_Pipeline.py`.

The source is in the "percent" cell format (as jupytext writes it): `# %%` starts a code cell,
`# %% [markdown]` a markdown cell whose lines are `# `-commented. The .py file is what people edit and
review; the .ipynb is generated from it, and tests/code/test_docs_notebook.py checks that the committed
notebook has exactly these cells.

    python notebooks/build_notebook.py             # cells only, no outputs
    python notebooks/build_notebook.py --execute   # run it (full settings) and keep the outputs
    python notebooks/build_notebook.py --text-only # take only markdown edits, keeping the existing outputs
    COINYEAR_NOTEBOOK_SMALL=1 python notebooks/build_notebook.py --execute --out /tmp/nb.ipynb
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "Coin_Regression_Pipeline.py"
NOTEBOOK = HERE / "Coin_Regression_Pipeline.ipynb"
CELL_MARK = re.compile(r"^# %%(?P<markdown> \[markdown\])?\s*$")
KERNEL = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


def parse_cells(text: str) -> list[tuple[str, str]]:
    """(kind, source) for every cell of a percent-format script; text before the first marker is ignored."""
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        mark = CELL_MARK.match(line)
        if mark:
            cells.append(("markdown" if mark.group("markdown") else "code", []))
        elif cells:
            cells[-1][1].append(line)
    out = []
    for kind, lines in cells:
        if kind == "markdown":
            lines = [line[2:] if line.startswith("# ") else line.lstrip("#") for line in lines]
        source = "\n".join(lines).strip("\n")
        if source:
            out.append((kind, source))
    return out


def build(source: Path = SOURCE) -> nbformat.NotebookNode:
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = KERNEL
    notebook.metadata["language_info"] = {"name": "python"}
    for index, (kind, text) in enumerate(parse_cells(source.read_text())):
        cell = nbformat.v4.new_markdown_cell(text) if kind == "markdown" else nbformat.v4.new_code_cell(text)
        cell.id = f"cell-{index:02d}"  # stable ids: rebuilding changes only what changed
        notebook.cells.append(cell)
    return notebook


def refresh_text(built: nbformat.NotebookNode, existing: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The existing notebook (with its outputs) with the built one's markdown; the code must be unchanged."""
    shape = [(c.cell_type, c.source if c.cell_type == "code" else "") for c in built.cells]
    if shape != [(c.cell_type, c.source if c.cell_type == "code" else "") for c in existing.cells]:
        raise SystemExit("code cells changed: the outputs would no longer match; run with --execute")
    for mine, theirs in zip(built.cells, existing.cells):
        theirs.source = mine.source
    return existing


def execute(notebook: nbformat.NotebookNode, timeout: int = 3600) -> nbformat.NotebookNode:
    """Run every cell in a fresh kernel of this interpreter (so the kernel sees this environment)."""
    from nbclient import NotebookClient

    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": str(HERE)}})
    client.execute()
    return notebook


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--execute", action="store_true", help="run the notebook and keep its outputs")
    parser.add_argument("--text-only", action="store_true", help="update markdown cells, keep code and outputs")
    parser.add_argument("--out", type=Path, default=NOTEBOOK)
    parser.add_argument("--timeout", type=int, default=3600, help="seconds allowed per cell")
    args = parser.parse_args(argv)
    notebook = build()
    if args.text_only:
        notebook = refresh_text(notebook, nbformat.read(args.out, as_version=4))
    try:
        if args.execute:
            started = time.perf_counter()
            execute(notebook, args.timeout)
            print(f"executed in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    finally:  # a failed run is written too, with its error output, to read what went wrong
        nbformat.write(notebook, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
