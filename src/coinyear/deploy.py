"""Deploy stage: make the serving target serve what the `production` alias points to; what is the same for both
targets (COINYEAR_DEPLOY_TARGET, chosen in coinyear.targets.run_deploy): the result, the lock, the record.

local       `coinyear serve` watches the alias itself (serve/lifecycle.py) and swaps a new version in with no
            failed request, so there is nothing to push; `--version N` only moves the alias to N (`deploy_local`).
databricks  a Model Serving endpoint, created or moved to the version with a canary: coinyear.databricks.deploy.

One deploy at a time: a `deploy_lock` tag on the registered model, a lease renewed while the deploy runs (see
`deploy_lock`). Every deploy that does or refuses something is a row of `model_decisions` (kind `deploy`) and tags
on the version it deployed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from coinyear import registry
from coinyear.config import Settings

log = logging.getLogger(__name__)

DEPLOYED, SKIPPED, ROLLED_BACK, FAILED, DRY_RUN, LOCAL, UPDATING = (
    "deployed", "skipped", "rolled_back", "failed", "dry_run", "local", "updating")
OK_DECISIONS = (DEPLOYED, SKIPPED, DRY_RUN, LOCAL)
UPDATING_EXIT_STATUS = 3  # neither success nor failure: the endpoint is still applying the update
LOCK_TAG = "deploy_lock"
LOCK_SETTLE_SECONDS = 1.0  # time for a competing writer's tag to land before we read ours back


class DeployError(RuntimeError):
    """A deployment that cannot start (bad settings, no production version, another deploy running)."""


class DeployBusy(DeployError):
    """Another deploy holds the lock."""


@dataclass
class DeployResult:
    decision: str  # deployed | skipped | rolled_back | failed | dry_run | local | updating
    reason: str
    target: str
    endpoint: str | None = None
    version: str | None = None  # the version this run deploys (the production alias's, or --version)
    served_before: str | None = None
    served_after: str | None = None
    smoke: dict = field(default_factory=dict)
    steps: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.decision in OK_DECISIONS

    @property
    def exit_status(self) -> int:
        """0 done (or nothing to do), 3 still updating (run again to finish), 1 failed or rolled back."""
        return 0 if self.ok else UPDATING_EXIT_STATUS if self.decision == UPDATING else 1

    def report(self) -> str:
        where = f"endpoint {self.endpoint}" if self.endpoint else f"target {self.target}"
        lines = [f"decision: {self.decision.upper()} - {self.reason}",
                 f"{where}: version {self.served_before or '-'} -> {self.served_after or '-'}"]
        if self.smoke:
            lines.append("smoke: " + ", ".join(f"{k} {v}" for k, v in self.smoke.items()))
        return "\n".join(lines)


def deploy_local(settings: Settings, version: str | None, dry_run: bool) -> DeployResult:
    """The local gateway follows the alias on its own: only `--version` has something to do (move the alias)."""
    production = registry.version_by_alias(settings, registry.PRODUCTION)
    follows = (f"the local gateway (`coinyear serve`) follows {settings.model_name}@production by itself "
               f"(checked every {settings.alias_poll_seconds:g} s)")
    if version is None or version == production:
        return DeployResult(LOCAL, f"{follows}; nothing to deploy", "local", version=production,
                            served_before=production, served_after=production)
    if dry_run:
        return DeployResult(DRY_RUN, f"would point production at version {version}; {follows}", "local",
                            version=version, served_before=production, served_after=production)
    try:
        registry.promote(settings, version, registry.PRODUCTION)
    except registry.RegistryError as error:
        raise DeployError(str(error)) from error
    result = DeployResult(DEPLOYED, f"production now points at version {version}; {follows}", "local",
                          version=version, served_before=production, served_after=version)
    record(settings, result)
    registry.tag_version(settings, version, {"deployment": DEPLOYED, "deployed_at": _now(), "endpoint": "local"})
    return result


# ------------------------------------------------------------------------------------------------ lock
@contextlib.contextmanager
def deploy_lock(settings: Settings, endpoint: str):
    """One deploy at a time for this model: a `deploy_lock` tag on the registered model, held as a lease.

    The registry is the one store every job run reaches (Unity Catalog on Databricks, where a job cluster's
    local disk is not shared and a volume offers no file locks). A tag is not a compare-and-set, so after writing
    ours we wait `LOCK_SETTLE_SECONDS` and read it back: of two deploys racing, at most one sees its own token.
    The tag says until when it holds (COINYEAR_DEPLOY_LOCK_LEASE_SECONDS ahead); a heartbeat thread pushes that
    a lease ahead every third of a lease while the deploy runs, however long its endpoint updates take, and stops
    when the tag is no longer ours. A lock not renewed for a lease (a killed run) is taken over.
    The endpoint adds its own guard: Model Serving refuses a config update while another is in progress.
    """
    client, name = registry.client(settings), settings.model_name
    lease = settings.deploy_lock_lease_seconds
    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    held = _lock_holder(client, name)
    if held and held.get("expires", 0) > time.time():
        raise DeployBusy(f"another deploy ({held.get('owner')}, endpoint {held.get('endpoint')}) holds the "
                         f"{LOCK_TAG} tag of {name} until {_iso(held.get('expires', 0))}")
    _write_lock(client, name, token, endpoint, lease)
    time.sleep(LOCK_SETTLE_SECONDS)
    held = _lock_holder(client, name)
    if not held or held.get("owner") != token:
        raise DeployBusy(f"another deploy took the {LOCK_TAG} tag of {name} at the same time")
    stop = threading.Event()
    heartbeat = threading.Thread(target=_renew_lock, args=(client, name, token, endpoint, lease, stop),
                                 name="deploy-lock-heartbeat", daemon=True)
    heartbeat.start()
    try:
        yield
    finally:
        stop.set()
        heartbeat.join()
        held = _lock_holder(client, name)
        if held and held.get("owner") == token:
            client.delete_registered_model_tag(name, LOCK_TAG)


def _write_lock(client, name: str, token: str, endpoint: str, lease: float) -> None:
    client.set_registered_model_tag(name, LOCK_TAG, json.dumps({"owner": token, "endpoint": endpoint,
                                                                "expires": time.time() + lease}))


def _renew_lock(client, name: str, token: str, endpoint: str, lease: float, stop: threading.Event) -> None:
    """The heartbeat: every third of the lease, the tag a lease ahead again, while it is still ours."""
    while not stop.wait(lease / 3):
        try:
            held = _lock_holder(client, name)
            if not held or held.get("owner") != token:
                log.error("the %s tag of %s is no longer this deploy's (now %s): not renewing it", LOCK_TAG, name,
                          held)
                return
            _write_lock(client, name, token, endpoint, lease)
        except Exception:  # a registry hiccup: the lease has two more thirds to be renewed in
            log.exception("renewing the %s tag of %s failed", LOCK_TAG, name)


def _lock_holder(client, name: str) -> dict | None:
    value = (client.get_registered_model(name).tags or {}).get(LOCK_TAG)
    try:
        return json.loads(value) if value else None
    except ValueError:
        return {"owner": value, "expires": math.inf}  # not ours to interpret: never taken over silently


# ------------------------------------------------------------------------------------------------ record
def record(settings: Settings, result: DeployResult) -> None:
    """The deployment as a `model_decisions` row (kind `deploy`)."""
    import pyarrow as pa

    from coinyear.lake import open_lake
    from coinyear.lake.tables import DECISIONS_SCHEMA, MODEL_DECISIONS

    row = {"decided_at": datetime.now(UTC), "model_name": settings.model_name,
           "decision": result.decision, "reason": result.reason, "candidate_version": result.version,
           "production_before": result.served_before, "production_after": result.served_after,
           "candidate_latency_ms": result.smoke.get("median_ms", math.nan),
           "candidate_metrics": json.dumps({"smoke": result.smoke, "steps": result.steps}),
           "kind": "deploy", "endpoint_name": result.endpoint or result.target}
    open_lake(settings).append(MODEL_DECISIONS, pa.Table.from_pylist([row], schema=DECISIONS_SCHEMA))


def as_json(result: DeployResult) -> str:
    return json.dumps(asdict(result), indent=2)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _iso(epoch: float) -> str:
    return "never" if not math.isfinite(epoch) else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
