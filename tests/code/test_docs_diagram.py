"""docs/architecture.png is drawn from docs/architecture.dot as it is now, and the diagram names the
package's real modules: every component points at code that exists, and every stage module is drawn."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess

from tests.conftest import REPO, require_tool

DOCS = REPO / "docs"
PACKAGE = REPO / "src" / "coinyear"
NOT_A_COMPONENT = {"__init__", "__main__", "cli"}  # the thin CLI calls every component; it is not one


def load_build_docs():
    spec = importlib.util.spec_from_file_location("build_docs", DOCS / "build_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def diagram_modules() -> dict[str, list[str]]:
    """node name -> the modules its `module` attribute lists."""
    text = (DOCS / "architecture.dot").read_text()
    nodes = {}
    for name, attributes in re.findall(r"^\s*(\w+)\s*\[(.*)\];\s*$", text, flags=re.M):
        match = re.search(r'\bmodule="([^"]+)"', attributes)
        if match:
            nodes[name] = [m.strip() for m in match.group(1).split(",")]
    return nodes


def test_png_is_drawn_from_the_current_source():
    build_docs = load_build_docs()
    assert build_docs.diagram_stamp() == build_docs.source_hash(), (
        "docs/architecture.png is out of date with docs/architecture.dot: run `make docs`")


def test_source_is_valid_graphviz(tmp_path):
    dot = require_tool(shutil.which("dot"),
                       "Graphviz `dot` is not installed (.ci/run installs it): cannot re-render the diagram")
    out = tmp_path / "diagram.png"
    subprocess.run([dot, "-Tpng", str(DOCS / "architecture.dot"), "-o", str(out)], check=True, capture_output=True)
    assert out.stat().st_size > 10_000


def test_every_component_points_at_existing_code():
    nodes = diagram_modules()
    assert len(nodes) >= 8, nodes
    for node, modules in nodes.items():
        for module in modules:
            assert module.startswith("coinyear."), f"{node}: {module} is not a coinyear module"
            relative = module.removeprefix("coinyear.").replace(".", "/")
            exists = (PACKAGE / f"{relative}.py").is_file() or any((PACKAGE / relative).glob("*.py"))
            assert exists, f"the diagram's {node} names {module}, which does not exist in src/coinyear"


def test_every_stage_module_is_drawn():
    drawn = {module.removeprefix("coinyear.").split(".")[0] for modules in diagram_modules().values()
             for module in modules}
    stages = {path.stem for path in PACKAGE.glob("*.py")} | {path.parent.name for path in PACKAGE.glob("*/*.py")}
    missing = sorted(stages - drawn - NOT_A_COMPONENT)
    assert not missing, f"modules not in docs/architecture.dot (add them to a component, then `make docs`): {missing}"


def test_lake_node_names_every_delta_table():
    from coinyear.lake.tables import TABLES

    tables = set(TABLES)
    label = re.search(r'^\s*lake\s*\[label="([^"]+)"', (DOCS / "architecture.dot").read_text(), flags=re.M).group(1)
    missing = sorted(table for table in tables if table not in label)
    assert tables and not missing, f"Delta tables missing from the diagram's lake: {missing}"
