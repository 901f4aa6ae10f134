"""Regenerate the generated parts of docs/: the diagrams and the API reference tables.

    python docs/build_docs.py            # all (what `make docs` runs)
    python docs/build_docs.py diagram    # docs/architecture.png from docs/architecture.dot (needs Graphviz `dot`)
    python docs/build_docs.py imports    # docs/imports.dot and .png: src/coinyear's modules on their layers, with
                                         # every import between them, read from the code (needs Graphviz `dot`)
    python docs/build_docs.py api        # the generated block of docs/api_schema.md from the server's OpenAPI

Each PNG carries the SHA-256 of the .dot source it was drawn from, imports.dot and the API block are pure
functions of the code, so tests/code/test_docs_*.py and tests/code/test_imports.py can tell when one is out of
date. `LAYERS` below is the package's layer order, written down once: test_imports.py fails on an import cycle
or an import that runs up these layers, and imports.png draws them.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
DIAGRAM_SOURCE = DOCS / "architecture.dot"
DIAGRAM = DOCS / "architecture.png"
API_DOC = DOCS / "api_schema.md"
IMPORTS_SOURCE = DOCS / "imports.dot"
IMPORTS_DIAGRAM = DOCS / "imports.png"
PACKAGE = DOCS.parent / "src" / "coinyear"
SOURCE_HASH_KEY = "source-sha256"
API_BEGIN = "<!-- BEGIN GENERATED FROM OPENAPI: python docs/build_docs.py api -->"
API_END = "<!-- END GENERATED FROM OPENAPI -->"


# ---------------------------------------------------------------------------------------------- diagram
def source_hash(path: Path = DIAGRAM_SOURCE) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def render_diagram(source: Path = DIAGRAM_SOURCE, out: Path = DIAGRAM) -> None:
    """Draw the .dot with Graphviz and stamp the PNG with the source's hash."""
    from PIL import Image, PngImagePlugin

    dot = shutil.which("dot")
    if dot is None:
        raise SystemExit("Graphviz `dot` not found: apt-get install graphviz")
    png = subprocess.run([dot, "-Tpng", str(source)], check=True, capture_output=True).stdout
    info = PngImagePlugin.PngInfo()
    info.add_text(SOURCE_HASH_KEY, source_hash(source))
    with Image.open(io.BytesIO(png)) as image:
        image.save(out, pnginfo=info, optimize=True)


def diagram_stamp(path: Path = DIAGRAM) -> str | None:
    from PIL import Image

    with Image.open(path) as image:
        return image.text.get(SOURCE_HASH_KEY)


# ---------------------------------------------------------------------------------------------- imports
# The layers of src/coinyear, lowest first. A module imports modules of its own layer and of the layers below it,
# never of one above; an entry is a module or a package (all its modules), a module's layer that of its longest
# entry. Data flows data -> model -> train -> registry -> serve -> lake -> jobs, but the lake is imported by
# everything that writes it (the gateway, the jobs, the UI), so it sits below them as storage; the packaged model
# (pyfunc, the evidence it returns, the scoring parameters it takes) sits between the network and the training
# that logs it. The Databricks target (the gateway's remote backend, payload ingestion, the endpoint deploy) builds
# on the local stages; coinyear.targets, above both, picks one at start-up.
LAYERS: dict[str, tuple[str, ...]] = {
    "foundation": ("coinyear", "coinyear.years", "coinyear.rulers", "coinyear.reference", "coinyear.config",
                   "coinyear.identity", "coinyear.spark"),
    "data": ("coinyear.data",),
    "model": ("coinyear.backbones", "coinyear.model", "coinyear.runtime", "coinyear.quality", "coinyear.calibrate"),
    "packaged model": ("coinyear.params", "coinyear.coin_input", "coinyear.neighbours", "coinyear.pyfunc"),
    "train": ("coinyear.evaluate", "coinyear.behaviour", "coinyear.recipe", "coinyear.augment", "coinyear.fit",
              "coinyear.experiment", "coinyear.train", "coinyear.distributed"),
    "registry": ("coinyear.registry",),
    "lake": ("coinyear.lake",),
    "serve": ("coinyear.serve", "coinyear.predict", "coinyear.resumable"),
    "jobs": ("coinyear.jobs", "coinyear.deploy"),
    "databricks": ("coinyear.databricks",),
    "ui / cli": ("coinyear.ui", "coinyear.targets", "coinyear.cli"),
}


