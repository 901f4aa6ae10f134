"""A local stand-in for the Databricks REST API: exactly the calls `coinyear deploy` makes through databricks-sdk,
plus those the Databricks CLI makes for the steps of docs/databricks.md (secrets, apps), on 127.0.0.1
(`WorkspaceClient(host=fake.url, token="x")`). Each call names where its behaviour comes from.

Implemented:
  GET    /.well-known/databricks-config                    host metadata, read when a WorkspaceClient is made
  OAuth machine-to-machine (docs "Authorize service principal access to Databricks with OAuth"; what the SDK's
  `oauth-m2m` auth does with DATABRICKS_CLIENT_ID / DATABRICKS_CLIENT_SECRET):
  GET    /oidc/.well-known/oauth-authorization-server      the token endpoint
  POST   /oidc/v1/token                                    client_credentials, the client id and secret in HTTP
                                                           Basic auth (`add_oauth_secret`): an access token acting
                                                           as that service principal; a wrong secret is 401
  Model Serving (docs.databricks.com/api/workspace/servingendpoints; SDK `w.serving_endpoints`):
  POST   /api/2.0/serving-endpoints                        `create` (409 RESOURCE_ALREADY_EXISTS if it exists); the
                                                           creator gets CAN_MANAGE, nobody else any permission
  GET    /api/2.0/serving-endpoints/{name}                 `get`, what `wait_get_serving_endpoint_not_updating`
                                                           polls (404 RESOURCE_DOES_NOT_EXIST)
  PUT    /api/2.0/serving-endpoints/{name}/config          `update_config` (409 RESOURCE_CONFLICT while updating)
  DELETE /api/2.0/serving-endpoints/{name}                 `delete` (its permissions go with it)
  GET    /api/2.0/permissions/serving-endpoints/{id}       `get_permissions` (CAN_MANAGE needed)
  PATCH  /api/2.0/permissions/serving-endpoints/{id}       `update_permissions`: adds or changes the entries given,
                                                           keeps the others (CAN_MANAGE needed); levels CAN_VIEW,
                                                           CAN_QUERY, CAN_MANAGE
  POST   /serving-endpoints/{name}/invocations             `query`: routed by the traffic split; 403
                                                           PERMISSION_DENIED without CAN_QUERY (docs: "Manage
                                                           permissions on a model serving endpoint": querying needs
                                                           Can Query)
  POST   /serving-endpoints/{name}/served-models/{entity}/invocations   query one served entity (same rule)
  Secrets (docs.databricks.com/api/workspace/secrets; `databricks secrets create-scope` / `put-secret`):
  POST   /api/2.0/secrets/scopes/create                    `w.secrets.create_scope` (409 RESOURCE_ALREADY_EXISTS)
  POST   /api/2.0/secrets/put                              `w.secrets.put_secret` (404 without the scope)
  GET    /api/2.0/secrets/get                              `w.secrets.get_secret`: the value base64-encoded; 404
                                                           without the scope or key; 403 without READ on the scope
                                                           (docs "Secret ACLs": its creator has MANAGE, nobody else
                                                           anything unless granted; granting is not implemented)
  Apps (docs.databricks.com/api/workspace/apps; SDK `w.apps`), as `databricks bundle deploy` / `bundle run <app>`
  call them (databricks/cli bundle/direct/dresources/app.go, bundle/run/app.go):
  POST   /api/2.0/apps?no_compute=true                     `create`: what `bundle deploy` sends (no compute unless
                                                           lifecycle.started); each resource must exist ("Add
                                                           resources to a Databricks app": "The resource must
                                                           exist"), else 400; the app's service principal gets the
                                                           resource's permission, as the platform grants it
  GET    /api/2.0/apps/{name}                              `get`: app_status RUNNING only with active compute and a
                                                           succeeded deployment, else UNAVAILABLE
  POST   /api/2.0/apps/{name}/start                        `start`: compute ACTIVE
  POST   /api/2.0/apps/{name}/deployments                  `deploy`: refused while the compute is not ACTIVE (the
                                                           CLI starts it first for that reason)
  GET    /api/2.0/apps/{name}/deployments/{id}             `get_deployment`
  GET    /api/2.0/permissions/apps/{name}                  `w.apps.get_permissions` (CAN_MANAGE needed)
  PATCH  /api/2.0/permissions/apps/{name}                  `w.apps.update_permissions` (CAN_MANAGE needed); levels
                                                           CAN_USE, CAN_MANAGE; the creator gets CAN_MANAGE
  Jobs (docs.databricks.com/api/workspace/jobs; SDK `w.jobs`), as `bundle deploy` creates them and the UI app
  triggers them (docs "Manage access to jobs": run now needs CAN_MANAGE_RUN, seeing runs CAN_VIEW):
  POST   /api/2.2/jobs/create                              `create`: the creator is IS_OWNER
  POST   /api/2.2/jobs/run-now                             `run_now` (404 unknown job, 403 without CAN_MANAGE_RUN): a
                                                           run PENDING, triggered by the caller (`runs`); nothing
                                                           runs its tasks
  GET    /api/2.2/jobs/runs/list                           `list_runs` of one job, newest first (403 without
                                                           CAN_VIEW)
  PATCH  /api/2.0/permissions/jobs/{id}                    `update_permissions` (CAN_MANAGE or IS_OWNER needed);
                                                           levels CAN_VIEW, CAN_MANAGE_RUN, CAN_MANAGE, IS_OWNER
  SQL warehouses (docs "Statement Execution API"; SDK `w.statement_execution`), as the UI app reads the tables:
  POST   /api/2.0/sql/statements                           `execute_statement`: only `SELECT <*|`col`, ...> FROM
                                                           <catalog.schema.table>` over `tables` (pandas frames),
                                                           `CREATE TABLE IF NOT EXISTS <table> (`col` TYPE, ...)`
                                                           and `INSERT INTO <table> (`col`, ...) VALUES (:p, ...),
                                                           ...` with named `parameters` (no value: NULL);
                                                           403 without CAN_USE on the warehouse; a missing table or
                                                           column is a FAILED statement (TABLE_OR_VIEW_NOT_FOUND,
                                                           UNRESOLVED_COLUMN); results SUCCEEDED at once, inline,
                                                           JSON_ARRAY (every value a string or null), one chunk
  Unity Catalog models, as MLflow's registry client for `databricks-uc` calls them (mlflow's
  store/_unity_catalog/registry/rest_store.py; routes from its databricks_uc_registry_service.proto); who may call
  each is the Unity Catalog API's rule for the same operation (docs.databricks.com/api/workspace/registeredmodels,
  .../modelversions; "Apply tags to Unity Catalog securable objects"), over `uc_models` (`add_uc_model`):
  GET    /api/2.0/mlflow/unity-catalog/registered-models/get    `get_registered_model` (MlflowClient reads it
                                                                 before moving an alias): owner or EXECUTE
  GET    /api/2.0/mlflow/unity-catalog/model-versions/get       `get_model_version`: owner or EXECUTE ("Get a
                                                                 model version"), else 403 PERMISSION_DENIED
  GET    /api/2.0/mlflow/unity-catalog/registered-models/alias  `get_model_version_by_alias`: owner or EXECUTE; an
                                                                 alias not set is INVALID_PARAMETER_VALUE "not found"
  POST   /api/2.0/mlflow/unity-catalog/registered-models/alias  `set_registered_model_alias`: the model's owner only
                                                                 ("Set Registered Model Alias": a metastore admin or
                                                                 the owner), else 403 PERMISSION_DENIED
  POST   /api/2.0/mlflow/unity-catalog/model-versions/set-tag   `set_model_version_tag`: owner or APPLY_TAG
  DELETE /api/2.0/mlflow/unity-catalog/model-versions/delete-tag `delete_model_version_tag`: owner or APPLY_TAG
  A warehouse (`add_warehouse`) is a workspace's, made before the sequence; an app resource `sql_warehouse` must
  name an existing one and gives the app's service principal its permission on it.
  The Apps proxy in front of a running app (`call_app`; docs "Connect to an API Databricks app using token
  authentication" and "Access HTTP headers passed to Databricks apps"): a bearer token only on `/api/` routes
  (another path with a token: 401, as a client without the browser login gets nothing there), an unknown token 401,
  no CAN_USE on the app 403, an app that is not RUNNING 503; the request goes on to the app's code without the
  caller's `Authorization` header and with the proxy's X-Forwarded-Email / -Preferred-Username / -User, X-Real-Ip,
  X-Request-Id (whatever the caller sent under those names is replaced).

Identities: a bearer token is a principal (`principals`, `add_principal`): "x" is the deploying user, an app's
service principal gets the token `app_token(name)`; an unknown token is 401. Groups are what `add_principal` says.

Updates behave like Model Serving's: a create or config update becomes `pending_config` with
`state.config_update` IN_PROGRESS; after `settle_polls` GETs it is either applied (NOT_UPDATING, READY, served
entities DEPLOYMENT_READY) or, when a version is in `fail_update`, rejected (UPDATE_FAILED, the old config keeps
serving, as a failed container build does). Queries answer with the REAL registered model version, loaded with
`mlflow.pyfunc.load_model(models:/name/version)` from the test's registry: a version whose artifacts are broken
answers 500, as its model server would. Every query body is kept in `payloads` (what the AI Gateway payload table
would log: client_request_id, served entity, status). Every request is kept in `calls`; anything else is a 404
recorded in `unhandled` (tests assert it stays empty, so a new SDK call cannot go unnoticed).

What it leaves out (a real workspace differs): OAuth for users (their tokens are fixed strings; only service
principals' M2M secrets are exchanged), workspace admins (who can do everything), minutes-long container builds
and app starts, scale-to-zero and workload sizes (recorded, not enforced), AI Gateway tables (recorded, nothing is
written), Unity Catalog beyond the model calls above (the served versions come from the test's MLflow registry;
tables are frames in `tables`, without grants; no metastore admins, no USE CATALOG / USE SCHEMA checks), job
runs (a run stays PENDING: no task runs), SQL beyond one SELECT, CREATE TABLE IF NOT EXISTS or INSERT ... VALUES
(and no table privileges: CREATE TABLE, MODIFY), the apps' own processes (RUNNING is a state; app code runs only
as the `upstream` a test hands to `call_app`), which X-Forwarded-* headers the proxy sends for a
service principal (undocumented: here no e-mail), rate limits, route optimization.
"""

