"""A local stand-in for the Databricks Model Serving REST API: exactly the calls `coinyear deploy` makes through
databricks-sdk, on 127.0.0.1 (`WorkspaceClient(host=fake.url, token="x")`).

Implemented:
  GET    /.well-known/databricks-config                    host metadata, read when a WorkspaceClient is made
  POST   /api/2.0/serving-endpoints                        create (409 RESOURCE_ALREADY_EXISTS if it exists)
  GET    /api/2.0/serving-endpoints/{name}                 details, what `wait_get_serving_endpoint_not_updating`
                                                           polls (404 RESOURCE_DOES_NOT_EXIST)
  PUT    /api/2.0/serving-endpoints/{name}/config          update_config (409 RESOURCE_CONFLICT while updating)
  DELETE /api/2.0/serving-endpoints/{name}                 delete
  POST   /serving-endpoints/{name}/invocations             query: routed by the traffic split
  POST   /serving-endpoints/{name}/served-models/{entity}/invocations   query one served entity

Updates behave like Model Serving's: a create or config update becomes `pending_config` with
`state.config_update` IN_PROGRESS; after `settle_polls` GETs it is either applied (NOT_UPDATING, READY, served
entities DEPLOYMENT_READY) or, when a version is in `fail_update`, rejected (UPDATE_FAILED, the old config keeps
serving, as a failed container build does). Queries answer with the REAL registered model version, loaded with
`mlflow.pyfunc.load_model(models:/name/version)` from the test's registry: a version whose artifacts are broken
answers 500, as its model server would. Every request is kept in `calls`; anything else is a 404 recorded in
`unhandled` (tests assert it stays empty, so a new SDK call cannot go unnoticed).

What it leaves out (a real workspace differs): authentication (any token is accepted), minutes-long container
builds, scale-to-zero and workload sizes (recorded, not enforced), AI Gateway tables (recorded, nothing is
written), permissions, rate limits, route optimization.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

import pandas as pd

from tests.conftest import send_json

NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class FakeWorkspace:
    """The server and its state; use as a context manager (starts and stops the server thread)."""

    def __init__(self, registry_uri: str, settle_polls: int = 1, models: dict | None = None):
        self.registry_uri = registry_uri
        self.workspace_id = "1234567890123456"
        self.settle_polls = settle_polls
        self.endpoints: dict[str, dict] = {}
        self.fail_update: set[str] = set()  # versions whose deployment fails (UPDATE_FAILED)
        self.calls: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.history: dict[str, list[dict[str, int]]] = {}  # endpoint -> traffic split of every applied config
        self._models = {} if models is None else models  # (name, version) -> loaded pyfunc, shareable
        self._lock = threading.RLock()
        self._load_lock = threading.Lock()
        self._counter = itertools.count()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------------------------------- routing
    def dispatch(self, method: str, path: str, body: dict) -> tuple[int, dict, dict]:
        """(status, JSON answer, extra headers) for one request."""
        parts = path.split("?")[0].strip("/").split("/")
        with self._lock:
            self.calls.append((method, path))
            if method == "GET" and parts == [".well-known", "databricks-config"]:
                # what WorkspaceClient() reads first (host metadata); a PAT needs none of the OIDC part
                return 200, {"oidc_endpoint": f"{self.url}/oidc", "workspace_id": self.workspace_id}, {}
            if parts[:3] == ["api", "2.0", "serving-endpoints"]:
                rest = parts[3:]
                if method == "POST" and not rest:
                    return 200, self.create(body), {}
                if method == "GET" and len(rest) == 1:
                    return 200, self.get(rest[0]), {}
                if method == "DELETE" and len(rest) == 1:
                    self._endpoint(rest[0])
                    del self.endpoints[rest[0]]
                    return 200, {}, {}
                if method == "PUT" and len(rest) == 2 and rest[1] == "config":
                    return 200, self.update_config(rest[0], body), {}
            entity = None
            if method == "POST" and parts[:1] == ["serving-endpoints"] and parts[-1] == "invocations":
                if len(parts) == 3:
                    entity = self.route(parts[1])
                elif len(parts) == 5 and parts[2] == "served-models":
                    entity = self.active_entity(parts[1], parts[3])
            if entity is None:
                self.unhandled.append((method, path))
                raise ApiError(404, "ENDPOINT_NOT_FOUND", f"No API found for '{method} {path}'")
            version = (entity["entity_name"], entity["entity_version"])
        # scoring outside the control-plane lock, as a model server runs apart from the endpoint's API
        return 200, self.predict(version, body), {"served-model-name": entity["name"]}

    # ------------------------------------------------------------------------------------------- control
    def _endpoint(self, name: str) -> dict:
        if name not in self.endpoints:
            raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"Endpoint with name '{name}' does not exist.")
        return self.endpoints[name]

    def _config(self, name: str, config: dict) -> dict:
        entities = config.get("served_entities") or []
        names = [e.get("name") for e in entities]
        if not entities or len(set(names)) != len(names) or not all(n and NAME.match(n) for n in names):
            raise ApiError(400, "INVALID_PARAMETER_VALUE", f"served entity names must be given, unique and "
                                                           f"alphanumeric/-/_: {names}")
        for entity in entities:
            if not entity.get("entity_name") or not entity.get("entity_version"):
                raise ApiError(400, "INVALID_PARAMETER_VALUE", "entity_name and entity_version are required")
        routes = (config.get("traffic_config") or {}).get("routes") or []
        if not routes and len(names) == 1:  # one entity and no traffic config: it takes everything
            routes = [{"served_model_name": names[0], "traffic_percentage": 100}]
        split = {r.get("served_model_name") or r.get("served_entity_name"): int(r.get("traffic_percentage", 0))
                 for r in routes}
        if sum(split.values()) != 100 or not set(split) <= set(names):
            raise ApiError(400, "INVALID_PARAMETER_VALUE", f"traffic must sum to 100 over served entities: {split}")
        now = int(time.time() * 1000)
        return {"served_entities": [{**e, "creator": "fake@example.com", "creation_timestamp": now,
                                     "state": {"deployment": "DEPLOYMENT_CREATING"}} for e in entities],
                "traffic_config": {"routes": [{"served_model_name": k, "traffic_percentage": v}
                                              for k, v in split.items()]}}

    def create(self, body: dict) -> dict:
        name = body.get("name") or ""
        if not NAME.match(name):
            raise ApiError(400, "INVALID_PARAMETER_VALUE", f"invalid endpoint name {name!r}")
        if name in self.endpoints:
            raise ApiError(409, "RESOURCE_ALREADY_EXISTS", f"Endpoint with name '{name}' already exists.")
        pending = self._config(name, body.get("config") or {})
        self.endpoints[name] = {
            "name": name, "id": f"fake-{next(self._counter)}", "creator": "fake@example.com",
            "creation_timestamp": int(time.time() * 1000), "ai_gateway": body.get("ai_gateway"),
            "tags": body.get("tags") or [], "config": None, "pending_config": pending, "config_version": 0,
            "state": {"config_update": "IN_PROGRESS", "ready": "NOT_READY"}, "polls": 0,
        }
        return self.view(name)

    def update_config(self, name: str, body: dict) -> dict:
        endpoint = self._endpoint(name)
        if endpoint["state"]["config_update"] == "IN_PROGRESS":
            raise ApiError(409, "RESOURCE_CONFLICT", f"Endpoint {name} is currently updating; try again later.")
        endpoint["pending_config"] = self._config(name, body)
        endpoint["state"]["config_update"] = "IN_PROGRESS"
        endpoint["polls"] = 0
        return self.view(name)

    def get(self, name: str) -> dict:
        endpoint = self._endpoint(name)
        if endpoint["pending_config"] is not None:
            endpoint["polls"] += 1
            if endpoint["polls"] > self.settle_polls:
                self.settle(endpoint)
        return self.view(name)

    def settle(self, endpoint: dict) -> None:
        pending, endpoint["pending_config"] = endpoint["pending_config"], None
        failing = [e for e in pending["served_entities"] if e["entity_version"] in self.fail_update]
        if failing:
            endpoint["state"]["config_update"] = "UPDATE_FAILED"
            return
        for entity in pending["served_entities"]:
            entity["state"] = {"deployment": "DEPLOYMENT_READY", "deployment_state_message": ""}
        endpoint["config_version"] += 1
        endpoint["config"] = {**pending, "config_version": endpoint["config_version"]}
        endpoint["state"] = {"config_update": "NOT_UPDATING", "ready": "READY"}
        self.history.setdefault(endpoint["name"], []).append(
            {r["served_model_name"]: r["traffic_percentage"] for r in pending["traffic_config"]["routes"]})

    def view(self, name: str) -> dict:
        endpoint = self.endpoints[name]
        shown = {k: copy.deepcopy(v) for k, v in endpoint.items() if k not in ("polls", "config_version")}
        return {k: v for k, v in shown.items() if v is not None}

    # ------------------------------------------------------------------------------------------- data plane
    def active_entity(self, name: str, entity: str) -> dict | None:
        config = self._endpoint(name)["config"] or {}
        for served in config.get("served_entities", []):
            if served["name"] == entity:
                return served
        raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"served model {entity} is not in {name}'s active config")

    def route(self, name: str) -> dict:
        """The entity a request to the whole endpoint goes to: a deterministic walk through the split."""
        config = self._endpoint(name)["config"]
        if not config:
            raise ApiError(400, "RESOURCE_NOT_READY", f"Endpoint {name} is not ready.")
        tick = next(self._counter) % 100
        for route in config["traffic_config"]["routes"]:
            tick -= route["traffic_percentage"]
            if tick < 0:
                return self.active_entity(name, route["served_model_name"])
        raise ApiError(500, "INTERNAL_ERROR", "no route")

    def predict(self, version: tuple[str, str], body: dict) -> dict:
        import mlflow

        try:
            with self._load_lock:
                if version not in self._models:
                    mlflow.set_registry_uri(self.registry_uri)
                    self._models[version] = mlflow.pyfunc.load_model(f"models:/{version[0]}/{version[1]}")
                model = self._models[version]
        except Exception as error:  # the model server of a broken version cannot start: every query fails
            raise ApiError(500, "INTERNAL_ERROR", f"model failed to load: {type(error).__name__}: {error}") \
                from error
        if "dataframe_split" in body:
            frame = pd.DataFrame(**body["dataframe_split"])
        elif "dataframe_records" in body:
            frame = pd.DataFrame(body["dataframe_records"])
        else:
            raise ApiError(400, "BAD_REQUEST", "expected dataframe_split or dataframe_records")
        try:
            predictions = model.predict(frame, params=body.get("params"))
        except Exception as error:
            raise ApiError(400, "BAD_REQUEST", f"{type(error).__name__}: {error}") from error
        return {"predictions": pd.Series(list(predictions)).tolist()}

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}") if length else {}
                    status, answer, headers = fake.dispatch(method, self.path, body)
                except ApiError as error:
                    status, answer, headers = error.status, {"error_code": error.code,
                                                             "message": error.message}, {}
                send_json(self, status, answer, headers)

            def do_GET(self):
                self._serve("GET")

            def do_POST(self):
                self._serve("POST")

            def do_PUT(self):
                self._serve("PUT")

            def do_DELETE(self):
                self._serve("DELETE")

            def do_PATCH(self):
                self._serve("PATCH")

            def log_message(self, *args):  # quiet: the calls are in `fake.calls`
                pass

        return Handler
