"""docs/api_schema.md against the real gateway: its generated reference equals the server's OpenAPI, its
endpoint and error-code tables list exactly what the server has, and every example request in it, sent to a
gateway serving a trained model, gets the documented status and an answer of the documented shape."""

from __future__ import annotations

import base64
import importlib.util
import json
import re
import shutil
import time

from tests.conftest import REPO, make_settings

DOC = REPO / "docs" / "api_schema.md"
TOKEN = "docs-token"
EXAMPLE = re.compile(r"<!-- example: (GET|POST) (\S+) -> (\d{3})( without token)? -->\n(.*?)(?=<!-- example:|\n## )",
                     flags=re.S)
BLOCK = re.compile(r"```(json|text)\n(.*?)```", flags=re.S)


def load_build_docs():
    spec = importlib.util.spec_from_file_location("build_docs", REPO / "docs" / "build_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def examples(text: str) -> list[dict]:
    found = []
    for method, path, status, no_token, body in EXAMPLE.findall(text):
        blocks = BLOCK.findall(body)
        request = json.loads(blocks.pop(0)[1]) if method == "POST" else None
        answer = blocks[0] if blocks else None
        found.append({"method": method, "path": path, "status": int(status), "token": not no_token,
                      "request": request, "answer": answer})
    return found


def same_shape(documented, actual, where: str = "answer") -> None:
    """The documented example and the real answer have the same keys, list lengths and value types."""
    if isinstance(documented, dict):
        assert isinstance(actual, dict), f"{where}: expected an object, got {actual!r}"
        if documented:
            assert set(actual) == set(documented), f"{where}: keys {sorted(actual)} != documented {sorted(documented)}"
            for key, value in documented.items():
                if key == "error_code":
                    assert actual[key] == value, f"{where}.error_code: {actual[key]} != documented {value}"
                same_shape(value, actual[key], f"{where}.{key}")
    elif isinstance(documented, list):
        assert isinstance(actual, list) and len(actual) == len(documented), f"{where}: {actual!r}"
        for index, (doc_item, item) in enumerate(zip(documented, actual)):
            same_shape(doc_item, item, f"{where}[{index}]")
    elif isinstance(documented, bool):
        assert isinstance(actual, bool), f"{where}: expected a boolean, got {actual!r}"
    elif isinstance(documented, (int, float)):
        assert isinstance(actual, (int, float)) and not isinstance(actual, bool), f"{where}: {actual!r}"
    elif isinstance(documented, str):
        assert isinstance(actual, str), f"{where}: expected a string, got {actual!r}"
    # null: documented as "may be empty"; any value is accepted


def fill(value, photos: dict[str, str]):
    if isinstance(value, dict):
        return {k: fill(v, photos) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, photos) for v in value]
    return photos.get(value, value) if isinstance(value, str) else value


def test_generated_reference_matches_the_servers_openapi():
    build_docs = load_build_docs()
    expected = build_docs.generated_block(build_docs.openapi_document())
    assert build_docs.current_block(DOC.read_text()) == expected, (
        "docs/api_schema.md's reference is out of date with the server: run `python docs/build_docs.py api`")


def test_endpoint_table_lists_exactly_the_servers_routes():
    build_docs = load_build_docs()
    served = {(method.upper(), path) for path, operations in build_docs.openapi_document()["paths"].items()
              for method in operations}
    overview = DOC.read_text().split("## Authentication")[0]
    documented = set(re.findall(r"^\| `(GET|POST|PUT|DELETE|PATCH)` \| `([^`]+)` \|", overview, flags=re.M))
    assert documented == served, f"only documented: {documented - served}; only served: {served - documented}"


def test_error_table_lists_exactly_the_servers_error_codes():
    from coinyear.serve import errors

    defined = {value for name, value in vars(errors).items() if name.isupper() and isinstance(value, str)
               and value == name}
    table = DOC.read_text().split("## Status codes and errors")[1].split("\n\n<!--")[0]
    documented = set(re.findall(r"^\| \d{3} \| `([A-Z_]+)` \|", table, flags=re.M))
    assert documented == defined, f"only documented: {documented - defined}; only defined: {defined - documented}"


def test_examples_are_parsed():
    found = examples(DOC.read_text())
    assert len(found) >= 12
    assert {e["status"] for e in found} >= {200, 400, 401, 404}
    assert any(e["request"] and "params" in e["request"] for e in found), "the interval example is there"


def test_every_example_against_a_real_gateway(trained, ocre_dir, tmp_path):
    from fastapi.testclient import TestClient

    from coinyear.serve import create_app

    trained_settings, outcome = trained
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(trained_settings.home_dir / "mlflow.db", home / "mlflow.db")  # same registry, own lake and spool
    settings = make_settings(home, api_tokens=[TOKEN], alias_poll_seconds=0.5, log_flush_seconds=0.2)
    coin = ocre_dir / "images"
    photos = {"<front photo as base64>": base64.b64encode((coin / "heads00001.jpg").read_bytes()).decode(),
              "<back photo as base64>": base64.b64encode((coin / "tails00001.jpg").read_bytes()).decode()}
    with TestClient(create_app(settings, host="127.0.0.1")) as client:
        deadline = time.time() + 120
        while client.get("/ready").status_code != 200:
            assert time.time() < deadline, f"gateway not ready: {client.get('/version').json()}"
            time.sleep(0.2)
        for example in examples(DOC.read_text()):
            headers = {"Authorization": f"Bearer {TOKEN}"} if example["token"] else {}
            label = f"{example['method']} {example['path']} -> {example['status']}"
            if example["method"] == "GET":
                response = client.get(example["path"], headers=headers)
            else:
                response = client.post(example["path"], json=fill(example["request"], photos), headers=headers)
            assert response.status_code == example["status"], \
                f"{label}: got {response.status_code} {response.text[:300]}"
            if response.status_code == 200 and "/invocations" in example["path"]:
                assert response.headers["served-model-name"] == settings.model_name
                assert response.headers["served-model-version"] == outcome.version
                photos["<request id>"] = response.headers["x-request-id"]
            kind, answer = example["answer"] or (None, None)
            if kind == "json":
                same_shape(json.loads(answer), response.json(), label)
            elif kind == "text":
                for line in answer.strip().splitlines():
                    metric = re.split(r"[{ ]", line, maxsplit=1)[0]
                    assert metric in response.text, f"{label}: documented metric {metric} is not exported"
