"""The gateway's databricks backend, for real, on loopback: `coinyear serve` with COINYEAR_SERVING_BACKEND=databricks
forwards to a "Model Serving endpoint" that is a real `coinyear serve` gateway (local backend), keeps feedback
and the photos of big requests in a volume through the Files API, and `coinyear ingest-payloads` closes the loop.

No Databricks workspace is reachable here: the workspace is a small local HTTP server implementing exactly the
calls the gateway makes: `POST /serving-endpoints/{name}/invocations` (passed through to the real gateway,
recorded as Model Serving would log it), `GET /api/2.0/serving-endpoints/{name}` and the Files API
`PUT /api/2.0/fs/files{path}` (stored under a folder standing for /Volumes); anything else is a 404 (among it
the databricks-sdk's `/.well-known/databricks-config` probe).
"""

from __future__ import annotations

import io
import json
import threading
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
import pytest
import requests
from PIL import Image

from coinyear.databricks.payloads import PAYLOAD_COLUMNS, ingest_payloads
from coinyear.lake import open_lake
from coinyear.lake.tables import FEEDBACK, INFERENCE_LOG
from tests.conftest import make_settings
from tests.system.test_payloads import PAYLOAD_SCHEMA
from tests.system.test_serve import AUTH, TOKENS, Server, b64, coin_row, copy_home

VOLUME = "/Volumes/main/coinyear/loop"
ENDPOINT = "coinyear"
MODEL_SERVING_LOG_LIMIT = 1024 * 1024  # Model Serving leaves `request` null above this
BIG_BODY = 8_000_000


class FakeWorkspace(ThreadingHTTPServer):
    """The Databricks REST calls the gateway makes; invocations go on to `upstream` (a real gateway)."""

    def __init__(self, root: Path, upstream: str):
        super().__init__(("127.0.0.1", 0), WorkspaceHandler)
        self.root, self.upstream = root, upstream
        self.invocations: list[dict] = []  # what Model Serving would log in the payload table
        self.uploads: list[dict] = []
        self.tokens: set[str] = set()
        self.fail_uploads = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def volume(self) -> Path:
        return self.root / VOLUME.lstrip("/")


class WorkspaceHandler(BaseHTTPRequestHandler):
    def _reply(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", "Content-Length": str(len(body)),
                           **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self):
        if self.path == f"/api/2.0/serving-endpoints/{ENDPOINT}":
            self.server.tokens.add(self.headers.get("Authorization", ""))
            entity = {"name": "coinyear-1", "entity_name": "coinyear", "entity_version": "1"}
            self._reply(200, json.dumps({
                "name": ENDPOINT, "state": {"ready": "READY", "config_update": "NOT_UPDATING"},
                "config": {"served_entities": [entity],
                           "traffic_config": {"routes": [{"served_model_name": "coinyear-1",
                                                          "traffic_percentage": 100}]}}}).encode())
        else:
            self._reply(404, b'{"error_code": "ENDPOINT_NOT_FOUND", "message": "no such API"}')

    def do_POST(self):
        body = self._body()
        self.server.tokens.add(self.headers.get("Authorization", ""))
        if self.path != f"/serving-endpoints/{ENDPOINT}/invocations":
            return self._reply(404, b'{"error_code": "ENDPOINT_NOT_FOUND", "message": "no such API"}')
        arrived = datetime.now(UTC)
        answer = requests.post(f"{self.server.upstream}{self.path}", data=body, timeout=60,
                               headers={"Authorization": self.headers["Authorization"],
                                        "Content-Type": "application/json"})
        self.server.invocations.append({"body": body, "status": answer.status_code, "response": answer.text,
                                        "time": arrived})
        headers = {k: v for k, v in answer.headers.items() if k.startswith("served-model")}
        self._reply(answer.status_code, answer.content, headers)

    def do_PUT(self):
        body = self._body()
        self.server.tokens.add(self.headers.get("Authorization", ""))
        url = urlsplit(self.path)
        prefix = "/api/2.0/fs/files"
        if not url.path.startswith(prefix + "/Volumes/"):
            return self._reply(404, b'{"error_code": "ENDPOINT_NOT_FOUND", "message": "no such API"}')
        if self.server.fail_uploads:
            return self._reply(503, b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "storage down"}')
        path = unquote(url.path[len(prefix):])
        target = self.server.root / path.lstrip("/")
        overwrite = parse_qs(url.query).get("overwrite", ["true"])[0] == "true"
        if target.exists() and not overwrite:
            return self._reply(409, b'{"error_code": "ALREADY_EXISTS", "message": "file exists"}')
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)
        self.server.uploads.append({"path": path, "overwrite": overwrite,
                                    "content_type": self.headers.get("Content-Type")})
        self._reply(204)

    def log_message(self, *args):
        pass


