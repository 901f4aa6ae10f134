"""The numbered sequence that opens docs/databricks.md, walked against the fake workspace (tests/fake_workspace.py):
from an empty workspace to both apps running and the endpoint answering those allowed to query it, and nobody else.

The `databricks` CLI cannot run here, so each of its steps is the REST calls the CLI makes for it, read from its
source (databricks/cli at 7bbe285): `bundle deploy` creates each app with `no_compute` unless it says
`lifecycle.started` (bundle/direct/dresources/app.go); `bundle run <app>` gets the app, starts its compute when
stopped, then deploys its code (bundle/run/app.go, bundle/appdeploy/app.go). They are made with databricks-sdk,
with the bundle's resources as the dev target resolves them (tests/code/test_bundle.py's `deployed`). A job run
is its tasks in the bundle's order: `retrain` is stood in for by the test model (version 1, promoted: what a first
retraining that finds a valid candidate leaves), `ingest_payloads` by nothing (before the first deploy there is
no payload table: it reports that and maps nothing), and `deploy` runs for real, `coinyear-job deploy` with the
job cluster's deploy settings. Copying the photos to a volume is checked for its destination only.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from coinyear import cli, registry
from tests.code.test_bundle import BUNDLE_DIR, FRIENDLY, SHORT, app_env, cluster_env, deployed
from tests.conftest import REPO, make_settings
from tests.fake_workspace import FakeWorkspace, app_token
from tests.system import test_deploy

template = test_deploy.template  # a registry whose version 1 is production (the same module-scoped fixtures)
models = test_deploy.models

DOCS = REPO / "docs" / "databricks.md"
SECTION = "## From an empty workspace to the running apps"
TARGET = "dev"
PLACEHOLDERS = {"<user>": SHORT, "<user-dashed>": FRIENDLY}


@dataclass
class Step:
    number: int
    command: list[str]
    printed: list[list[str]] = field(default_factory=list)  # the step's code blocks: what it prints


def sequence() -> list[Step]:
    """The numbered steps of the docs' opening section: `N. `command``, then its fenced blocks."""
    text = DOCS.read_text()
    section = text[text.index(SECTION):]
    section = section[:section.index("\n## ", len(SECTION))]
    steps: list[Step] = []
    lines = iter(section.splitlines())
    for line in lines:
        if match := re.match(r"^(\d+)\. `([^`]+)`$", line):
            steps.append(Step(int(match.group(1)), shlex.split(match.group(2))))
        elif line.strip() == "```" and steps:
            block = []
            for inner in lines:
                if inner.strip() == "```":
                    break
                block.append(inner.strip())
            steps[-1].printed.append(block)
    return steps


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def pattern(line: str) -> re.Pattern:
    """A printed line of the docs as a regex: its placeholders filled in or matching anything."""
    for placeholder, value in PLACEHOLDERS.items():
        line = line.replace(placeholder, value)
    return re.compile("^" + re.sub(r"<[^>]*>", ".+", re.escape(line)) + "$")


def in_order(printed: list[str], documented: list[str]) -> bool:
    """Every printed line matches a documented one, in the documented order (documented lines may be left out:
    progress lines appear only while a wait polls)."""
    patterns = iter(pattern(line) for line in documented)
    return all(any(p.match(line) for p in patterns) for line in printed)


def test_the_sequence_is_one_numbered_list_that_starts_every_app():
    bundle = yaml.safe_load((BUNDLE_DIR / "databricks.yml").read_text())
    steps = sequence()
    assert [step.number for step in steps] == list(range(1, len(steps) + 1)) and len(steps) >= 5
    runs = [step.command[-1] for step in steps if step.command[:3] == ["databricks", "bundle", "run"]]
    assert set(bundle["resources"]["apps"]) <= set(runs), "the docs' sequence must start every app of the bundle"
    assert runs.index("retrain") < min(runs.index(app) for app in bundle["resources"]["apps"])  # endpoint first
    deploys = [i for i, step in enumerate(steps) if step.command[:3] == ["databricks", "bundle", "deploy"]]
    assert deploys == [min(deploys)] and all(option(steps[i].command, "-t") == TARGET for i in deploys)
    (printed,) = steps[deploys[0]].printed
    resources = {f"{group}.{key}" for group, items in bundle["resources"].items() for key in items}
    assert {line.removeprefix("Created ") for line in printed if line.startswith("Created ")} == resources


