"""The UI as a Databricks App, against the fake workspace (tests/fake_workspace.py).

Review page: a verdict goes to the catalog's `feedback_reviews` through the same warehouse (the one table the
app writes, created by it on first use).

Models page: the app's service principal may not move an alias (it has EXECUTE on the model) and the endpoint
would not follow one moved by the app, so a rollback is a run of the bundle's rollback job (`w.jobs.run_now`),
and the page lists that job's runs. Monitor page and retraining decisions: the tables are Unity Catalog tables
the jobs write, read through the app's SQL warehouse (`coinyear.lake.warehouse`), not the app's empty local lake.

The job and the app are created as `bundle deploy` would (the app with the bundle's resources, its service
principal with the rollback job's permissions the bundle declares) and the UI runs with the app's environment as
the bundle declares it; the registry is the test's MLflow (`registered`: version 2 in production).
"""

from __future__ import annotations

import json
import os

import pandas as pd
import pyarrow as pa
import pytest
import streamlit as st
import yaml

from coinyear import registry
from coinyear.config import get_settings
from coinyear.lake import open_lake
from coinyear.lake.tables import DECISIONS_SCHEMA, FEEDBACK, INFERENCE_LOG, MODEL_DECISIONS, SCHEMAS
from tests.code.test_bundle import BUNDLE_DIR, deployed
from tests.code.test_ui import (  # noqa: F401 - fixtures
    anonymous_correction,
    api,
    app,
    log_rows,
    press,
    registered,
    texts,
)
from tests.fake_workspace import DEPLOYER, FakeWorkspace, app_token

UI_APP = "coinyear-ui"
PERSON = "ada@example.com"  # who the Apps proxy signed in (X-Forwarded-Email)


def forwarded(monkeypatch, email: str | None) -> None:
    """The headers the Apps proxy forwards to the app's Streamlit session: who it signed in, or nobody."""
    from streamlit.runtime.context import ContextProxy, StreamlitHeaders

    given = [("X-Forwarded-Email", email)] if email else []
    monkeypatch.setattr(ContextProxy, "headers", property(lambda self: StreamlitHeaders(
        [*given, ("X-Real-Ip", "10.0.0.7")])))


@pytest.fixture
def workspace(registered, monkeypatch):  # noqa: F811 - the fixture imported above
    """The fake workspace with the UI app and the rollback job as the dev target declares them; the UI runs as
    that app's service principal."""
    from databricks.sdk import WorkspaceClient
    from databricks.sdk.service.apps import App

    resources = deployed(yaml.safe_load((BUNDLE_DIR / "databricks.yml").read_text()), "dev")
    with FakeWorkspace("sqlite:///unused.db") as fake:
        ws = WorkspaceClient(host=fake.url, token=DEPLOYER)
        warehouse = fake.add_warehouse()
        ui = json.loads(json.dumps(resources["apps"]["ui"]).replace("<var.warehouse_id>", warehouse))
        for secret in [r["secret"] for r in ui["resources"] if "secret" in r]:
            ws.secrets.create_scope(secret["scope"])
            ws.secrets.put_secret(secret["scope"], secret["key"], string_value="ada:t")
        client_id = ws.apps.create(App.from_dict({"name": UI_APP, "resources": ui["resources"]}),
                                   no_compute=True).response.service_principal_client_id
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
        # the app's environment as the bundle declares it, but the registry (the test's); people come through
        # the Apps proxy (COINYEAR_APPS_PROXY), which forwards who they are
        values = {"<jobs.rollback.id>": str(job_id), "sql-warehouse": warehouse}
        env = {item["name"]: values.get(item.get("value", item.get("value_from")),
                                        item.get("value", item.get("value_from")))
               for item in ui["config"]["env"] if item["name"].startswith("COINYEAR_")
               and item["name"] not in ("COINYEAR_MODEL_NAME", "COINYEAR_HOME", "COINYEAR_API_TOKENS")}
        assert env["COINYEAR_ROLLBACK_JOB_ID"] == str(job_id) and env["COINYEAR_SQL_WAREHOUSE_ID"] == warehouse
        env |= {"DATABRICKS_HOST": fake.url, "DATABRICKS_TOKEN": app_token(UI_APP),
                "DATABRICKS_CONFIG_FILE": os.devnull}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert env["COINYEAR_APPS_PROXY"] == "true" and "COINYEAR_API_TOKENS" not in env
        forwarded(monkeypatch, PERSON)
        get_settings.cache_clear()
        yield fake, job_id, client_id
    get_settings.cache_clear()


def table(name: str, rows: list[dict]) -> pd.DataFrame:
    """Rows as a table of that name holds them: its schema's columns and types."""
    return pa.Table.from_pylist(rows, schema={**SCHEMAS, MODEL_DECISIONS: DECISIONS_SCHEMA}[name]).to_pandas()