def noise_photo(seed: int, size: int = 640) -> bytes:
    """A photo that does not compress: two of them make a request over Model Serving's logging limit."""
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def setup(trained, tmp_path_factory):
    base = tmp_path_factory.mktemp("databricks")
    endpoint = Server(copy_home(trained, base / "endpoint"), COINYEAR_MAX_BODY_BYTES=BIG_BODY).start()
    workspace = FakeWorkspace(base / "workspace", endpoint.url)
    threading.Thread(target=workspace.serve_forever, daemon=True).start()
    gateway = Server(base / "gateway", COINYEAR_SERVING_BACKEND="databricks", COINYEAR_ENDPOINT_NAME=ENDPOINT,
                     COINYEAR_LOOP_VOLUME=VOLUME, DATABRICKS_HOST=workspace.url, DATABRICKS_TOKEN=TOKENS[1],
                     COINYEAR_MAX_BODY_BYTES=BIG_BODY)
    (base / "gateway").mkdir(exist_ok=True)  # Server() already made it (its TMPDIR lives there)
    gateway.start()
    yield endpoint, workspace, gateway, base
    gateway.kill()
    endpoint.kill()
    workspace.shutdown()
    workspace.server_close()


def test_forwarding_gateway_answers_as_the_endpoint_and_closes_the_loop(setup, spark):
    endpoint, workspace, gateway, base = setup
    rows = [coin_row(1), coin_row(2)]
    direct = endpoint.post({"dataframe_records": rows})
    via = gateway.post({"dataframe_records": rows, "client_request_id": "the-client's-own"})
    assert direct.status_code == 200 and via.status_code == 200, via.text
    assert via.json()["predictions"] == pytest.approx(direct.json()["predictions"], abs=1e-6)
    assert via.headers["served-model-name"] == "coinyear" and via.headers["served-model-version"] == "1"
    request_id = via.headers["x-request-id"]
    forwarded = json.loads(workspace.invocations[-1]["body"])
    assert forwarded["client_request_id"] == request_id  # what ingest-payloads keys inference_log rows on
    assert forwarded["dataframe_records"] == rows
    assert workspace.tokens == {f"Bearer {TOKENS[1]}"}  # the workspace credential, never the client's
    # inference parameters travel unchanged: the similar coins come from the endpoint's own model
    near = gateway.post({"inputs": rows[:1], "params": {"neighbours": 2, "interval": 0.9}})
    assert near.status_code == 200, near.text
    assert json.loads(workspace.invocations[-1]["body"])["params"] == {"neighbours": 2, "interval": 0.9}
    own = endpoint.post({"inputs": rows[:1], "params": {"neighbours": 2}}).json()["predictions"][0]["neighbours"]
    assert near.json()["predictions"][0]["neighbours"] == own

    version = gateway.get("/version").json()
    assert (version["serving_backend"], version["endpoint_name"], version["model_version"]) == \
           ("databricks", ENDPOINT, "1")
    assert gateway.get("/ready").status_code == 200

    # the endpoint's own errors come back as they were; a body that is not JSON never leaves the gateway
    refused = gateway.post({"inputs": [{"front_image_base64": "not base64!", "back_image_base64": "x"}]})
    assert refused.status_code == 400 and refused.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    calls = len(workspace.invocations)
    garbage = requests.post(f"{gateway.url}/serving-endpoints/{ENDPOINT}/invocations", data=b"{not json",
                            headers=AUTH, timeout=30)
    assert garbage.status_code == 400 and garbage.json()["error_code"] == "BAD_REQUEST"
    assert len(workspace.invocations) == calls
    assert gateway.post({"inputs": rows}, path="/serving-endpoints/other/invocations").status_code == 404

    # a request over Model Serving's logging limit: its photos are in the volume before it is forwarded
    big_front, big_back = noise_photo(1), noise_photo(2)
    big = gateway.post({"inputs": [{"front_image_base64": b64(big_front), "back_image_base64": b64(big_back)}]})
    assert big.status_code == 200, big.text
    big_id = big.headers["x-request-id"]
    assert len(workspace.invocations[-1]["body"]) > MODEL_SERVING_LOG_LIMIT
    stored = workspace.volume() / "photos" / big_id / "0"
    assert (stored / "front").read_bytes() == big_front and (stored / "back").read_bytes() == big_back
    workspace.fail_uploads = True  # photos that cannot be kept: not answered, not forwarded
    calls = len(workspace.invocations)
    assert gateway.post({"inputs": [{"front_image_base64": b64(big_front),
                                     "back_image_base64": b64(big_back)}]}).status_code == 503
    assert len(workspace.invocations) == calls

    # feedback: a file in the volume, written only when valid and only when it was stored
    assert gateway.post({"request_id": f"{request_id}-1", "year": 41}, path="/feedback").status_code == 503
    workspace.fail_uploads = False
    assert gateway.post({"request_id": f"{request_id}-1", "year": 0}, path="/feedback").status_code == 400
    answer = gateway.post({"request_id": f"{request_id}-1", "year": 41, "source": "ui"}, path="/feedback")
    assert answer.status_code == 200 and answer.json()["recorded"] is True
    (feedback_file,) = (workspace.volume() / "feedback").glob("*.json")
    assert json.loads(feedback_file.read_text())["request_id"] == f"{request_id}-1"
    assert all(u["content_type"] == "application/octet-stream" for u in workspace.uploads)
    assert [u["overwrite"] for u in workspace.uploads if "/feedback/" in u["path"]] == [False]

    # Model Serving's payload table, as it would log the forwarded requests; then the job
    table, entities = f"default.payload_{uuid.uuid4().hex[:8]}", f"default.entities_{uuid.uuid4().hex[:8]}"
    logged = []
    for index, call in enumerate(workspace.invocations):
        oversize = len(call["body"]) > MODEL_SERVING_LOG_LIMIT
        logged.append((call["time"].date(), f"dbx-{index}", json.loads(call["body"]).get("client_request_id"),
                       call["time"], call["status"], 1.0, 40, None if oversize else call["body"].decode(),
                       call["response"], "entity-1", ["MAX_REQUEST_SIZE_EXCEEDED"] if oversize else [], "sp"))
    spark.createDataFrame(logged, PAYLOAD_SCHEMA).select(*PAYLOAD_COLUMNS).write.saveAsTable(table)
    spark.createDataFrame([("entity-1", "coinyear", "1")], "served_entity_id string, entity_name string, "
                          "entity_version string").write.saveAsTable(entities)
    settings = make_settings(base / "job", payload_table=table, loop_volume=str(workspace.volume()),
                             endpoint_name=ENDPOINT)
    first = ingest_payloads(settings, spark, served_entities=entities)
    assert (first.requests_mapped, first.feedback_appended, first.feedback_waiting) == (len(logged), 1, 0)
    log = open_lake(settings).read(INFERENCE_LOG).set_index("request_id")
    for row in range(2):
        assert log.loc[f"{request_id}-{row}", "prediction"] == pytest.approx(via.json()["predictions"][row])
        assert b64(log.loc[f"{request_id}-{row}", "front_image"]) == rows[row]["front_image_base64"]
    assert log.loc[big_id, "front_image"] == big_front and log.loc[big_id, "back_image"] == big_back
    assert log.loc[big_id, "prediction"] == pytest.approx(big.json()["predictions"][0])
    assert log.loc[near.headers["x-request-id"], "prediction"] == pytest.approx(near.json()["predictions"][0]["year"])
    assert set(log["model_version"]) == {"1"}
    feedback = open_lake(settings).read(FEEDBACK)
    assert list(feedback["request_id"]) == [f"{request_id}-1"] and list(feedback["year_from"]) == [41]

    again = ingest_payloads(settings, spark, served_entities=entities)
    assert (again.requests_mapped, again.feedback_appended) == (0, 0)
    assert open_lake(settings).count(FEEDBACK) == 1 and open_lake(settings).count(INFERENCE_LOG) == len(log)
    spark.sql(f"DROP TABLE {table}")
    spark.sql(f"DROP TABLE {entities}")


def test_without_a_volume_the_databricks_backend_refuses_to_start(tmp_path):
    from coinyear.config import Settings
    from coinyear.databricks.gateway import RemoteBackend
    from coinyear.serve.app import create_app

    with pytest.raises(RuntimeError, match="COINYEAR_LOOP_VOLUME"):
        create_app(Settings(home=tmp_path, serving_backend="databricks"), "127.0.0.1", RemoteBackend)