class Cli:
    """The `databricks` commands of the sequence, as the CLI calls the workspace for them."""

    def __init__(self, fake: FakeWorkspace, settings, monkeypatch, capsys):
        from databricks.sdk import WorkspaceClient

        self.fake, self.settings, self.monkeypatch, self.capsys = fake, settings, monkeypatch, capsys
        self.ws = WorkspaceClient(host=fake.url, token="x")
        self.bundle = yaml.safe_load((BUNDLE_DIR / "databricks.yml").read_text())
        self.resources = deployed(self.bundle, TARGET)

    def run(self, step: Step) -> None:
        command = step.command
        if command[:3] == ["databricks", "secrets", "create-scope"]:
            self.ws.secrets.create_scope(command[3])
        elif command[:3] == ["databricks", "secrets", "put-secret"]:
            self.ws.secrets.put_secret(command[3], command[4], string_value=option(command, "--string-value"))
        elif command[:3] == ["databricks", "bundle", "deploy"]:
            self.bundle_deploy(command)
        elif command[:3] == ["databricks", "fs", "cp"]:
            wanted = cluster_env(self.resources, "retrain", self.resources["jobs"]["retrain"]["tasks"][0])
            assert command[-1].replace("<user>", SHORT) == f"dbfs:{wanted['COINYEAR_DATA_DIR']}"
        elif command[:3] == ["databricks", "bundle", "run"]:
            assert option(command, "-t") == TARGET
            key = command[-1]
            if key in self.resources["apps"]:
                self.run_app(key, step)
            else:
                self.run_job(key, step)
        else:
            pytest.fail(f"step {step.number}: no stand-in for `{' '.join(command)}`")

    def bundle_deploy(self, command: list[str]) -> None:
        """What `bundle deploy` sends for the apps: `apps.create` with the app's fields, no compute unless
        lifecycle.started (the bundle-only fields, source_code_path and config, go with `bundle run`). A variable
        without a default must be given as `--var name=<...>`: here the workspace's warehouse."""
        from databricks.sdk.service.apps import App, AppAccessControlRequest

        given = dict(value.split("=", 1) for flag, value in itertools.pairwise(command) if flag == "--var")
        assert given.get("warehouse_id") == "<warehouse-id>", "the deploy step must give the SQL warehouse"
        (warehouse,) = self.fake.warehouses  # the one the workspace has (a requirement of the sequence)
        self.resources = json.loads(json.dumps(self.resources).replace("<var.warehouse_id>", warehouse))
        for app in self.resources["apps"].values():
            spec = {key: app[key] for key in ("name", "description", "resources") if key in app}
            started = (app.get("lifecycle") or {}).get("started", False)
            self.ws.apps.create(App.from_dict(spec), no_compute=not started)
            assert not self.fake.app_running(app["name"])  # created, not running: it has no compute
            # the app's `permissions`, through the permissions API (the CLI's permissions resource)
            self.ws.apps.update_permissions(app["name"], access_control_list=[
                AppAccessControlRequest.from_dict({**{k: v for k, v in entry.items() if k != "level"},
                                                   "permission_level": entry["level"]})
                for entry in app.get("permissions", [])])

    def run_app(self, key: str, step: Step) -> None:
        """bundle/run/app.go: the app's status, a start when its compute is stopped, then a deployment."""
        from databricks.sdk.service.apps import AppDeployment, ComputeState

        name = self.resources["apps"][key]["name"]
        printed = [f"✓ Getting the status of the app {name}"]
        app = self.ws.apps.get(name)
        if app.app_status:
            printed.append(f"✓ App is in {app.app_status.state.value} state")
        if app.compute_status:
            printed.append(f"✓ App compute is in {app.compute_status.state.value} state")
        if app.compute_status is None or app.compute_status.state in (ComputeState.STOPPED, ComputeState.ERROR):
            printed.append(f"✓ Starting the app {name}")
            self.ws.apps.start(name).result(callback=lambda _: printed.append("✓ App is starting..."))
            printed.append("✓ App is started!")
        source = f"/Workspace/Users/deployer@example.com/.bundle/coinyear/{TARGET}/files/apps/{key}"
        deployment = self.ws.apps.deploy(name, AppDeployment(source_code_path=source)).result()
        printed += [f"✓ {deployment.status.message}", f"You can access the app at {app.url}"]
        (documented,) = step.printed
        assert in_order(printed, documented), (printed, documented)

    def run_job(self, key: str, step: Step) -> None:
        job = self.resources["jobs"][key]
        assert key == "retrain", f"step {step.number}: only the retrain job has a stand-in"
        done = set()
        for task in job["tasks"]:  # the bundle lists them in their order
            assert {d["task_key"] for d in task.get("depends_on", [])} <= done, task["task_key"]
            assert "condition_task" not in task
            parameters = task["python_wheel_task"]["parameters"]
            if parameters == ["deploy"]:
                assert task["run_if"] == "ALL_DONE"  # whatever the retraining decided
                output = self.deploy_task(cluster_env(self.resources, key, task), parameters)
                documented = step.printed[-1]
                assert in_order(output.strip().splitlines()[-len(documented):], documented), (output, documented)
            else:
                assert parameters in (["ingest-payloads"], ["retrain"])
                if parameters == ["retrain"]:
                    assert registry.version_by_alias(self.settings, registry.PRODUCTION) == "1"
            done.add(task["task_key"])

    def deploy_task(self, environment: dict, parameters: list[str]) -> str:
        """`coinyear-job deploy` in-process with the job cluster's deploy settings (the registry and the lake are
        the test's own: no Unity Catalog here); what it prints."""
        clients = {f"<apps.{key}.service_principal_client_id>":
                   self.fake.apps[app["name"]]["service_principal_client_id"]
                   for key, app in self.resources["apps"].items()}
        for key, value in environment.items():
            if key.startswith("COINYEAR_DEPLOY_") or key in ("COINYEAR_ENDPOINT_NAME", "COINYEAR_PAYLOAD_TABLE"):
                for placeholder, client_id in clients.items():
                    value = value.replace(placeholder, client_id)
                self.monkeypatch.setenv(key, value)
        settings = make_settings(self.settings.home)
        assert settings.deploy_target == "databricks" and settings.deploy_query_service_principals
        self.monkeypatch.setattr(cli, "get_settings", lambda: settings)
        self.monkeypatch.setattr(sys, "argv", ["coinyear-job", *parameters])
        self.capsys.readouterr()
        cli.job()
        return self.capsys.readouterr().out


