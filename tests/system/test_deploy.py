"""`coinyear deploy` against a local fake of the Databricks Model Serving API (tests/fake_workspace.py): the
real databricks-sdk client, real MLflow registry, the real model versions scoring the smoke queries, the real
`model_decisions` Delta table. No Databricks workspace is involved: what the fake leaves out is in its
docstring."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from coinyear import cli, registry
from coinyear.databricks.volume import SMOKE_REQUEST_PREFIX
from coinyear.deploy import DEPLOYED, FAILED, LOCAL, LOCK_TAG, ROLLED_BACK, SKIPPED, UPDATING
from coinyear.lake import open_lake
from coinyear.lake.tables import MODEL_DECISIONS
from coinyear.targets import run_deploy
from tests.conftest import make_settings
from tests.fake_workspace import FakeWorkspace

PAYLOAD = "main.coinyear.coinyear_payload"


@pytest.fixture(scope="module")
def template(trained, tmp_path_factory):
    """A copy of the `trained` registry with three versions: 1 (production), 2 (the same model registered
    again), 3 (its pickle broken: the model server cannot load it)."""
    import mlflow

    settings, _ = trained
    home = tmp_path_factory.mktemp("deploy-template") / "home"
    home.mkdir(parents=True)
    shutil.copy(settings.home_dir / "mlflow.db", home / "mlflow.db")
    mine = make_settings(home)
    client = registry.client(mine)
    v1 = client.get_model_version(mine.model_name, "1")
    again = client.create_model_version(mine.model_name, v1.source, v1.run_id, model_id=v1.model_id)
    assert str(again.version) == "2"
    broken = mlflow.artifacts.download_artifacts(registry.model_uri(mine, "1"), dst_path=str(home / "broken"))
    with open(os.path.join(broken, "python_model.pkl"), "wb") as handle:
        handle.write(b"not a pickle")
    assert str(client.create_model_version(mine.model_name, broken).version) == "3"
    assert registry.version_by_alias(mine, registry.PRODUCTION) == "1"
    return home


@pytest.fixture(scope="module")
def models():
    """Loaded versions shared by every fake of this module (loading one takes seconds)."""
    return {}


@pytest.fixture
def deploy_settings(template, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(template / "mlflow.db", home / "mlflow.db")
    return make_settings(home, deploy_target="databricks", payload_table=PAYLOAD, deploy_watch_seconds=1.0,
                         deploy_timeout_seconds=60)


@pytest.fixture
def workspace(deploy_settings, models, monkeypatch):
    """The fake, with DATABRICKS_HOST / DATABRICKS_TOKEN pointing at it (what `WorkspaceClient()` reads)."""
    with FakeWorkspace(deploy_settings.mlflow_registry_uri, models=models) as fake:
        for name in [k for k in os.environ if k.startswith("DATABRICKS_")]:
            monkeypatch.delenv(name)
        monkeypatch.setenv("DATABRICKS_HOST", fake.url)
        monkeypatch.setenv("DATABRICKS_TOKEN", "x")
        monkeypatch.setenv("DATABRICKS_CONFIG_FILE", os.devnull)
        yield fake
        assert fake.unhandled == [], f"the SDK made calls the fake does not implement: {fake.unhandled}"


def deploy(settings, monkeypatch, capsys, *args) -> tuple[int, dict]:
    """`coinyear deploy --json ARGS` in-process with these settings: (exit code, the JSON it printed)."""
    monkeypatch.setattr(cli, "get_settings", lambda: settings)
    code = cli.main(["deploy", "--json", *args])
    return code, json.loads(capsys.readouterr().out)


def decisions(settings):
    rows = open_lake(settings).read(MODEL_DECISIONS).sort_values("decided_at")
    return rows[rows["kind"] == "deploy"]


def changes(fake) -> list[tuple[str, str]]:
    return [(m, p) for m, p in fake.calls if m in ("POST", "PUT", "DELETE") and "invocations" not in p]


def test_local_mode_needs_nothing_and_version_moves_the_alias(template, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(template / "mlflow.db", home / "mlflow.db")
    settings = make_settings(home)  # default target: local
    code, out = deploy(settings, monkeypatch, capsys)
    assert code == 0 and out["decision"] == LOCAL
    assert "local gateway (`coinyear serve`) follows" in out["reason"] and out["served_after"] == "1"
    assert not open_lake(settings).exists(MODEL_DECISIONS)  # nothing was deployed, nothing to record

    code, out = deploy(settings, monkeypatch, capsys, "--version", "2")
    assert code == 0 and out["decision"] == DEPLOYED
    assert registry.version_by_alias(settings, registry.PRODUCTION) == "2"
    row = decisions(settings).iloc[-1]
    assert (row["decision"], row["production_before"], row["production_after"]) == (DEPLOYED, "1", "2")

    monkeypatch.setattr(cli, "get_settings", lambda: settings)
    assert cli.main(["deploy", "--version", "99"]) == 2  # unknown version: a clear error, nothing moved
    assert "no version 99" in capsys.readouterr().err
    assert registry.version_by_alias(settings, registry.PRODUCTION) == "2"


def test_create_then_canary_then_idempotent(deploy_settings, workspace, monkeypatch, capsys):
    from databricks.sdk import WorkspaceClient

    settings, fake, name = deploy_settings, workspace, deploy_settings.serving_endpoint_name
    code, out = deploy(settings, monkeypatch, capsys, "--dry-run")
    assert code == 0 and out["decision"] == "dry_run" and "would create" in out["reason"]
    assert changes(fake) == []

    # no endpoint yet: created with the production version, inference tables on, no scale to zero
    code, out = deploy(settings, monkeypatch, capsys)
    assert code == 0 and out["decision"] == DEPLOYED, out
    endpoint = fake.endpoints[name]
    (entity,) = endpoint["config"]["served_entities"]
    assert (entity["name"], entity["entity_name"], entity["entity_version"]) == ("coinyear-1", "coinyear", "1")
    assert entity["workload_size"] == "Small" and entity["scale_to_zero_enabled"] is False
    assert endpoint["ai_gateway"]["inference_table_config"] == {
        "enabled": True, "catalog_name": "main", "schema_name": "coinyear", "table_name_prefix": "coinyear"}
    assert ("POST", f"/serving-endpoints/{name}/served-models/coinyear-1/invocations") in fake.calls
    assert out["smoke"]["queries"] == 1 and out["smoke"]["failures"] == 0

    # the endpoint answers real scoring requests with the real model
    client = WorkspaceClient(host=fake.url, token="x")
    with open(_example(settings, "1")) as handle:
        example = json.load(handle)
    answer = client.serving_endpoints.query(name, dataframe_records=[
        dict(zip(example["dataframe_split"]["columns"], example["dataframe_split"]["data"][0], strict=True))])
    assert len(answer.predictions) == 1 and -700 <= answer.predictions[0] <= 2100

    # production moves to 2: canary at 10 %, watched, then all traffic, the old entity dropped
    registry.promote(settings, "2", registry.PRODUCTION)
    code, out = deploy(settings, monkeypatch, capsys)
    assert code == 0 and out["decision"] == DEPLOYED, out
    assert fake.history[name] == [{"coinyear-1": 100}, {"coinyear-1": 90, "coinyear-2": 10}, {"coinyear-2": 100}]
    assert [e["name"] for e in fake.endpoints[name]["config"]["served_entities"]] == ["coinyear-2"]
    smoke_calls = [c for c in fake.calls if c[1].endswith("served-models/coinyear-2/invocations")]
    assert len(smoke_calls) == out["smoke"]["queries"] == 5
    tags = registry.client(settings).get_model_version("coinyear", "2").tags
    assert tags["deployment"] == DEPLOYED and tags["endpoint"] == name and tags["deployed_at"]

    # again: the alias is what is served, nothing changes
    before = len(changes(fake))
    code, out = deploy(settings, monkeypatch, capsys)
    assert code == 0 and out["decision"] == SKIPPED and "already serves version 2" in out["reason"]
    assert len(changes(fake)) == before

    # `coinyear models rollback` moves the alias back to 1; `coinyear deploy` moves the endpoint after it
    assert cli.main(["models", "rollback"]) == 0 and "version 2 -> 1" in capsys.readouterr().out
    code, out = deploy(settings, monkeypatch, capsys)
    assert code == 0 and out["decision"] == DEPLOYED and (out["served_before"], out["served_after"]) == ("2", "1")
    assert fake.history[name][-2:] == [{"coinyear-2": 90, "coinyear-1": 10}, {"coinyear-1": 100}]

    rows = decisions(settings)
    assert list(rows["decision"]) == [DEPLOYED, DEPLOYED, SKIPPED, DEPLOYED]
    assert list(rows["production_after"]) == ["1", "2", "2", "1"] and set(rows["endpoint_name"]) == {name}
    assert registry.client(settings).get_registered_model("coinyear").tags.get(LOCK_TAG) is None  # released


@pytest.mark.parametrize("failure", ["smoke", "update_failed"])
def test_failing_version_is_rolled_back(deploy_settings, workspace, monkeypatch, capsys, failure):
    settings, fake, name = deploy_settings, workspace, deploy_settings.serving_endpoint_name
    assert deploy(settings, monkeypatch, capsys)[0] == 0  # version 1 serving
    if failure == "smoke":
        bad = "3"  # deploys, but its model server cannot load the broken pickle: the smoke query fails
    else:
        bad = "2"
        fake.fail_update.add("2")  # the endpoint update itself fails (UPDATE_FAILED), as a failed build does
    registry.promote(settings, bad, registry.PRODUCTION)

    code, out = deploy(settings, monkeypatch, capsys)
    assert code == 1 and out["decision"] == ROLLED_BACK, out
    assert out["served_before"] == "1" and out["served_after"] == "1"
    expected = "model failed to load" if failure == "smoke" else "UPDATE_FAILED"
    assert expected in out["reason"]
    # previous config restored (only version 1, all traffic), production alias back on version 1
    config = fake.endpoints[name]["config"]
    assert [(e["name"], e["entity_version"]) for e in config["served_entities"]] == [("coinyear-1", "1")]
    assert config["traffic_config"]["routes"] == [{"served_model_name": "coinyear-1", "traffic_percentage": 100}]
    if failure == "smoke":
        assert fake.history[name] == [{"coinyear-1": 100}, {"coinyear-1": 90, f"coinyear-{bad}": 10},
                                      {"coinyear-1": 100}]
    else:
        assert fake.history[name] == [{"coinyear-1": 100}, {"coinyear-1": 100}]
    assert registry.version_by_alias(settings, registry.PRODUCTION) == "1"
    assert registry.client(settings).get_model_version("coinyear", bad).tags["deployment"] == ROLLED_BACK
    row = decisions(settings).iloc[-1]
    assert (row["decision"], row["candidate_version"], row["production_after"]) == (ROLLED_BACK, bad, "1")
    assert expected in row["reason"]


def test_failing_first_version_leaves_no_endpoint(deploy_settings, workspace, monkeypatch, capsys):
    settings, fake = deploy_settings, workspace
    code, out = deploy(settings, monkeypatch, capsys, "--version", "3")  # broken; production was 1
    assert code == 1 and out["decision"] == FAILED and "model failed to load" in out["reason"]
    assert fake.endpoints == {} and ("DELETE", f"/api/2.0/serving-endpoints/{out['endpoint']}") in fake.calls
    assert registry.version_by_alias(settings, registry.PRODUCTION) == "1"  # --version moved it; moved back
    assert decisions(settings).iloc[-1]["decision"] == FAILED


def test_endpoint_of_another_model_is_left_alone(deploy_settings, workspace, monkeypatch, capsys):
    settings, fake, name = deploy_settings, workspace, deploy_settings.serving_endpoint_name
    fake.create({"name": name, "config": {"served_entities": [
        {"name": "other-1", "entity_name": "main.other.model", "entity_version": "1"}]}})
    fake.get(name), fake.get(name)  # settled: serving the other model
    monkeypatch.setattr(cli, "get_settings", lambda: settings)
    assert cli.main(["deploy"]) == 2
    assert "serves another model (main.other.model)" in capsys.readouterr().err
    assert [e["name"] for e in fake.endpoints[name]["config"]["served_entities"]] == ["other-1"]
    assert fake.history[name] == [{"other-1": 100}]
    assert registry.client(settings).get_registered_model("coinyear").tags.get(LOCK_TAG) is None


def test_one_deploy_at_a_time(deploy_settings, workspace):
    settings, fake = deploy_settings, workspace
    client = registry.client(settings)
    client.set_registered_model_tag("coinyear", LOCK_TAG, json.dumps(
        {"owner": "other-host:1:abc", "endpoint": settings.serving_endpoint_name, "expires": 4102444800}))
    result = run_deploy(settings)
    assert result.decision == FAILED and "holds the deploy_lock tag" in result.reason and not result.ok
    assert changes(fake) == [] and fake.endpoints == {}
    assert decisions(settings).iloc[-1]["decision"] == FAILED
    assert client.get_registered_model("coinyear").tags[LOCK_TAG].startswith('{"owner": "other-host')  # kept

    client.set_registered_model_tag("coinyear", LOCK_TAG, json.dumps({"owner": "crashed", "expires": 1}))
    assert run_deploy(settings).decision == DEPLOYED  # a stale lock (a killed run) is taken over


def test_no_production_version_is_nothing_to_deploy(deploy_settings, workspace, monkeypatch, capsys):
    """The retrain job runs deploy after every retraining, also when the first one promoted nothing: no
    production version is nothing to serve yet, not an error."""
    settings, fake = deploy_settings, workspace
    registry.client(settings).delete_registered_model_alias(settings.model_name, registry.PRODUCTION)
    code, out = deploy(settings, monkeypatch, capsys)
    assert code == 0 and out["decision"] == SKIPPED and "no production version yet" in out["reason"], out
    assert changes(fake) == [] and fake.endpoints == {}


def test_smoke_queries_carry_the_smoke_request_id(deploy_settings, workspace, monkeypatch, capsys):
    """Model Serving logs the smoke queries in the payload table like any request: each is marked, so that
    `coinyear ingest-payloads` can leave them out (tests/system/test_payloads.py)."""
    settings, fake = deploy_settings, workspace
    assert deploy(settings, monkeypatch, capsys)[0] == 0
    registry.promote(settings, "2", registry.PRODUCTION)
    assert deploy(settings, monkeypatch, capsys)[0] == 0
    smoke = [p for p in fake.payloads if p["served_entity"] in ("coinyear-1", "coinyear-2")]
    assert len(smoke) == 1 + 5 and all(p["status_code"] == 200 for p in smoke)
    ids = [p["client_request_id"] for p in smoke]
    assert all(i.startswith(SMOKE_REQUEST_PREFIX) for i in ids) and len(set(ids)) == len(ids), ids


def _query(fake, name: str, token: str, settings) -> int:
    """HTTP status of one scoring request to the whole endpoint with `token`."""
    from databricks.sdk import WorkspaceClient
    from databricks.sdk.errors import DatabricksError

    with open(_example(settings, "1")) as handle:
        example = json.load(handle)
    try:
        WorkspaceClient(host=fake.url, token=token).api_client.do("POST", f"/serving-endpoints/{name}/invocations",
                                                                  body=example)
    except DatabricksError as error:
        return {"PERMISSION_DENIED": 403}.get(error.error_code, 500)
    return 200


def test_query_group_and_apps_get_can_query_at_every_creation(deploy_settings, workspace, monkeypatch, capsys):
    """A new endpoint's only permission is its creator's CAN_MANAGE; deploy gives the configured group and the
    apps' service principals CAN_QUERY when it creates it, after every re-creation, and back when removed."""
    fake, name = workspace, deploy_settings.serving_endpoint_name
    settings = deploy_settings.model_copy(update={"deploy_query_group": "coin-readers",
                                                  "deploy_query_service_principals": ["ui-app-id", "gw-app-id"]})
    fake.add_principal("reader", user_name="reader@example.com", groups=("coin-readers",))
    fake.add_principal("ui", service_principal_name="ui-app-id")
    fake.add_principal("outsider", user_name="outsider@example.com", groups=("users",))

    code, out = deploy(settings, monkeypatch, capsys, "--version", "3")  # broken: created, then deleted
    assert code == 1 and out["decision"] == FAILED and fake.endpoints == {}
    code, out = deploy(settings, monkeypatch, capsys, "--version", "1")  # created again
    assert code == 0 and out["decision"] == DEPLOYED, out
    assert any("CAN_QUERY on endpoint" in step for step in out["steps"])
    assert _query(fake, name, "reader", settings) == _query(fake, name, "ui", settings) == 200
    assert _query(fake, name, "outsider", settings) == 403  # the fake refuses a query without CAN_QUERY

    fake.dispatch("DELETE", f"/api/2.0/serving-endpoints/{name}", {}, "x")  # deleted by hand
    assert deploy(settings, monkeypatch, capsys)[1]["decision"] == DEPLOYED
    assert _query(fake, name, "reader", settings) == 200

    del fake.acls[fake.endpoints[name]["id"]][("group_name", "coin-readers")]  # removed by hand
    assert _query(fake, name, "reader", settings) == 403
    code, out = deploy(settings, monkeypatch, capsys)
    assert code == 0 and out["decision"] == SKIPPED  # nothing to deploy, but the permission is back
    assert _query(fake, name, "reader", settings) == 200
    patches = [c for c in fake.calls if c[0] == "PATCH"]
    # one per creation (the failed one too: granted before its build) and the one restored
    assert len(patches) == 4 and all(p[1].startswith("/api/2.0/permissions/serving-endpoints/") for p in patches)


