"""The UI's Models page as a Databricks App, against the fake workspace (tests/fake_workspace.py): the app's service
principal may not move an alias (it has EXECUTE on the model) and the endpoint would not follow one moved by the
app, so a rollback is a run of the bundle's rollback job (`w.jobs.run_now`), and the page lists that job's runs.

The job and the app are created as `bundle deploy` would (the app's service principal gets the rollback job's
permissions the bundle declares); the registry is the test's MLflow (`registered`: version 2 in production).
"""

from __future__ import annotations

import os

import pytest
import yaml

from coinyear import registry
from coinyear.config import get_settings
from tests.code.test_bundle import BUNDLE_DIR, deployed
from tests.code.test_ui import api, app, press, registered, texts  # noqa: F401 - fixtures
from tests.fake_workspace import DEPLOYER, FakeWorkspace, app_token

UI_APP = "coinyear-ui"


@pytest.fixture
def workspace(registered, monkeypatch):  # noqa: F811 - the fixture imported above
    """The fake workspace with the UI app and the rollback job as the dev target declares them; the UI runs as
    that app's service principal."""
    from databricks.sdk import WorkspaceClient
    from databricks.sdk.service.apps import App

    resources = deployed(yaml.safe_load((BUNDLE_DIR / "databricks.yml").read_text()), "dev")
    with FakeWorkspace("sqlite:///unused.db") as fake:
        ws = WorkspaceClient(host=fake.url, token=DEPLOYER)
        client_id = ws.apps.create(App(name=UI_APP), no_compute=True).response.service_principal_client_id
        job = resources["jobs"]["rollback"]
        job_id = ws.api_client.do("POST", "/api/2.2/jobs/create", body={
            k: v for k, v in job.items() if k != "permissions"})["job_id"]
        acl = []
        for entry in job["permissions"]:
            entry = {k: v.replace("<apps.ui.service_principal_client_id>", client_id) for k, v in entry.items()}
            acl.append({**{k: v for k, v in entry.items() if k != "level"}, "permission_level": entry["level"]})
        ws.api_client.do("PATCH", f"/api/2.0/permissions/jobs/{job_id}", body={"access_control_list": acl})
        for name in [k for k in os.environ if k.startswith("DATABRICKS_")]:
            monkeypatch.delenv(name)
        env = {"COINYEAR_SERVING_BACKEND": "databricks", "COINYEAR_ENDPOINT_NAME": "coinyear-dev",
               "COINYEAR_LOOP_VOLUME": "/Volumes/main/coinyear/loop", "COINYEAR_ROLLBACK_JOB_ID": str(job_id),
               "DATABRICKS_HOST": fake.url, "DATABRICKS_TOKEN": app_token(UI_APP),
               "DATABRICKS_CONFIG_FILE": os.devnull}
        ui_env = {item["name"]: item.get("value") for item in resources["apps"]["ui"]["config"]["env"]}
        assert ui_env["COINYEAR_ROLLBACK_JOB_ID"] == "<jobs.rollback.id>"  # what the bundle hands the app
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        get_settings.cache_clear()
        yield fake, job_id, client_id
    get_settings.cache_clear()


def test_as_a_databricks_app_a_rollback_is_a_run_of_the_rollback_job(workspace, registered):  # noqa: F811
    fake, job_id, client_id = workspace
    at = app("models.py")
    assert "Promote…" not in [b.label for b in at.button]  # promotions are the retrain job's on Databricks
    assert "Production is version **2**" in " ".join(c.value for c in at.caption)
    assert "No runs yet." in " ".join(c.value for c in at.caption)
    at = press(at, "Run the rollback job…")
    assert "Start the rollback job?" in texts(at.warning) and not fake.runs  # nothing before the confirmation
    at = press(at, "Yes, do it")
    (run,) = fake.runs
    assert run["job_id"] == job_id and run["creator_user_name"] == client_id  # started by the app's principal
    assert f"Started run {run['run_id']} of the rollback job" in texts(at.success)
    assert registry.version_by_alias(registered, registry.PRODUCTION) == "2"  # the app moved no alias itself
    (runs,) = [frame.value for frame in at.dataframe if "started by" in frame.value.columns]
    assert list(runs["run"]) == [run["run_id"]] and list(runs["state"]) == ["PENDING"]


def test_without_run_permission_on_the_job_the_page_says_so(workspace, registered):  # noqa: F811
    fake, job_id, client_id = workspace
    fake.acls[f"jobs/{job_id}"].pop(("service_principal_name", client_id))
    fake.acls[f"jobs/{job_id}"][("service_principal_name", client_id)] = "CAN_VIEW"
    at = press(press(app("models.py"), "Run the rollback job…"), "Yes, do it")
    assert "The rollback job could not be started" in texts(at.error) and "CAN_MANAGE_RUN" in texts(at.error)
    assert not fake.runs