def call_gateway_app(fake: FakeWorkspace, app: dict, token: str, path: str, body: dict, home: Path,
                     monkeypatch) -> tuple[int, dict]:
    """One request to the gateway app through the Apps proxy: the app's code is `coinyear serve`'s ASGI app with
    the app's environment (a `value_from` is its secret's value), as its service principal."""
    from fastapi.testclient import TestClient

    from coinyear.serve.app import create_app
    from coinyear.targets import gateway_backend

    secrets = {r["name"]: fake.secrets[r["secret"]["scope"]][r["secret"]["key"]]
               for r in app.get("resources", []) if "secret" in r}
    for item in app["config"]["env"]:
        if item["name"].startswith("COINYEAR_"):
            monkeypatch.setenv(item["name"], item["value"] if "value" in item else secrets[item["value_from"]])
    monkeypatch.setenv("COINYEAR_HOME", str(home))
    monkeypatch.setenv("DATABRICKS_TOKEN", app_token(app["name"]))  # what the app's process authenticates as
    settings = make_settings(home)
    assert settings.serving_backend == "databricks" and app_env(app)["COINYEAR_ENDPOINT_NAME"]

    with TestClient(create_app(settings, "0.0.0.0", gateway_backend(settings))) as client:
        def upstream(method, path, headers, content):
            answer = client.request(method, path, headers=headers, content=content)
            return answer.status_code, dict(answer.headers), answer.content

        status, _, content = fake.call_app(app["name"], "POST", path, token, upstream,
                                           json.dumps(body).encode(), {"Content-Type": "application/json",
                                                                       "Authorization": f"Bearer {token}"})
    return status, json.loads(content or b"{}")


