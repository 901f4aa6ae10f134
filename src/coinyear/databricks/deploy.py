"""The Databricks deploy target: a Model Serving endpoint made to serve the `production` version, with a canary.

`coinyear deploy` with COINYEAR_DEPLOY_TARGET=databricks (coinyear.deploy has the command, the result, the lock and
the record, the same for both targets). Through databricks-sdk's `WorkspaceClient` (host and token from
DATABRICKS_HOST / DATABRICKS_TOKEN or any other way the SDK authenticates):
- no endpoint yet: create it serving the production version, AI Gateway inference tables on;
- serving another version: canary. The new version becomes a second served entity with
  COINYEAR_DEPLOY_CANARY_PERCENT of the traffic; once ready it must answer its own logged input example (queried
  on that entity alone) for COINYEAR_DEPLOY_WATCH_SECONDS, without one failure; then it takes all traffic and the
  old entity is dropped;
- any failure: the previous endpoint config is restored, the alias goes back to the version that was served, and
  the run exits non-zero;
- already serving the production version, or no production version yet: nothing to do;
- an update still running after COINYEAR_DEPLOY_TIMEOUT_SECONDS: not a failure (Model Serving goes on with it):
  nothing is restored, the run says so and exits 3; the next run waits for it and finishes.
Every run gives COINYEAR_DEPLOY_QUERY_GROUP and COINYEAR_DEPLOY_QUERY_SERVICE_PRINCIPALS CAN_QUERY on the endpoint
where they lack it: a created (or deleted and re-created) endpoint has only its creator's CAN_MANAGE. Smoke queries
carry a client_request_id starting with SMOKE_REQUEST_PREFIX, which `coinyear ingest-payloads` leaves out of
inference_log.

Over 400 lines on purpose: one `Deployment`'s steps (plan, create, canary, watch, restore, grant) share its state
and its endpoint's config, and read best in the order they run.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import timedelta

from coinyear import registry
from coinyear.config import Settings, configure_mlflow
from coinyear.databricks.volume import SMOKE_REQUEST_PREFIX
from coinyear.deploy import (
    DEPLOYED,
    DRY_RUN,
    FAILED,
    ROLLED_BACK,
    SKIPPED,
    UPDATING,
    DeployBusy,
    DeployError,
    DeployResult,
    _now,
    deploy_lock,
    record,
)

log = logging.getLogger(__name__)

WATCH_QUERIES = 5  # smoke queries spread over the watch window
EXAMPLE_FILES = ("serving_input_example.json", "input_example.json")
ENDPOINT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,63}$")


class StillUpdating(Exception):
    """An endpoint update outlasted COINYEAR_DEPLOY_TIMEOUT_SECONDS: still running in Model Serving, not failed."""


# ------------------------------------------------------------------------------------------------ endpoint
def entity_name(settings: Settings, version: str) -> str:
    """The served entity's name: unique per version, and valid (no dots) for a Unity Catalog model name."""
    return f"{settings.model_name.split('.')[-1]}-{version}"


def inference_table(settings: Settings):
    """AI Gateway inference table config: COINYEAR_PAYLOAD_TABLE (`catalog.schema.<prefix>_payload`), else the
    catalog and schema of a Unity Catalog model name with the endpoint as prefix."""
    from databricks.sdk.service.serving import AiGatewayInferenceTableConfig

    if settings.payload_table:
        parts = settings.payload_table.split(".")
        if len(parts) != 3 or not parts[2].endswith("_payload") or not all(parts):
            raise DeployError(f"COINYEAR_PAYLOAD_TABLE must be catalog.schema.<prefix>_payload (the name AI "
                              f"Gateway gives the table), got {settings.payload_table!r}")
        catalog, schema, prefix = parts[0], parts[1], parts[2].removesuffix("_payload")
    elif settings.model_name.count(".") == 2:
        catalog, schema, _ = settings.model_name.split(".")
        prefix = settings.serving_endpoint_name
    else:
        raise DeployError("set COINYEAR_PAYLOAD_TABLE (catalog.schema.<prefix>_payload) or use a Unity Catalog "
                          "model name (catalog.schema.model): the endpoint's inference table needs a schema")
    return AiGatewayInferenceTableConfig(enabled=True, catalog_name=catalog, schema_name=schema,
                                         table_name_prefix=prefix)