def test_an_update_outlasting_the_timeout_is_still_updating_not_failed(deploy_settings, workspace, monkeypatch,
                                                                      capsys):
    """Past COINYEAR_DEPLOY_TIMEOUT_SECONDS Model Serving is still applying the update: restoring then would fight
    it. The run says so (exit 3), restores nothing; the next run waits for the update and finishes."""
    settings, fake, name = deploy_settings, workspace, deploy_settings.serving_endpoint_name
    assert deploy(settings, monkeypatch, capsys)[0] == 0
    registry.promote(settings, "2", registry.PRODUCTION)
    fake.settle_polls = 10**9  # the canary's container build goes on and on
    impatient = settings.model_copy(update={"deploy_timeout_seconds": 2.0})
    code, out = deploy(impatient, monkeypatch, capsys)
    assert code == 3 and out["decision"] == UPDATING and "still updating after 2 s" in out["reason"], out
    assert out["served_after"] == "1"
    assert fake.history[name] == [{"coinyear-1": 100}]  # nothing restored: no second update was sent
    assert fake.endpoints[name]["state"]["config_update"] == "IN_PROGRESS"
    assert registry.version_by_alias(settings, registry.PRODUCTION) == "2"  # not moved back
    assert decisions(settings).iloc[-1]["decision"] == UPDATING

    code, out = deploy(impatient, monkeypatch, capsys)  # still building: this run changes nothing either
    assert code == 3 and out["decision"] == UPDATING and "nothing changed by this run" in out["reason"]
    fake.settle_polls = 1  # the build finishes
    code, out = deploy(settings, monkeypatch, capsys)
    assert code == 0 and out["decision"] == DEPLOYED and out["served_after"] == "2", out
    assert fake.history[name][-1] == {"coinyear-2": 100}