def test_the_documented_sequence_runs_from_an_empty_workspace_to_the_running_apps(template, models, tmp_path,
                                                                                monkeypatch, capsys):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(Path(template) / "mlflow.db", home / "mlflow.db")
    settings = make_settings(home)
    with FakeWorkspace(settings.mlflow_registry_uri, models=models) as fake:
        fake.add_warehouse()  # the sequence's requirement: a SQL warehouse (every workspace has a starter one)
        for name in [k for k in os.environ if k.startswith(("DATABRICKS_", "COINYEAR_"))]:
            monkeypatch.delenv(name)
        monkeypatch.setenv("COINYEAR_DATA_DIR", str(settings.data_dir))
        monkeypatch.setenv("DATABRICKS_HOST", fake.url)
        monkeypatch.setenv("DATABRICKS_TOKEN", "x")
        monkeypatch.setenv("DATABRICKS_CONFIG_FILE", os.devnull)
        walker = Cli(fake, settings, monkeypatch, capsys)
        for step in sequence():
            walker.run(step)

        apps = [app["name"] for app in walker.resources["apps"].values()]
        assert all(fake.app_running(name) for name in apps)
        endpoint = walker.resources["jobs"]["retrain"]["job_clusters"][0]["new_cluster"]["spark_env_vars"][
            "COINYEAR_ENDPOINT_NAME"]
        (entity,) = fake.endpoints[endpoint]["config"]["served_entities"]
        assert entity["entity_version"] == "1" and entity["scale_to_zero_enabled"] is True  # dev may sleep
        fake.add_principal("ada", user_name="ada@example.com", groups=("users",))  # the bundle's workspace_group
        fake.add_principal("stranger", service_principal_name="some-other-app")
        allowed = [app_token(name) for name in apps] + ["ada"]
        assert [test_deploy._query(fake, endpoint, token, settings) for token in allowed] == [200] * len(allowed)
        assert test_deploy._query(fake, endpoint, "stranger", settings) == 403

        # the gateway app behind the Apps proxy: a token only on /api/, the caller forwarded, scoring answered
        with open(test_deploy._example(settings, "1")) as handle:
            example = json.load(handle)
        gateway = walker.resources["apps"]["gateway"]
        app_home = tmp_path / "gateway-app"
        app_home.mkdir()
        scoring = f"/serving-endpoints/{endpoint}/invocations"
        status, answer = call_gateway_app(fake, gateway, "ada", f"/api{scoring}", example, app_home, monkeypatch)
        assert status == 200, answer
        assert len(answer["predictions"]) == len(example["dataframe_split"]["data"])
        assert call_gateway_app(fake, gateway, "ada", scoring, example, app_home, monkeypatch)[0] == 401  # no /api/
        assert call_gateway_app(fake, gateway, "stranger", f"/api{scoring}", example, app_home,
                                monkeypatch)[0] == 403  # no CAN_USE on the app
        assert fake.unhandled == []


def test_the_fake_refuses_what_a_workspace_refuses(template, models):
    """An app resource must exist when the app is created; an app without compute is not running and takes no
    deployment; a secret must be in an existing scope."""
    from databricks.sdk import WorkspaceClient
    from databricks.sdk.errors import DatabricksError
    from databricks.sdk.service.apps import App, AppDeployment

    with FakeWorkspace("sqlite:///unused.db", models=models) as fake:
        ws = WorkspaceClient(host=fake.url, token="x")
        with pytest.raises(DatabricksError, match="serving endpoint coinyear does not exist"):
            ws.apps.create(App.from_dict({"name": "coinyear-ui", "resources": [
                {"name": "serving-endpoint", "serving_endpoint": {"name": "coinyear", "permission": "CAN_QUERY"}}]}),
                no_compute=True)
        with pytest.raises(DatabricksError, match="Scope coinyear does not exist"):
            ws.secrets.put_secret("coinyear", "api-tokens", string_value="t")
        ws.apps.create(App.from_dict({"name": "coinyear-ui"}), no_compute=True)
        assert not fake.app_running("coinyear-ui")
        with pytest.raises(DatabricksError, match="start the app compute"):
            ws.apps.deploy("coinyear-ui", AppDeployment(source_code_path="/Workspace/x")).result()
        ws.apps.start("coinyear-ui").result()
        assert not fake.app_running("coinyear-ui")  # compute, but no code deployed yet
        ws.apps.deploy("coinyear-ui", AppDeployment(source_code_path="/Workspace/x")).result()
        assert fake.app_running("coinyear-ui")
        with pytest.raises(DatabricksError, match="Invalid access token"):
            WorkspaceClient(host=fake.url, token="nobody").apps.get("coinyear-ui")