def served_version(endpoint, model_name: str) -> str | None:
    """The version of our model that takes the most traffic in the endpoint's active config."""
    config = endpoint.config if endpoint is not None else None
    if config is None or not config.served_entities:
        return None
    traffic = {r.served_model_name or r.served_entity_name: r.traffic_percentage
               for r in (config.traffic_config.routes if config.traffic_config and config.traffic_config.routes
                         else [])}
    ours = [e for e in config.served_entities if e.entity_name == model_name]
    if not ours:
        return None
    best = max(ours, key=lambda e: traffic.get(e.name, 0 if len(ours) > 1 else 100))
    return str(best.entity_version)


def serves_only(endpoint, model_name: str, version: str) -> bool:
    """True when the endpoint's active config is exactly `version` of our model with all the traffic."""
    config = endpoint.config
    entities = (config.served_entities or []) if config else []
    return (len(entities) == 1 and entities[0].entity_name == model_name
            and str(entities[0].entity_version) == version)


def as_inputs(endpoint):
    """The active config as inputs for `update_config` (served entities, traffic): what a rollback restores."""
    from databricks.sdk.service.serving import ServedEntityInput, TrafficConfig

    config = endpoint.config
    entities = [ServedEntityInput.from_dict(e.as_dict()) for e in config.served_entities or []]
    traffic = TrafficConfig.from_dict(config.traffic_config.as_dict()) if config.traffic_config else None
    return entities, traffic