from __future__ import annotations

import base64
import copy
import itertools
import json
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import parse_qs, urlsplit

import pandas as pd

from tests.conftest import send_json

NAME = re.compile(r"^[A-Za-z0-9_-]+$")
APP_NAME = re.compile(r"^[a-z0-9-]{2,30}$")
APP_LEVELS = ("CAN_USE", "CAN_MANAGE")  # app permission levels, weakest first
WAREHOUSE_LEVELS = ("CAN_VIEW", "CAN_MONITOR", "CAN_USE", "CAN_MANAGE", "IS_OWNER")  # weakest first
TABLE_NAME = r"([A-Za-z0-9_]+\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+)"
SELECT = re.compile(rf"^SELECT (\*|`[^`]+`(?:, `[^`]+`)*) FROM {TABLE_NAME}$")
CREATE = re.compile(rf"^CREATE TABLE IF NOT EXISTS {TABLE_NAME} \((`[^`]+` [A-Z]+(?:, `[^`]+` [A-Z]+)*)\)$")
INSERT = re.compile(rf"^INSERT INTO {TABLE_NAME} \((`[^`]+`(?:, `[^`]+`)*)\) VALUES (\(:\w+(?:, :\w+)*\)"
                    r"(?:, \(:\w+(?:, :\w+)*\))*)$")