def test_the_lock_is_a_lease_renewed_while_the_deploy_runs(deploy_settings, workspace):
    """The lock tag holds for a lease, pushed ahead by a heartbeat while the deploy runs however long it takes;
    a lock whose lease ran out (a killed run) is taken over."""
    import threading
    import time

    # a 3-second lease renewed every second: with a 1.5-second one, on 2 cores shared with a training run, a
    # sample once found the lease lapsed (a renewal is a registry read and write, starved of CPU)
    settings = deploy_settings.model_copy(update={"deploy_lock_lease_seconds": 3.0, "deploy_watch_seconds": 7.0})
    client = registry.client(settings)
    assert run_deploy(settings).decision == DEPLOYED
    registry.promote(settings, "2", registry.PRODUCTION)
    seen, done = [], threading.Event()

    def sample():
        while not done.is_set():
            before = time.time()  # the tag is read after this: a slow read must not make a held lease look lapsed
            value = client.get_registered_model("coinyear").tags.get(LOCK_TAG)
            if value:
                seen.append((before, json.loads(value)["expires"]))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        assert run_deploy(settings).decision == DEPLOYED  # a 7-second watch under a 3-second lease
    finally:
        done.set()
        sampler.join()
    expiries = sorted({expires for _, expires in seen})
    assert len(expiries) >= 3, seen  # renewed, again and again
    assert all(expires > at for at, expires in seen)  # never lapsed while held
    assert max(expires for _, expires in seen) < time.time() + 3.0  # a lease ahead, not hours
    assert client.get_registered_model("coinyear").tags.get(LOCK_TAG) is None

    client.set_registered_model_tag("coinyear", LOCK_TAG, json.dumps(
        {"owner": "killed:1:abc", "endpoint": settings.serving_endpoint_name, "expires": time.time() - 0.1}))
    registry.promote(settings, "1", registry.PRODUCTION)
    assert run_deploy(settings).decision == DEPLOYED  # its lease ran out: taken over


def _example(settings, version: str) -> str:
    import tempfile

    import mlflow

    from coinyear.config import configure_mlflow

    configure_mlflow(settings)
    return mlflow.artifacts.download_artifacts(f"{registry.model_uri(settings, version)}/serving_input_example.json",
                                               dst_path=tempfile.mkdtemp())