def canary_routes(old_routes: dict[str, int], new: str, percent: int) -> dict[str, int]:
    """Old routes scaled to 100 - percent (integers, the rounding given to the largest), plus `new`."""
    rest = 100 - percent
    total = sum(old_routes.values()) or 1
    scaled = {name: rest * share // total for name, share in old_routes.items() if name != new}
    if scaled:
        largest = max(scaled, key=lambda name: old_routes[name])
        scaled[largest] += rest - sum(scaled.values())
    else:
        percent = 100
    return {**scaled, new: percent}


# ------------------------------------------------------------------------------------------------ databricks
class Deployment:
    """One deploy to a Databricks Model Serving endpoint (see the module docstring)."""

    def __init__(self, settings: Settings, workspace=None, progress: Callable[[str], None] | None = None):
        self.settings = settings
        self.endpoint = settings.serving_endpoint_name
        if not ENDPOINT_NAME.match(self.endpoint):
            raise DeployError(f"endpoint name {self.endpoint!r} may hold only letters, digits, - and _ "
                              f"(set COINYEAR_ENDPOINT_NAME)")
        self._workspace = workspace
        self.progress = progress or (lambda message: log.info(message))
        self.timeout = timedelta(seconds=settings.deploy_timeout_seconds)

    @property
    def workspace(self):
        if self._workspace is None:
            from databricks.sdk import WorkspaceClient

            self._workspace = WorkspaceClient()
        return self._workspace

    def say(self, result: DeployResult, message: str) -> None:
        result.steps.append(message)
        self.progress(message)

    def get_endpoint(self):
        from databricks.sdk.errors import NotFound

        try:
            return self.workspace.serving_endpoints.get(self.endpoint)
        except NotFound:
            return None

    def run(self, version: str | None, dry_run: bool) -> DeployResult:
        settings = self.settings
        target = version or registry.version_by_alias(settings, registry.PRODUCTION)
        result = DeployResult(FAILED, "", "databricks", self.endpoint, target)
        if target is None:  # e.g. the first retraining rejected its candidate: nothing to serve yet, not an error
            result.decision = SKIPPED
            result.reason = (f"{settings.model_name} has no production version yet: nothing to deploy "
                             f"(`coinyear models promote N --to production`, or --version N)")
            return result
        try:
            registry.client(settings).get_model_version(settings.model_name, target)
        except Exception as error:
            raise DeployError(f"{settings.model_name} has no version {target}") from error
        if dry_run:
            return self.plan(result)
        try:
            with deploy_lock(settings, self.endpoint):
                self.deploy(result)
        except DeployBusy as error:  # refused, not attempted: a row, but no tag on the version
            result.decision, result.reason = FAILED, str(error)
            record(settings, result)
            return result
        record(settings, result)
        if result.decision != SKIPPED:
            registry.tag_version(settings, target, {"deployment": result.decision, "deployed_at": _now(),
                                                    "endpoint": self.endpoint,
                                                    "deployment_reason": result.reason[:5000]})
        return result

    def plan(self, result: DeployResult) -> DeployResult:
        assert result.version is not None, "run() stops before planning when there is no version"
        current = self.get_endpoint()
        result.served_before = result.served_after = served_version(current, self.settings.model_name)
        result.decision = DRY_RUN
        if current is None:
            result.reason = f"would create endpoint {self.endpoint} serving version {result.version}"
        elif serves_only(current, self.settings.model_name, result.version):
            result.reason = f"endpoint {self.endpoint} already serves version {result.version}: nothing to do"
        else:
            result.reason = (f"would canary version {result.version} at {self.settings.deploy_canary_percent}% "
                             f"beside version {result.served_before}, watch it "
                             f"{self.settings.deploy_watch_seconds:g} s, then give it all traffic")
        return result

    def deploy(self, result: DeployResult) -> None:
        """Under the lock: create, canary or skip; on failure restore the endpoint and the alias."""
        settings, target = self.settings, result.version
        assert target is not None, "run() stops before deploying when there is no version"
        alias_before = registry.version_by_alias(settings, registry.PRODUCTION)
        current = self.get_endpoint()
        if current is not None and _updating(current):
            self.say(result, f"endpoint {self.endpoint} is updating: waiting for it to finish")
            try:
                current = self._settle()
            except StillUpdating as error:
                result.decision, result.reason = UPDATING, f"{error}; nothing changed by this run"
                result.served_before = result.served_after = served_version(current, settings.model_name)
                return
        result.served_before = result.served_after = served_version(current, settings.model_name)
        if current is not None and current.config and current.config.served_entities and \
                result.served_before is None:
            raise DeployError(f"endpoint {self.endpoint} serves another model "
                              f"({', '.join(str(e.entity_name) for e in current.config.served_entities)}), not "
                              f"{settings.model_name}: set COINYEAR_ENDPOINT_NAME to this model's endpoint")
        if current is not None:
            self.grant_query(result, current.id)
        if current is not None and serves_only(current, settings.model_name, target):
            if alias_before != target:
                registry.promote(settings, target, registry.PRODUCTION)
            result.decision, result.reason = SKIPPED, f"endpoint {self.endpoint} already serves version {target}"
            return
        if alias_before != target:
            registry.promote(settings, target, registry.PRODUCTION)
        try:
            if current is None:
                self.create(result)
            else:
                self.canary(result, current)
        except StillUpdating as error:  # not a failure: restoring now would fight the update Databricks goes on with
            self.say(result, f"{error}: not restored; run `coinyear deploy` again to finish")
            result.decision = UPDATING
            result.reason = (f"{error}; version {target} neither failed nor passed: nothing restored, production "
                             f"stays on it; run `coinyear deploy` again to wait for the update and finish")
            return
        except Exception as error:  # whatever broke, production must go back to what it was
            why = f"{type(error).__name__}: {error}"
            log.exception("deploying version %s to %s failed", target, self.endpoint)
            self.say(result, f"version {target} failed: {why}; restoring the previous state")
            result.decision, result.reason = self.restore(result, current, alias_before, why)
            return
        result.served_after = target
        result.decision = DEPLOYED
        result.reason = (f"endpoint {self.endpoint} serves version {target}"
                         + (f" (was {result.served_before})" if result.served_before else " (created)"))

    def entity(self, version: str):
        from databricks.sdk.service.serving import ServedEntityInput

        return ServedEntityInput(name=entity_name(self.settings, version), entity_name=self.settings.model_name,
                                 entity_version=version, workload_size=self.settings.deploy_workload_size,
                                 scale_to_zero_enabled=self.settings.deploy_scale_to_zero)

    def create(self, result: DeployResult) -> None:
        from databricks.sdk.service.serving import AiGatewayConfig, EndpointCoreConfigInput, EndpointTag

        assert result.version is not None, "deploy() is only called with a version"
        new = self.entity(result.version)
        gateway = AiGatewayConfig(inference_table_config=inference_table(self.settings))
        self.say(result, f"creating endpoint {self.endpoint} serving version {result.version}")
        waiter = self.workspace.serving_endpoints.create(
            self.endpoint, config=EndpointCoreConfigInput(name=self.endpoint, served_entities=[new],
                                                          traffic_config=_traffic({new.name: 100})),
            ai_gateway=gateway, tags=[EndpointTag(key="coinyear_model", value=self.settings.model_name)])
        self.grant_query(result, waiter.response.id)  # at once: a new endpoint's ACL is its creator alone
        self._wait(waiter)
        self.say(result, f"endpoint {self.endpoint} is ready")
        result.smoke = self.watch(result, new.name, 0.0)

    def canary(self, result: DeployResult, current) -> None:
        settings = self.settings
        old_entities, old_traffic = as_inputs(current)
        assert result.version is not None, "deploy() is only called with a version"
        new = self.entity(result.version)
        old_routes = {r.served_model_name or r.served_entity_name: r.traffic_percentage
                      for r in (old_traffic.routes if old_traffic and old_traffic.routes else [])}
        if not old_routes and len(old_entities) == 1:
            old_routes = {old_entities[0].name: 100}
        routes = canary_routes(old_routes, new.name, settings.deploy_canary_percent)
        entities = [e for e in old_entities if e.name != new.name] + [new]
        self.say(result, f"canary: version {result.version} gets {routes[new.name]}% of the traffic "
                         f"({', '.join(f'{k} {v}%' for k, v in routes.items())})")
        self._wait(self.workspace.serving_endpoints.update_config(
            self.endpoint, served_entities=entities, traffic_config=_traffic(routes)))
        result.smoke = self.watch(result, new.name, settings.deploy_watch_seconds)
        self.say(result, f"version {result.version} passed; giving it all traffic and dropping "
                         f"{', '.join(e.name for e in entities if e.name != new.name)}")
        self._wait(self.workspace.serving_endpoints.update_config(
            self.endpoint, served_entities=[new], traffic_config=_traffic({new.name: 100})))

    def watch(self, result: DeployResult, entity: str, seconds: float) -> dict:
        """Query `entity` alone with the version's input example, WATCH_QUERIES times over `seconds` (once when
        0), checking its deployment state each time; raise at the first failure."""
        assert result.version is not None, "deploy() is only called with a version"
        body, rows = input_example(self.settings, result.version)
        queries = WATCH_QUERIES if seconds > 0 else 1
        latencies = []
        self.say(result, f"smoke: {queries} queries of {entity} over {seconds:g} s")
        for i in range(queries):
            state = self._entity_state(entity)
            if state != "DEPLOYMENT_READY":
                raise RuntimeError(f"served entity {entity} is {state}")
            started = time.perf_counter()
            marked = {**body, "client_request_id": f"{SMOKE_REQUEST_PREFIX}{entity}-{uuid.uuid4().hex[:12]}"}
            answer = self.workspace.api_client.do(
                "POST", f"/serving-endpoints/{self.endpoint}/served-models/{entity}/invocations", body=marked)
            latencies.append((time.perf_counter() - started) * 1000)
            predictions = answer.get("predictions") if isinstance(answer, dict) else None
            if (not isinstance(predictions, list) or len(predictions) != rows
                    or not all(isinstance(p, (int, float)) and math.isfinite(p) for p in predictions)):
                raise RuntimeError(f"smoke query {i + 1} of {entity} answered {str(answer)[:200]}, "
                                   f"not {rows} finite years")
            if i < queries - 1:
                time.sleep(seconds / (queries - 1))
        return {"queries": queries, "failures": 0, "median_ms": round(sorted(latencies)[len(latencies) // 2], 1)}

    def restore(self, result: DeployResult, previous, alias_before: str | None, why: str) -> tuple[str, str]:
        """Put the endpoint back as it was (delete it when this run created it) and the alias back on the version
        that was served; (decision, reason)."""
        settings, problems = self.settings, []
        try:
            self._settle(ignore_failure=True)
            if previous is None:
                if self.get_endpoint() is not None:
                    self.workspace.serving_endpoints.delete(self.endpoint)
                    self.say(result, f"deleted endpoint {self.endpoint}, created by this run")
            else:
                entities, traffic = as_inputs(previous)
                self._wait(self.workspace.serving_endpoints.update_config(
                    self.endpoint, served_entities=entities, traffic_config=traffic))
                self.say(result, f"endpoint {self.endpoint} restored to its previous config "
                                 f"({', '.join(e.name for e in entities)})")
        except Exception as error:
            log.exception("restoring endpoint %s failed", self.endpoint)
            problems.append(f"restoring the endpoint failed: {type(error).__name__}: {error}")
        back_to = result.served_before or alias_before
        if back_to and back_to != result.version:
            try:
                # set directly, not with registry.promote: the failed version was never production for real,
                # so the restored one must not record it as its predecessor
                registry.client(settings).set_registered_model_alias(settings.model_name, registry.PRODUCTION,
                                                                     back_to)
                self.say(result, f"{settings.model_name}@production moved back to version {back_to}")
            except Exception as error:
                log.exception("moving %s@production back to %s failed", settings.model_name, back_to)
                problems.append(f"moving production back to version {back_to} failed: {error}")
        current = self.get_endpoint()
        result.served_after = served_version(current, settings.model_name)
        if problems:
            return FAILED, f"version {result.version} failed ({why}); " + "; ".join(problems)
        if previous is None:  # nothing was serving before and nothing serves now: not a rollback
            return FAILED, (f"version {result.version} failed ({why}); endpoint {self.endpoint} deleted, "
                            f"production alias on version {registry.version_by_alias(settings, registry.PRODUCTION)}")
        return ROLLED_BACK, (f"version {result.version} failed ({why}); endpoint and production alias restored "
                             f"to version {back_to or '-'}")

    def grant_query(self, result: DeployResult, endpoint_id: str | None) -> None:
        """CAN_QUERY for COINYEAR_DEPLOY_QUERY_GROUP and COINYEAR_DEPLOY_QUERY_SERVICE_PRINCIPALS where they lack
        it (an added entry, the others kept: `update_permissions`, never `set_permissions`)."""
        from databricks.sdk.errors import DatabricksError
        from databricks.sdk.service.serving import ServingEndpointAccessControlRequest as Entry
        from databricks.sdk.service.serving import ServingEndpointPermissionLevel as Level

        wanted = ({("group_name", self.settings.deploy_query_group)} if self.settings.deploy_query_group else set())
        wanted |= {("service_principal_name", sp) for sp in self.settings.deploy_query_service_principals}
        if not wanted:
            return
        try:
            acl = self.workspace.serving_endpoints.get_permissions(endpoint_id).access_control_list or []
            have = {(kind, getattr(entry, kind)) for entry in acl for kind in ("group_name", "service_principal_name")
                    if getattr(entry, kind) and any(p.permission_level in (Level.CAN_QUERY, Level.CAN_MANAGE)
                                                    for p in entry.all_permissions or [])}
            missing = sorted(wanted - have)
            if missing:
                self.workspace.serving_endpoints.update_permissions(endpoint_id, access_control_list=[
                    Entry(**{kind: name}, permission_level=Level.CAN_QUERY) for kind, name in missing])
        except DatabricksError as error:
            raise DeployError(f"cannot give CAN_QUERY on endpoint {self.endpoint} to "
                              f"{', '.join(name for _, name in sorted(wanted))}: {error}") from error
        if missing:
            self.say(result, f"CAN_QUERY on endpoint {self.endpoint} for {', '.join(name for _, name in missing)}")

    def _wait(self, waiter):
        """The endpoint once its update is applied; StillUpdating past the timeout (OperationFailed when it
        failed)."""
        try:
            return waiter.result(timeout=self.timeout)
        except TimeoutError as error:
            raise self._still_updating() from error

    def _still_updating(self) -> StillUpdating:
        return StillUpdating(f"endpoint {self.endpoint} is still updating after {self.timeout.total_seconds():g} s")

    def _entity_state(self, entity: str) -> str:
        endpoint = self.workspace.serving_endpoints.get(self.endpoint)
        for served in (endpoint.config.served_entities or []) if endpoint.config else []:
            if served.name == entity:
                return served.state.deployment.value if served.state and served.state.deployment else "UNKNOWN"
        return "NOT_IN_ACTIVE_CONFIG"

    def _settle(self, ignore_failure: bool = False):
        """Wait until no config update is in progress; the endpoint (None when it does not exist)."""
        from databricks.sdk.errors import NotFound, OperationFailed

        try:
            return self.workspace.serving_endpoints.wait_get_serving_endpoint_not_updating(
                self.endpoint, timeout=self.timeout)
        except TimeoutError as error:
            raise self._still_updating() from error
        except OperationFailed:
            if not ignore_failure:
                raise
            return self.get_endpoint()  # a failed update leaves the old config serving: it can be updated
        except NotFound:
            return None


def _updating(endpoint) -> bool:
    state = endpoint.state.config_update.value if endpoint.state and endpoint.state.config_update else None
    return state == "IN_PROGRESS"


def _traffic(routes: dict[str, int]):
    from databricks.sdk.service.serving import Route, TrafficConfig

    return TrafficConfig(routes=[Route(served_model_name=name, traffic_percentage=share)
                                 for name, share in routes.items()])


def input_example(settings: Settings, version: str) -> tuple[dict, int]:
    """(request body, rows): the version's logged serving input example, read from its artifacts."""
    import mlflow
    from mlflow.exceptions import MlflowException

    configure_mlflow(settings)
    uri = registry.model_uri(settings, version)
    with tempfile.TemporaryDirectory() as folder:
        for name in EXAMPLE_FILES:
            try:
                path = mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/{name}", dst_path=folder)
            except (MlflowException, OSError) as error:
                log.info("no %s in %s (%s)", name, uri, error)
                continue
            with open(path) as handle:
                example = json.load(handle)
            body = example if name == "serving_input_example.json" else {"dataframe_split": example}
            split = body.get("dataframe_split") or {}
            rows = len(split.get("data") or []) or len(body.get("dataframe_records") or [])
            if rows:
                return body, rows
    raise RuntimeError(f"{uri} has no logged input example ({' or '.join(EXAMPLE_FILES)}) to smoke-test it with")
