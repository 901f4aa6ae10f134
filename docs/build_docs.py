"""Regenerate the generated parts of docs/: the architecture diagram and the API reference tables.

    python docs/build_docs.py            # both (what `make docs` runs)
    python docs/build_docs.py diagram    # docs/architecture.png from docs/architecture.dot (needs Graphviz `dot`)
    python docs/build_docs.py api        # the generated block of docs/api_schema.md from the server's OpenAPI

The PNG carries the SHA-256 of the .dot source it was drawn from, and the API block is a pure function of
the OpenAPI document, so tests/code/test_docs_*.py can tell when either is out of date.
"""

from __future__ import annotations

import argparse
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
    parser.add_argument("what", nargs="?", choices=["diagram", "api", "all"], default="all")
    args = parser.parse_args(argv)
    if args.what in ("diagram", "all"):
        render_diagram()
        print(f"wrote {DIAGRAM}")
    if args.what in ("api", "all"):
        write_api_doc(openapi_document())
        print(f"updated {API_DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