def module_names(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name (a package's `__init__.py` by the package's name)."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, read from every import statement in its source: at the top,
    inside functions and under TYPE_CHECKING alike (a cycle through a function-level import is still a cycle).

    `from a import b` is an import of the module `a.b` when there is one, else of `a`; an import of a package is
    of its `__init__`.
    """
    modules = module_names(package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package `level - 1` above this module's
                    base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
                targets |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                            for alias in node.names}
        found = set()
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a name inside a module: that module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
        graph[name] = found
    return graph


def layer_of(module: str, layers: dict[str, tuple[str, ...]] = LAYERS) -> str | None:
    """The layer whose longest entry is `module` or a package holding it; None when no entry covers it."""
    best, length = None, -1
    for layer, entries in layers.items():
        for entry in entries:
            covers = module == entry or (entry != "coinyear" and module.startswith(entry + "."))
            if covers and len(entry) > length:
                best, length = layer, len(entry)
    return best


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The modules that import each other, directly or round a longer loop: each strongly connected set of more
    than one module, sorted (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(found)


def upward_imports(graph: dict[str, set[str]],
                   layers: dict[str, tuple[str, ...]] = LAYERS) -> list[tuple[str, str]]:
    """(importer, imported) for each import of a module on a higher layer than the importer's."""
    order = {layer: rank for rank, layer in enumerate(layers)}
    return sorted((module, target) for module, targets in graph.items() for target in targets
                  if (a := layer_of(module, layers)) is not None and (b := layer_of(target, layers)) is not None
                  and order[b] > order[a])


def unit_of(module: str) -> str:
    """The diagram's node for a module: a top-level module, or the subpackage (serve, jobs, ui, lake) holding it."""
    return ".".join(module.split(".")[:2])


def imports_dot(graph: dict[str, set[str]], layers: dict[str, tuple[str, ...]] = LAYERS) -> str:
    """The import graph as Graphviz source: one box per layer (lowest at the bottom), one node per top-level module
    or subpackage, one arrow per importing pair; in red an import cycle (round a subpackage's modules: its node)."""
    cycles = import_cycles(graph)
    units = sorted({unit_of(module) for module in graph})
    arrows = sorted({(unit_of(a), unit_of(b)) for a, targets in graph.items() for b in targets
                     if unit_of(a) != unit_of(b)})
    unit_cycles = import_cycles({u: {b for a, b in arrows if a == u} for u in units})
    red_arrows = {(a, b) for group in unit_cycles for a, b in arrows if a in group and b in group}
    inner = {unit_of(group[0]): group for group in cycles if len({unit_of(m) for m in group}) == 1}
    lines = ["// Generated by `python docs/build_docs.py imports` from src/coinyear's imports and build_docs.LAYERS:",
             "// do not edit (tests/code/test_imports.py checks it is current).",
             "digraph imports {",
             '    graph [rankdir=TB, fontname="DejaVu Sans", fontsize=11, nodesep=0.2, ranksep=0.35, pad=0.2, dpi=96, '
             'newrank=true, labelloc=t, label="src/coinyear: modules and subpackages on their layers (lowest at the '
             'bottom), an arrow per import; red: an import cycle"];',
             '    node [shape=box, style="rounded,filled", fontname="DejaVu Sans", fontsize=10, fillcolor="#f2f2f2", '
             'color="#666666", height=0.3];',
             '    edge [color="#777777", arrowsize=0.6];']
    for rank, layer in enumerate(layers):
        members = [unit for unit in units if layer_of(unit, layers) == layer]
        lines.append(f'    subgraph cluster_{rank} {{ label="{rank}. {layer}"; style=rounded; color="#aaaaaa"; '
                     'labeljust=l;')
        for unit in members:
            if unit == "coinyear":
                name = "__init__"
            else:
                name = unit.removeprefix("coinyear.") + ("/" if (PACKAGE.parent / unit.replace(".", "/")).is_dir()
                                                          else "")
            if unit in inner:
                loop = " ↔ ".join(m.removeprefix(unit + ".") for m in inner[unit])
                lines.append(f'        "{unit}" [label="{name}\\n({loop})", color="#d62728", penwidth=1.5];')
            else:
                lines.append(f'        "{unit}" [label="{name}"];')
        lines.append("    }")
    for a, b in arrows:
        style = ' [color="#d62728", penwidth=1.5]' if (a, b) in red_arrows else ""
        lines.append(f'    "{a}" -> "{b}"{style};')
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_imports_diagram() -> None:
    """docs/imports.dot from the code, and imports.png drawn from it."""
    IMPORTS_SOURCE.write_text(imports_dot(import_graph()))
    render_diagram(IMPORTS_SOURCE, IMPORTS_DIAGRAM)


# -------------------------------------------------------------------------------------------------- api
def openapi_document() -> dict:
    """The OpenAPI document of the gateway, exactly as `coinyear serve` publishes it at /openapi.json."""
    from coinyear.config import Settings
    from coinyear.serve.app import create_app

    return create_app(Settings(api_tokens=["docs"])).openapi()


def _schema_name(schema: dict | None) -> str:
    if not schema:
        return "-"
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " or ".join(_schema_name(s) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"array of {_schema_name(schema.get('items'))}"
    return schema.get("type", "object")


def _constraints(spec: dict) -> str:
    words = {"minLength": "at least {} characters", "maxLength": "at most {} characters",
             "minimum": ">= {}", "maximum": "<= {}", "default": "default {}"}
    found = []
    for part in [spec, *spec.get("anyOf", [])]:
        found += [template.format(json.dumps(part[key])) for key, template in words.items() if key in part]
    return ", ".join(dict.fromkeys(found)) or "-"


def _content_type(body: dict) -> str:
    content = body.get("content") or {}
    for kind, spec in content.items():
        return f"{kind} {_schema_name(spec.get('schema'))}"
    return "-"


def api_tables(document: dict) -> str:
    """Markdown: every operation with its parameters, body and responses, then every schema's fields."""
    lines = ["| method | path | summary | request body | responses |", "| --- | --- | --- | --- | --- |"]
    for path, operations in sorted(document.get("paths", {}).items()):
        for method, operation in operations.items():
            if method not in ("get", "post", "put", "delete", "patch"):
                continue
            params = [p["name"] for p in operation.get("parameters", []) if p.get("in") == "path"]
            body = _content_type(operation["requestBody"]) if "requestBody" in operation else "-"
            responses = ", ".join(sorted(operation.get("responses", {})))
            text = (operation.get("description") or operation.get("summary") or "").strip().splitlines()
            summary = (text[0] if text else "").replace("|", "\\|")
            shown = path + (f" ({', '.join(params)} in path)" if params else "")
            lines.append(f"| `{method.upper()}` | `{shown}` | {summary} | {body} | {responses} |")
    schemas = document.get("components", {}).get("schemas", {})
    for name, schema in sorted(schemas.items()):
        if name in ("HTTPValidationError", "ValidationError"):
            continue  # FastAPI's own; our server answers every validation problem as an MLflow error instead
        lines += ["", f"**{name}**" + (f" — {schema['description'].strip()}" if schema.get("description") else ""), ""]
        properties = schema.get("properties", {})
        if not properties:
            lines.append(f"{_schema_name(schema)}")
            continue
        required = set(schema.get("required", []))
        lines += ["| field | type | required | constraints |", "| --- | --- | --- | --- |"]
        for field, spec in properties.items():
            lines.append(f"| `{field}` | {_schema_name(spec)} | {'yes' if field in required else 'no'} "
                         f"| {_constraints(spec)} |")
    return "\n".join(lines)


def generated_block(document: dict) -> str:
    return f"{API_BEGIN}\n{api_tables(document)}\n{API_END}"


def current_block(text: str) -> str | None:
    match = re.search(re.escape(API_BEGIN) + r".*?" + re.escape(API_END), text, flags=re.S)
    return match.group(0) if match else None


def write_api_doc(document: dict, path: Path = API_DOC) -> None:
    text = path.read_text()
    if current_block(text) is None:
        raise SystemExit(f"{path} has no generated block; add the lines\n{API_BEGIN}\n{API_END}")
    path.write_text(text.replace(current_block(text), generated_block(document)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", choices=["diagram", "imports", "api", "all"], default="all")
    args = parser.parse_args(argv)
    if args.what in ("diagram", "all"):
        render_diagram()
        print(f"wrote {DIAGRAM}")
    if args.what in ("imports", "all"):
        write_imports_diagram()
        print(f"wrote {IMPORTS_SOURCE} and {IMPORTS_DIAGRAM}")
    if args.what in ("api", "all"):
        write_api_doc(openapi_document())
        print(f"updated {API_DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
