"""src/coinyear is layered and free of import cycles, read from the code's own imports (every import statement,
those inside functions included), against the layer order written down once in docs/build_docs.py (`LAYERS`);
docs/imports.png is drawn from the same graph."""

from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import REPO

DOCS = REPO / "docs"

# Import cycles allowed (none: a new cycle means a lower module both can import is missing).
KNOWN_CYCLES: list[list[str]] = []


def load_build_docs():
    spec = importlib.util.spec_from_file_location("build_docs", DOCS / "build_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def build_docs():
    return load_build_docs()


@pytest.fixture(scope="module")
def graph(build_docs):
    return build_docs.import_graph()


def test_the_graph_is_read_from_the_code(graph):
    """The reader sees the imports it must: top-level, function-level, relative and of packages."""
    assert len(graph) >= 40
    assert "coinyear.config" in graph["coinyear.registry"]  # top-level `from coinyear.config import ...`
    assert "coinyear.serve" in graph["coinyear.cli"]  # function-level `from coinyear.serve import serve`
    assert "coinyear.jobs.retrain" in graph["coinyear.cli"]  # function-level, a module of a package
    assert "coinyear.lake.tables" in graph["coinyear.lake.spool"]


def test_every_module_is_on_a_layer(build_docs, graph):
    missing = sorted(module for module in graph if build_docs.layer_of(module) is None)
    assert not missing, f"modules on no layer: add them to LAYERS in docs/build_docs.py: {missing}"


def test_no_import_cycle(build_docs, graph):
    assert build_docs.import_cycles(graph) == KNOWN_CYCLES, (
        "import cycles in src/coinyear: break each with a lower module both can import")


def test_no_import_runs_up_the_layers(build_docs, graph):
    upward = build_docs.upward_imports(graph)
    assert not upward, ("imports of a higher layer (docs/build_docs.py LAYERS, lowest first): "
                        + ", ".join(f"{a} -> {b} ({build_docs.layer_of(a)} -> {build_docs.layer_of(b)})"
                                    for a, b in upward))


def test_the_checks_fail_on_a_cycle_and_an_upward_import(build_docs, tmp_path):
    """The same checks on a small package of their own: a cycle through a function-level import and a relative
    import, and an import up the layers, are found."""
    package = tmp_path / "toy"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("def late():\n    from toy.high import thing\n    return thing\n")
    (package / "high.py").write_text("from toy import low\nthing = 1\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "a.py").write_text("from . import b\n")
    (package / "sub" / "b.py").write_text("from .a import name\nimport toy.low\n")
    graph = build_docs.import_graph(package)
    assert graph["toy.low"] == {"toy.high"} and graph["toy.sub.b"] == {"toy.sub.a", "toy.low"}
    assert build_docs.import_cycles(graph) == [["toy.high", "toy.low"], ["toy.sub.a", "toy.sub.b"]]
    layers = {"bottom": ("toy", "toy.low", "toy.sub"), "top": ("toy.high",)}
    assert build_docs.upward_imports(graph, layers) == [("toy.low", "toy.high")]
    assert build_docs.layer_of("toy.sub.a", layers) == "bottom" and build_docs.layer_of("other", layers) is None


def test_the_diagram_is_drawn_from_the_current_code(build_docs, graph):
    assert (DOCS / "imports.dot").read_text() == build_docs.imports_dot(graph), (
        "docs/imports.dot is out of date with src/coinyear's imports: run `make docs`")
    assert build_docs.diagram_stamp(DOCS / "imports.png") == build_docs.source_hash(DOCS / "imports.dot"), (
        "docs/imports.png is out of date with docs/imports.dot: run `make docs`")


def test_the_serve_package_loads_its_app_only_when_asked():
    """`coinyear.serve` exports create_app and serve lazily: a light piece (auth, used by the UI) comes without
    the app, the model runtime or torch. Before: the package imported serve.app, hence torch, at import."""
    import subprocess
    import sys

    code = ("import sys, coinyear.serve.auth; "
            "assert 'torch' not in sys.modules and 'coinyear.serve.app' not in sys.modules, 'loaded'; "
            "from coinyear.serve import create_app, serve; assert callable(create_app) and callable(serve)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