def test_as_a_databricks_app_monitor_and_decisions_read_the_catalog_tables_through_the_warehouse(workspace):
    fake = workspace[0]
    schema = get_settings().lake_schema
    assert get_settings().lake_backend == "warehouse" and schema.endswith("_coinyear")  # the dev schema
    at = app("monitor.py")
    assert "No requests logged yet" in texts(at.info)  # before the jobs wrote anything: no table, no error
    # as the jobs write them: every column of the table's schema
    fake.tables[f"{schema}.inference_log"] = table(INFERENCE_LOG, log_rows("2026-11-20", 10, 2, "1", 50.0)
                                                   + log_rows("2026-11-21", 10, 0, "2", 90.0))
    fake.tables[f"{schema}.feedback"] = table(FEEDBACK, [
        {"request_id": "2026-11-20-1-2", "year_from": 30, "year_to": 40, "timestamp": pd.Timestamp.now(tz="UTC")}])
    fake.tables[f"{schema}.model_decisions"] = table(MODEL_DECISIONS, [
        {"decided_at": pd.Timestamp("2026-11-20T03:00Z"), "candidate_version": "2", "decision": "promoted",
         "reason": "first production"},
        {"decided_at": pd.Timestamp("2026-11-21T03:00Z"), "candidate_version": "3", "decision": "from the catalog",
         "reason": "seen through the warehouse"}])
    st.cache_data.clear()  # the page keeps a read for 10 s
    at = app("monitor.py")
    kpis = {m.label: m.value for m in at.metric}
    assert kpis["Requests"] == "20" and kpis["Error rate"] == "10.0%"
    assert at.dataframe[0].value.set_index("version").loc["1", "MAE (years)"] == pytest.approx(17.0)
    at = app("models.py")
    (decisions,) = [frame.value for frame in at.dataframe if "decision" in frame.value.columns
                    and "candidate_version" in frame.value.columns]
    assert list(decisions["decision"]) == ["from the catalog", "promoted"]  # the catalog's rows, newest first


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


def test_as_a_databricks_app_the_review_page_records_a_rejection_through_the_warehouse(workspace, monkeypatch):
    """Before: the warehouse lake was read-only, so on Databricks a rejection was refused with a message and the
    correction stayed in the queue for good. Now the verdict is inserted into the catalog's feedback_reviews
    (which the app creates on first use) and the correction leaves the queue."""
    fake = workspace[0]
    schema = get_settings().lake_schema
    fake.tables[f"{schema}.feedback"] = table(FEEDBACK, [anonymous_correction()])
    at = app("review.py")
    assert "**AD 71 – AD 73** for request `req-anon`" in texts(at.markdown)
    assert f"{schema}.feedback_reviews" not in fake.tables  # nobody has written a verdict yet
    at = press(at, "Reject")
    assert "Rejected AD 71 – AD 73 for request `req-anon`" in texts(at.success), texts(at.error)
    (review,) = fake.tables[f"{schema}.feedback_reviews"].to_dict("records")
    assert (review["verdict"], review["request_id"], review["year_from"], review["year_to"]) == (
        "rejected", "req-anon", 71, 73)
    assert review["actor"] == PERSON and review["reviewed_at"].tzinfo is not None
    assert "No corrections waiting for review" in texts(app("review.py").info)  # read back through the warehouse
    # the jobs' tables stay theirs: the app's lake refuses to write them
    with pytest.raises(RuntimeError, match="read-only"):
        open_lake(get_settings()).append(FEEDBACK, [anonymous_correction("req-other")])


def test_as_a_databricks_app_people_are_who_the_apps_proxy_forwards(workspace, monkeypatch):
    """Before: the UI app asked for one of COINYEAR_API_TOKENS (a secret shared by hand) although the Apps proxy
    had already signed the person in. Now there is no sign-in form: the forwarded e-mail acts and is recorded;
    without it (no proxy in front) every action is refused."""
    fake = workspace[0]
    fake.tables[f"{get_settings().lake_schema}.feedback"] = table(FEEDBACK, [anonymous_correction()])
    at = app("review.py")
    assert not [t for t in at.text_input if t.key == "sign_in_token"]
    assert {"Accept", "Reject"} <= {b.label for b in at.button}
    at = press(press(app("models.py"), "Run the rollback job…"), "Yes, do it")
    assert len(fake.runs) == 1 and PERSON in texts(at.success)  # who pressed it, in the page's message
    forwarded(monkeypatch, None)
    at = app("review.py")
    assert "did not say who you are" in texts(at.error)
    assert not {"Accept", "Reject"} & {b.label for b in at.button}
    assert not [t for t in at.text_input if t.key == "sign_in_token"]  # no token form to fall back on
    assert "Run the rollback job…" not in [b.label for b in app("models.py").button]