# Databricks SQL column types -> how the fake holds them (pandas dtypes)
SQL_DTYPES = {"STRING": "object", "INT": "int32", "BIGINT": "int64", "DOUBLE": "float64", "BOOLEAN": "bool",
              "TIMESTAMP": "datetime64[ns, UTC]"}
JOB_LEVELS = ("CAN_VIEW", "CAN_MANAGE_RUN", "CAN_MANAGE", "IS_OWNER")  # job permission levels, weakest first
PROXY_HEADERS = ("authorization", "x-forwarded-email", "x-forwarded-preferred-username", "x-forwarded-user",
                 "x-forwarded-host", "x-real-ip", "x-request-id")  # the Apps proxy owns these
DEPLOYER = "x"  # the token of the user who deploys (the bundle's owner, the jobs' run-as in dev)
LEVELS = ("CAN_VIEW", "CAN_QUERY", "CAN_MANAGE")  # serving endpoint permission levels, weakest first


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def app_token(name: str) -> str:
    """The bearer token the fake gives the service principal of app `name`."""
    return f"app-{name}"


class FakeWorkspace:
    """The server and its state; use as a context manager (starts and stops the server thread)."""

    def __init__(self, registry_uri: str, settle_polls: int = 1, models: dict | None = None):
        self.registry_uri = registry_uri
        self.workspace_id = "1234567890123456"
        self.settle_polls = settle_polls
        self.endpoints: dict[str, dict] = {}
        self.acls: dict[str, dict[tuple[str, str], str]] = {}  # endpoint id -> (kind, principal) -> level
        self.principals: dict[str, dict] = {}  # token -> {"user_name" | "service_principal_name", "groups"}
        self.add_principal(DEPLOYER, user_name="deployer@example.com", groups=("users",))
        self.secrets: dict[str, dict[str, str]] = {}  # scope -> key -> value
        self.scope_managers: dict[str, str] = {}  # scope -> the principal who created it (MANAGE)
        self.oauth_secrets: dict[str, str] = {}  # service principal application id -> its OAuth secret
        self.jobs: dict[str, dict] = {}  # job id -> {"job_id", "settings"}
        self.warehouses: dict[str, dict] = {}  # SQL warehouse id -> {"name"}
        self.tables: dict[str, pd.DataFrame] = {}  # Unity Catalog tables by catalog.schema.table
        self.uc_models: dict[str, dict] = {}  # Unity Catalog models by catalog.schema.model (`add_uc_model`)
        self.runs: list[dict] = []  # job runs, newest first
        self.apps: dict[str, dict] = {}
        self.fail_update: set[str] = set()  # versions whose deployment fails (UPDATE_FAILED)
        self.calls: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.payloads: list[dict] = []  # one per query, as the AI Gateway payload table logs it
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

    def add_principal(self, token: str, *, user_name: str | None = None, service_principal_name: str | None = None,
                      groups: tuple[str, ...] = ()) -> None:
        who = {"user_name": user_name} if user_name else {"service_principal_name": service_principal_name}
        self.principals[token] = {**who, "groups": set(groups)}

    # ------------------------------------------------------------------------------------------- routing
    def dispatch(self, method: str, path: str, body: dict, token: str | None = None) -> tuple[int, dict, dict]:
        """(status, JSON answer, extra headers) for one request."""
        url = urlsplit(path)
        parts, query = url.path.strip("/").split("/"), parse_qs(url.query)
        with self._lock:
            self.calls.append((method, path))
            if method == "GET" and parts == ["oidc", ".well-known", "oauth-authorization-server"]:
                return 200, {"authorization_endpoint": f"{self.url}/oidc/v1/authorize",
                             "token_endpoint": f"{self.url}/oidc/v1/token"}, {}
            if method == "POST" and parts == ["oidc", "v1", "token"]:
                return 200, self.issue_token(token or "", body), {}
            if method == "GET" and parts == [".well-known", "databricks-config"]:
                # what WorkspaceClient() reads first (host metadata); a PAT needs none of the OIDC part
                return 200, {"oidc_endpoint": f"{self.url}/oidc", "workspace_id": self.workspace_id}, {}
            caller = self.principals.get(token or "")
            if caller is None:
                raise ApiError(401, "UNAUTHENTICATED", "Invalid access token.")
            answer = self.control(method, parts, query, body, caller)
            if answer is not None:
                return 200, answer, {}
            entity = None
            if method == "POST" and parts[:1] == ["serving-endpoints"] and parts[-1] == "invocations":
                if len(parts) == 3:
                    self.require(self._endpoint(parts[1])["id"], caller, "CAN_QUERY")
                    entity = self.route(parts[1])
                elif len(parts) == 5 and parts[2] == "served-models":
                    self.require(self._endpoint(parts[1])["id"], caller, "CAN_QUERY")
                    entity = self.active_entity(parts[1], parts[3])
            if entity is None:
                self.unhandled.append((method, path))
                raise ApiError(404, "ENDPOINT_NOT_FOUND", f"No API found for '{method} {path}'")
            version = (entity["entity_name"], entity["entity_version"])
            logged = {"endpoint": parts[1], "served_entity": entity["name"],
                      "client_request_id": body.get("client_request_id"), "requester": _name(caller)}
            self.payloads.append(logged)
        # scoring outside the control-plane lock, as a model server runs apart from the endpoint's API
        try:
            answer = self.predict(version, body)
        except ApiError as error:
            logged["status_code"] = error.status
            raise
        logged["status_code"] = 200
        return 200, answer, {"served-model-name": entity["name"]}

    def control(self, method: str, parts: list[str], query: dict, body: dict, caller: dict) -> dict | None:
        """The answer of a control-plane call, or None when `parts` is not one."""
        if parts[:3] == ["api", "2.0", "serving-endpoints"]:
            rest = parts[3:]
            if method == "POST" and not rest:
                return self.create(body, caller)
            if method == "GET" and len(rest) == 1:
                return self.get(rest[0])
            if method == "DELETE" and len(rest) == 1:
                endpoint = self._endpoint(rest[0])
                self.require(endpoint["id"], caller, "CAN_MANAGE")
                del self.endpoints[rest[0]]
                self.acls.pop(endpoint["id"], None)
                return {}
            if method == "PUT" and len(rest) == 2 and rest[1] == "config":
                self.require(self._endpoint(rest[0])["id"], caller, "CAN_MANAGE")
                return self.update_config(rest[0], body)
        if parts[:4] == ["api", "2.0", "permissions", "serving-endpoints"] and len(parts) == 5:
            if method == "GET":
                return self.permissions(parts[4], caller)
            if method == "PATCH":
                return self.update_permissions(parts[4], body, caller)
        if parts[:4] == ["api", "2.0", "permissions", "apps"] and len(parts) == 5:
            if method == "GET":
                return self.app_permissions(parts[4], caller)
            if method == "PATCH":
                return self.update_app_permissions(parts[4], body, caller)
        if parts[:4] == ["api", "2.0", "permissions", "jobs"] and len(parts) == 5 and method == "PATCH":
            return self.update_job_permissions(parts[4], body, caller)
        if method == "POST" and parts == ["api", "2.0", "sql", "statements"]:
            return self.execute_statement(body, caller)
        if parts[:4] == ["api", "2.0", "mlflow", "unity-catalog"]:
            args = {key: values[0] for key, values in query.items()} | body  # GET sends query, others a body
            return self.uc_model_call(method, "/".join(parts[4:]), args, caller)
        if parts[:3] == ["api", "2.2", "jobs"]:
            if method == "POST" and parts[3:] == ["create"]:
                return self.create_job(body, caller)
            if method == "POST" and parts[3:] == ["run-now"]:
                return self.run_now(str(body.get("job_id")), caller)
            if method == "GET" and parts[3:] == ["runs", "list"]:
                return self.list_runs(query.get("job_id", [""])[0], caller)
        if parts[:3] == ["api", "2.0", "secrets"]:
            if method == "POST" and parts[3:] == ["scopes", "create"]:
                return self.create_scope(body, caller)
            if method == "POST" and parts[3:] == ["put"]:
                return self.put_secret(body)
            if method == "GET" and parts[3:] == ["get"]:
                return self.get_secret(query.get("scope", [""])[0], query.get("key", [""])[0], caller)
        if parts[:3] == ["api", "2.0", "apps"]:
            rest = parts[3:]
            if method == "POST" and not rest:
                return self.create_app(body, query.get("no_compute", ["false"])[0].lower() == "true", caller)
            if method == "GET" and len(rest) == 1:
                return self.app_view(self._app(rest[0]))
            if method == "POST" and len(rest) == 2 and rest[1] == "start":
                return self.start_app(rest[0])
            if method == "POST" and len(rest) == 2 and rest[1] == "deployments":
                return self.deploy_app(rest[0], body)
            if method == "GET" and len(rest) == 3 and rest[1] == "deployments":
                deployment = self._app(rest[0]).get("active_deployment") or {}
                if deployment.get("deployment_id") != rest[2]:
                    raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"no deployment {rest[2]} of app {rest[0]}")
                return copy.deepcopy(deployment)
        return None

    # ------------------------------------------------------------------------------------------- permissions
    def level(self, endpoint_id: str, caller: dict, levels: tuple[str, ...] = LEVELS) -> str | None:
        """The caller's strongest permission on the object (an endpoint id, or `apps/<name>`): their own entry or
        one of their groups'."""
        acl = self.acls.get(endpoint_id, {})
        keys = [(kind, caller[kind]) for kind in ("user_name", "service_principal_name") if caller.get(kind)]
        keys += [("group_name", group) for group in caller["groups"]]
        held = [acl[key] for key in keys if key in acl]
        return max(held, key=levels.index) if held else None

    def require(self, endpoint_id: str, caller: dict, needed: str, levels: tuple[str, ...] = LEVELS) -> None:
        held = self.level(endpoint_id, caller, levels)
        if held is None or levels.index(held) < levels.index(needed):
            what = (endpoint_id if endpoint_id.startswith(("apps/", "jobs/", "warehouses/"))
                    else f"serving endpoint {endpoint_id}")
            raise ApiError(403, "PERMISSION_DENIED", f"{_name(caller)} does not have {needed} permission on "
                                                     f"{what} (has {held or 'none'})")

    def grant(self, object_id: str, body: dict, levels: tuple[str, ...]) -> None:
        """A Permissions API PATCH: each entry (exactly one principal, a level of `levels`) added or changed."""
        for entry in body.get("access_control_list") or []:
            kinds = [kind for kind in ("user_name", "group_name", "service_principal_name") if entry.get(kind)]
            if len(kinds) != 1 or entry.get("permission_level") not in levels:
                raise ApiError(400, "INVALID_PARAMETER_VALUE", f"bad access control entry {entry}")
            self.acls.setdefault(object_id, {})[(kinds[0], entry[kinds[0]])] = entry["permission_level"]

    def access_control_list(self, object_id: str) -> list[dict]:
        """The object's entries as the Permissions API's GET lists them (none inherited here)."""
        return [{kind: principal, "all_permissions": [{"permission_level": level, "inherited": False}]}
                for (kind, principal), level in self.acls.get(object_id, {}).items()]

    def _endpoint_by_id(self, endpoint_id: str) -> dict:
        for endpoint in self.endpoints.values():
            if endpoint["id"] == endpoint_id:
                return endpoint
        raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"Serving endpoint with id {endpoint_id} does not exist.")

    def permissions(self, endpoint_id: str, caller: dict) -> dict:
        self._endpoint_by_id(endpoint_id)
        self.require(endpoint_id, caller, "CAN_MANAGE")
        return {"object_id": f"/serving-endpoints/{endpoint_id}", "object_type": "serving-endpoint",
                "access_control_list": self.access_control_list(endpoint_id)}

    def update_permissions(self, endpoint_id: str, body: dict, caller: dict) -> dict:
        self._endpoint_by_id(endpoint_id)
        self.require(endpoint_id, caller, "CAN_MANAGE")
        self.grant(endpoint_id, body, LEVELS)
        return self.permissions(endpoint_id, caller)

    # ------------------------------------------------------------------------------------------- Unity Catalog models
    def add_uc_model(self, full_name: str, owner: str, versions: int, grants: dict[str, set[str]] | None = None
                     ) -> None:
        """A registered model with versions 1..`versions`, owned by the principal of token `owner` (as `bundle
        deploy` makes its deployer the owner); `grants`: principal or group name -> privileges (EXECUTE,
        APPLY_TAG)."""
        self.uc_models[full_name] = {
            "owner": _name(self.principals[owner]), "grants": grants or {}, "aliases": {},
            "versions": {str(v): {"tags": {}, "creation_timestamp": 1_700_000_000_000 + v} for v in
                         range(1, versions + 1)}}

    def uc_model_call(self, method: str, call: str, args: dict, caller: dict) -> dict | None:
        model = self.uc_models.get(args.get("name", ""))
        if model is None:
            raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"Registered model '{args.get('name')}' does not exist.")
        if method == "GET" and call == "registered-models/get":  # MlflowClient reads it before an alias move
            self.require_uc(model, args["name"], caller, "EXECUTE")
            return {"registered_model": {"name": args["name"], "aliases": [
                {"alias": alias, "version": version} for alias, version in model["aliases"].items()]}}
        if method == "GET" and call == "model-versions/get":
            self.require_uc(model, args["name"], caller, "EXECUTE")
            return {"model_version": self.uc_version(args["name"], str(args["version"]))}
        if method == "GET" and call == "registered-models/alias":
            self.require_uc(model, args["name"], caller, "EXECUTE")
            if args["alias"] not in model["aliases"]:
                raise ApiError(400, "INVALID_PARAMETER_VALUE",
                               f"Registered model alias {args['alias']} not found.")
            return {"model_version": self.uc_version(args["name"], model["aliases"][args["alias"]])}
        if method == "POST" and call == "registered-models/alias":
            self.require_uc(model, args["name"], caller, None)
            self.uc_version(args["name"], str(args["version"]))
            model["aliases"][args["alias"]] = str(args["version"])
            return {}
        if call in ("model-versions/set-tag", "model-versions/delete-tag") and method in ("POST", "DELETE"):
            self.require_uc(model, args["name"], caller, "APPLY_TAG")
            tags = model["versions"][self.uc_version(args["name"], str(args["version"]))["version"]]["tags"]
            if method == "POST":
                tags[args["key"]] = args.get("value", "")
            else:
                tags.pop(args["key"], None)
            return {}
        return None

    def require_uc(self, model: dict, name: str, caller: dict, privilege: str | None) -> None:
        """The owner may do anything; anyone else needs `privilege` granted to them or one of their groups (None:
        only the owner may)."""
        who = _name(caller)
        if who == model["owner"]:
            return
        held = set().union(*(model["grants"].get(p, set()) for p in (who, *caller["groups"])))
        if privilege is None or privilege not in held:
            needed = "ownership" if privilege is None else privilege
            raise ApiError(403, "PERMISSION_DENIED", f"User does not have {needed} on Registered Model '{name}'.")

    def uc_version(self, name: str, version: str) -> dict:
        """A model version as the UC registry answers it (mlflow.ucmodelregistry.ModelVersion)."""
        model = self.uc_models[name]
        if version not in model["versions"]:
            raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"Model version {name}/{version} does not exist.")
        entry = model["versions"][version]
        return {"name": name, "version": version, "status": "READY", "creation_timestamp":
                entry["creation_timestamp"], "tags": [{"key": k, "value": v} for k, v in entry["tags"].items()],
                "aliases": [{"alias": a, "version": v} for a, v in model["aliases"].items() if v == version]}

    # ------------------------------------------------------------------------------------------- secrets, apps
    def create_scope(self, body: dict, caller: dict | None = None) -> dict:
        scope = body.get("scope") or ""
        if scope in self.secrets:
            raise ApiError(409, "RESOURCE_ALREADY_EXISTS", f"Scope {scope} already exists!")
        self.secrets[scope] = {}
        self.scope_managers[scope] = _name(caller or self.principals[DEPLOYER])
        return {}

    def get_secret(self, scope: str, key: str, caller: dict) -> dict:
        if scope not in self.secrets:
            raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"Scope {scope} does not exist!")
        if self.scope_managers.get(scope) != _name(caller):
            raise ApiError(403, "PERMISSION_DENIED", f"{_name(caller)} does not have READ permission on scope "
                                                     f"{scope}")
        if key not in self.secrets[scope]:
            raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"Failed to get secret {key} for scope {scope}.")
        return {"key": key, "value": base64.b64encode(self.secrets[scope][key].encode()).decode()}

    def add_oauth_secret(self, client_id: str, secret: str) -> None:
        """A service principal (application id `client_id`) with an OAuth secret."""
        self.oauth_secrets[client_id] = secret

    def issue_token(self, authorization: str, form: dict) -> dict:
        """The token endpoint: `authorization` is what followed `Basic ` (HTTP Basic of client id:secret)."""
        try:
            client_id, _, secret = base64.b64decode(authorization.removeprefix("Basic ")).decode().partition(":")
        except ValueError:
            client_id, secret = "", ""
        if form.get("grant_type") != "client_credentials" or not client_id \
                or self.oauth_secrets.get(client_id) != secret:
            raise ApiError(401, "invalid_client", "Client authentication failed")
        access = f"oauth-{uuid.uuid4().hex}"
        self.add_principal(access, service_principal_name=client_id)
        return {"access_token": access, "token_type": "Bearer", "expires_in": 3600, "scope": form.get("scope")}

    def put_secret(self, body: dict) -> dict:
        if body.get("scope") not in self.secrets:
            raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"Scope {body.get('scope')} does not exist!")
        self.secrets[body["scope"]][body["key"]] = body.get("string_value") or ""
        return {}

    def _app(self, name: str) -> dict:
        if name not in self.apps:
            raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"App with name {name} does not exist or is deleted.")
        return self.apps[name]

    def create_app(self, body: dict, no_compute: bool, caller: dict | None = None) -> dict:
        name = body.get("name") or ""
        if not APP_NAME.match(name):
            raise ApiError(400, "INVALID_PARAMETER_VALUE", f"invalid app name {name!r}")
        if name in self.apps:
            raise ApiError(409, "RESOURCE_ALREADY_EXISTS", f"An app with the same name already exists: {name}")
        client_id = str(uuid.uuid4())
        grants = []
        for resource in body.get("resources") or []:  # each must exist before the app may name it
            if "serving_endpoint" in resource:
                wanted = resource["serving_endpoint"]
                if wanted.get("name") not in self.endpoints:
                    raise ApiError(400, "INVALID_PARAMETER_VALUE", f"Resource {resource.get('name')}: serving "
                                                                   f"endpoint {wanted.get('name')} does not exist")
                grants.append((self.endpoints[wanted["name"]]["id"], wanted.get("permission", "CAN_QUERY")))
            elif "sql_warehouse" in resource:
                wanted = resource["sql_warehouse"]
                if wanted.get("id") not in self.warehouses:
                    raise ApiError(400, "INVALID_PARAMETER_VALUE", f"Resource {resource.get('name')}: SQL "
                                                                   f"warehouse {wanted.get('id')} does not exist")
                grants.append((f"warehouses/{wanted['id']}", wanted.get("permission", "CAN_USE")))
            elif "secret" in resource:
                wanted = resource["secret"]
                if wanted.get("key") not in self.secrets.get(wanted.get("scope"), {}):
                    raise ApiError(400, "INVALID_PARAMETER_VALUE", f"Resource {resource.get('name')}: secret "
                                                                   f"{wanted.get('scope')}/{wanted.get('key')} "
                                                                   f"does not exist")
            else:
                raise ApiError(400, "INVALID_PARAMETER_VALUE", f"resource kind not implemented by the fake: "
                                                               f"{resource}")
        for object_id, level in grants:  # an endpoint id, or warehouses/<id>
            self.acls.setdefault(object_id, {})[("service_principal_name", client_id)] = level
        self.add_principal(app_token(name), service_principal_name=client_id)
        creator = caller or self.principals[DEPLOYER]
        kind = "user_name" if creator.get("user_name") else "service_principal_name"
        self.acls[f"apps/{name}"] = {(kind, creator[kind]): "CAN_MANAGE"}
        self.apps[name] = {**body, "service_principal_client_id": client_id, "service_principal_name": f"app-{name}",
                           "url": f"https://{name}-{self.workspace_id}.fake.databricksapps.com",
                           "compute_status": {"state": "STOPPED" if no_compute else "ACTIVE"},
                           "active_deployment": None}
        return self.app_view(self.apps[name])

    def start_app(self, name: str) -> dict:
        app = self._app(name)
        app["compute_status"] = {"state": "ACTIVE", "message": "App compute is active."}
        return self.app_view(app)

    def deploy_app(self, name: str, body: dict) -> dict:
        app = self._app(name)
        if app["compute_status"]["state"] != "ACTIVE":
            raise ApiError(400, "INVALID_PARAMETER_VALUE", f"App {name} compute is {app['compute_status']['state']}:"
                                                           f" start the app compute to deploy the app.")
        app["active_deployment"] = {**body, "deployment_id": f"deploy-{next(self._counter)}",
                                    "status": {"state": "SUCCEEDED", "message": "Deployment succeeded"}}
        return copy.deepcopy(app["active_deployment"])

    def app_view(self, app: dict) -> dict:
        running = app["compute_status"]["state"] == "ACTIVE" and app["active_deployment"] is not None
        return {**copy.deepcopy(app),
                "app_status": {"state": "RUNNING", "message": "App has status: App is running"} if running else
                              {"state": "UNAVAILABLE", "message": "App status is unavailable."}}

    def app_running(self, name: str) -> bool:
        return self.app_view(self._app(name))["app_status"]["state"] == "RUNNING"

    def add_warehouse(self, name: str = "Starter Warehouse", users: str = "users") -> str:
        """A SQL warehouse the group `users` may use (a workspace's serverless starter warehouse); its id."""
        warehouse_id = f"{next(self._counter):016x}"
        self.warehouses[warehouse_id] = {"name": name}
        self.acls[f"warehouses/{warehouse_id}"] = {("group_name", users): "CAN_USE"}
        return warehouse_id

    def execute_statement(self, body: dict, caller: dict) -> dict:
        warehouse_id = body.get("warehouse_id") or ""
        if warehouse_id not in self.warehouses:
            raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"Warehouse {warehouse_id} does not exist.")
        self.require(f"warehouses/{warehouse_id}", caller, "CAN_USE", WAREHOUSE_LEVELS)
        statement_id = str(uuid.uuid4())
        statement = (body.get("statement") or "").strip()

        def failed(message: str) -> dict:
            return {"statement_id": statement_id, "status": {"state": "FAILED", "error": {
                "error_code": "BAD_REQUEST", "message": message}}}

        if match := CREATE.match(statement):
            if match.group(1) not in self.tables:
                self.tables[match.group(1)] = pd.DataFrame({
                    name: pd.Series(dtype=SQL_DTYPES[kind])
                    for name, kind in re.findall(r"`([^`]+)` ([A-Z]+)", match.group(2))})
            return {"statement_id": statement_id, "status": {"state": "SUCCEEDED"}}
        if match := INSERT.match(statement):
            return self.insert(statement_id, match, body.get("parameters") or [], failed)
        match = SELECT.match(statement)
        if match is None:
            raise ApiError(400, "INVALID_PARAMETER_VALUE", "the fake runs only SELECT <columns> FROM <table>, "
                                                           "CREATE TABLE IF NOT EXISTS and INSERT INTO ... VALUES")
        columns, table = match.group(1), match.group(2)
        if table not in self.tables:
            return failed(f"[TABLE_OR_VIEW_NOT_FOUND] The table or view `{table}` cannot be found.")
        frame = self.tables[table]
        names = list(frame.columns) if columns == "*" else re.findall(r"`([^`]+)`", columns)
        if unknown := [name for name in names if name not in frame.columns]:
            return failed(f"[UNRESOLVED_COLUMN] A column with name `{unknown[0]}` cannot be resolved.")

        def type_name(series: pd.Series) -> str:
            kind = series.dtype.kind
            return {"i": "LONG", "u": "LONG", "f": "DOUBLE", "b": "BOOLEAN", "M": "TIMESTAMP"}.get(kind, "STRING")

        def text(value) -> str | None:
            if value is None or (not isinstance(value, str) and pd.isna(value)):
                return None
            if isinstance(value, pd.Timestamp):
                return value.tz_convert("UTC").strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
            if isinstance(value, bool):
                return "true" if value else "false"
            return str(value)

        rows = [[text(value) for value in row] for row in frame[names].itertuples(index=False)]
        return {"statement_id": statement_id, "status": {"state": "SUCCEEDED"},
                "manifest": {"format": "JSON_ARRAY", "total_row_count": len(rows), "schema": {
                    "column_count": len(names), "columns": [
                        {"name": name, "position": i, "type_name": type_name(frame[name])}
                        for i, name in enumerate(names)]}},
                "result": {"chunk_index": 0, "row_offset": 0, "row_count": len(rows), "data_array": rows}}

    def insert(self, statement_id: str, match: re.Match, parameters: list[dict], failed) -> dict:
        """The rows of an `INSERT INTO <table> (...) VALUES (...)` appended to the table, typed as its columns."""
        table, names = match.group(1), re.findall(r"`([^`]+)`", match.group(2))
        if table not in self.tables:
            return failed(f"[TABLE_OR_VIEW_NOT_FOUND] The table or view `{table}` cannot be found.")
        frame = self.tables[table]
        if unknown := [name for name in names if name not in frame.columns]:
            return failed(f"[UNRESOLVED_COLUMN] A column with name `{unknown[0]}` cannot be resolved.")
        given = {parameter["name"]: parameter.get("value") for parameter in parameters}
        rows = []
        for group in re.findall(r"\(([^)]*)\)", match.group(3)):
            markers = [marker.strip().lstrip(":") for marker in group.split(",")]
            if missing := [marker for marker in markers if marker not in given]:
                return failed(f"[UNBOUND_SQL_PARAMETER] Found the unbound parameter: {missing[0]}.")
            rows.append(dict(zip(names, [given[marker] for marker in markers])))
        added = pd.DataFrame(rows, columns=list(frame.columns))
        for name in frame.columns:
            kind = str(frame[name].dtype)
            if kind.startswith("datetime64"):
                added[name] = pd.to_datetime(added[name], utc=True)
            elif kind == "bool":
                added[name] = added[name].map({"true": True, "false": False})
            elif kind != "object":
                added[name] = pd.to_numeric(added[name]).astype(kind)
        self.tables[table] = pd.concat([frame, added], ignore_index=True) if len(frame) else added
        return {"statement_id": statement_id, "status": {"state": "SUCCEEDED"},
                "manifest": {"format": "JSON_ARRAY", "total_row_count": 1, "schema": {"column_count": 1, "columns": [
                    {"name": "num_affected_rows", "position": 0, "type_name": "LONG"}]}},
                "result": {"row_count": 1, "data_array": [[str(len(added))]]}}

    def _job(self, job_id: str) -> dict:
        if job_id not in self.jobs:
            raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"Job {job_id} does not exist.")
        return self.jobs[job_id]

    def create_job(self, body: dict, caller: dict) -> dict:
        job_id = str(next(self._counter) + 1000)
        self.jobs[job_id] = {"job_id": int(job_id), "settings": body}
        kind = "user_name" if caller.get("user_name") else "service_principal_name"
        self.acls[f"jobs/{job_id}"] = {(kind, caller[kind]): "IS_OWNER"}
        return {"job_id": int(job_id)}

    def update_job_permissions(self, job_id: str, body: dict, caller: dict) -> dict:
        self._job(job_id)
        self.require(f"jobs/{job_id}", caller, "CAN_MANAGE", JOB_LEVELS)
        self.grant(f"jobs/{job_id}", body, JOB_LEVELS)
        return {"object_id": f"/jobs/{job_id}", "object_type": "job"}

    def run_now(self, job_id: str, caller: dict) -> dict:
        job = self._job(job_id)
        self.require(f"jobs/{job_id}", caller, "CAN_MANAGE_RUN", JOB_LEVELS)
        run_id = next(self._counter) + 5000
        self.runs.insert(0, {"job_id": int(job_id), "run_id": run_id, "number_in_job": run_id,
                             "run_name": job["settings"].get("name"), "creator_user_name": _name(caller),
                             "start_time": int(time.time() * 1000), "trigger": "ONE_TIME",
                             "state": {"life_cycle_state": "PENDING", "state_message": ""},
                             "status": {"state": "QUEUED"},
                             "run_page_url": f"{self.url}/jobs/{job_id}/runs/{run_id}"})
        return {"run_id": run_id, "number_in_job": run_id}

    def list_runs(self, job_id: str, caller: dict) -> dict:
        self._job(job_id)
        self.require(f"jobs/{job_id}", caller, "CAN_VIEW", JOB_LEVELS)
        return {"runs": [copy.deepcopy(run) for run in self.runs if str(run["job_id"]) == job_id],
                "has_more": False}

    def app_permissions(self, name: str, caller: dict) -> dict:
        self._app(name)
        self.require(f"apps/{name}", caller, "CAN_MANAGE", APP_LEVELS)
        return {"object_id": f"/apps/{name}", "object_type": "apps",
                "access_control_list": self.access_control_list(f"apps/{name}")}

    def update_app_permissions(self, name: str, body: dict, caller: dict) -> dict:
        self._app(name)
        self.require(f"apps/{name}", caller, "CAN_MANAGE", APP_LEVELS)
        self.grant(f"apps/{name}", body, APP_LEVELS)
        return self.app_permissions(name, caller)

    def call_app(self, name: str, method: str, path: str, token: str | None, upstream, body: bytes = b"",
                 headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
        """A request to app `name` through the Apps proxy (see the module docstring); `upstream(method, path,
        headers, body) -> (status, headers, body)` is the app's code. Returns (status, headers, body)."""
        try:
            with self._lock:
                self.calls.append((method, f"app:{name}{path}"))
                if not self.app_running(name):
                    raise ApiError(503, "TEMPORARILY_UNAVAILABLE", f"App {name} is not available.")
                if not token:
                    raise ApiError(401, "UNAUTHENTICATED", "no credentials (a browser is sent to the login page)")
                if urlsplit(path).path != "/api" and not urlsplit(path).path.startswith("/api/"):
                    raise ApiError(401, "UNAUTHENTICATED", "token authentication only on /api/ routes")
                caller = self.principals.get(token)
                if caller is None:
                    raise ApiError(401, "UNAUTHENTICATED", "Invalid access token.")
                self.require(f"apps/{name}", caller, "CAN_USE", APP_LEVELS)
        except ApiError as error:
            return error.status, {"content-type": "application/json"}, json.dumps(
                {"error_code": error.code, "message": error.message}).encode()
        passed = {k: v for k, v in (headers or {}).items() if k.lower() not in PROXY_HEADERS}
        identity = {"x-forwarded-user": caller.get("user_name") or caller.get("service_principal_name"),
                    "x-forwarded-preferred-username": _name(caller)}
        if caller.get("user_name"):
            identity["x-forwarded-email"] = caller["user_name"]
        passed |= {**identity, "x-forwarded-host": urlsplit(self.apps[name]["url"]).netloc,
                   "x-real-ip": "127.0.0.1", "x-request-id": str(uuid.uuid4())}
        return upstream(method, path, passed, body)

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

    def create(self, body: dict, caller: dict | None = None) -> dict:
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
        creator = caller or self.principals[DEPLOYER]
        kind = "user_name" if creator.get("user_name") else "service_principal_name"
        self.acls[self.endpoints[name]["id"]] = {(kind, creator[kind]): "CAN_MANAGE"}
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
                auth = self.headers.get("Authorization") or ""
                try:
                    raw = self.rfile.read(length) if length else b""
                    if self.headers.get("Content-Type", "").startswith("application/x-www-form-urlencoded"):
                        body = {k: v[0] for k, v in parse_qs(raw.decode()).items()}  # the OAuth token request
                    else:
                        body = json.loads(raw or b"{}")
                    status, answer, headers = fake.dispatch(method, self.path, body, auth.removeprefix("Bearer "))
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


def _name(principal: dict) -> str:
    return principal.get("user_name") or principal.get("service_principal_name") or "?"
