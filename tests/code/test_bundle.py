"""The Databricks Asset Bundle cannot be deployed from CI (no workspace, no databricks CLI), so it is checked
against what can be had here:

- the typed resource models of PyPI `databricks-bundles` (generated from the CLI's own bundle schema): every
  resource, as written and as each target resolves it, must load with no unknown field and no bad enum value;
- development mode as the CLI applies it (`[dev <user>] ` before job names, `dev_<user>_` before Unity Catalog
  schema and model names, the same before an experiment's base name, schedules paused): every Unity Catalog name
  the code receives must follow the prefixed resource, never the raw variable;
- our code: every command a job runs parses with `coinyear.cli.build_parser()`, every COINYEAR_* variable is a
  Settings field, the job entry point returns or raises in-process (a wheel task calls it inside the driver's
  Python), the retrain task sets the task value its job branches on, and the apps' requirements install our wheel.

The top level of the bundle (targets, run_as, workspace, sync) has no model in `databricks-bundles`; it is
checked against hand-listed keys.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import pytest
import yaml
from databricks.bundles.apps import App
from databricks.bundles.experiments import MlflowExperiment
from databricks.bundles.jobs import Job
from databricks.bundles.registered_models import RegisteredModel
from databricks.bundles.schemas import Schema
from databricks.bundles.volumes import Volume

from coinyear import cli
from coinyear.config import Settings, get_settings
from tests.conftest import require_tool

REPO = Path(__file__).resolve().parents[2]
BUNDLE_DIR = REPO / "deploy" / "databricks"
REFERENCE = re.compile(r"\$\{([^}]+)\}")
MODELS = {"jobs": Job, "schemas": Schema, "volumes": Volume, "registered_models": RegisteredModel,
          "experiments": MlflowExperiment, "apps": App}
# Fields the workspace sets on a deployed resource; the bundle may reference them but does not declare them.
REQUIRED_VARIABLES = {"warehouse_id"}  # `bundle deploy --var warehouse_id=<id>` (tests/system/test_databricks_sequence)
OUTPUT_FIELDS = {"apps": {"service_principal_client_id"}, "jobs": {"id"}}  # known once deployed
TOP_LEVEL = {"bundle", "variables", "artifacts", "sync", "resources", "targets", "include", "workspace", "run_as",
             "permissions", "presets"}
TARGET_KEYS = {"mode", "default", "variables", "workspace", "run_as", "presets", "resources", "permissions",
               "artifacts", "sync", "git", "bundle", "cluster_id"}
USER = "alice.smith@example.com"
SHORT = "alice_smith"  # the CLI's workspace.current_user.short_name: the e-mail's local part, non-alphanumerics -> _
FRIENDLY = "alice-smith"  # workspace.current_user.domain_friendly_name: the short name with dashes (app names)
MLFLOW_ENV = {"MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"}
SETTINGS_ENV = {f"COINYEAR_{name.upper()}" for name in Settings.model_fields}
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


@pytest.fixture(scope="module")
def bundle() -> dict:
    return yaml.safe_load((BUNDLE_DIR / "databricks.yml").read_text())


def walk(node, path=()):
    """Every (path, value) of a parsed YAML tree, leaves and inner nodes."""
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk(value, (*path, index))


def substitute(node, lookup):
    """`node` with every ${ref} for which `lookup` returns a value replaced by it (strings only)."""
    if isinstance(node, dict):
        return {key: substitute(value, lookup) for key, value in node.items()}
    if isinstance(node, list):
        return [substitute(value, lookup) for value in node]
    if isinstance(node, str):
        return REFERENCE.sub(lambda m: str(v) if (v := lookup(m.group(1))) is not None else m.group(0), node)
    return node


def deployed(bundle: dict, target: str) -> dict:
    """The resources as `databricks bundle deploy -t <target>` sends them, by the CLI's order: variables (the
    target's over the defaults) and workspace/bundle values resolved, then the mode's presets applied to the
    names, then ${resources...} resolved to those deployed names."""
    spec = bundle["targets"][target]
    development = spec.get("mode") == "development"
    context = {"workspace.current_user.short_name": SHORT, "workspace.current_user.userName": USER,
               "workspace.current_user.domain_friendly_name": FRIENDLY, "bundle.name": bundle["bundle"]["name"],
               "bundle.target": target}
    # a variable without a default is given on the command line (`--var name=...`): a placeholder here
    variables = {name: var.get("default", f"<var.{name}>") for name, var in bundle["variables"].items()} \
        | spec.get("variables", {})
    variables = substitute(variables, context.get)
    resources = substitute(bundle["resources"], lambda ref: variables.get(ref[4:]) if ref.startswith("var.")
                           else context.get(ref))
    if development:
        for job in resources["jobs"].values():
            job["name"] = f"[dev {SHORT}] {job['name']}"
            for trigger in ("schedule", "trigger", "continuous"):
                if trigger in job:
                    job[trigger].setdefault("pause_status", "PAUSED")
        for group in ("schemas", "registered_models"):
            for resource in resources.get(group, {}).values():
                resource["name"] = f"dev_{SHORT}_{resource['name']}"
        for experiment in resources.get("experiments", {}).values():
            folder, _, base = experiment["name"].rpartition("/")
            experiment["name"] = f"{folder}/[dev {SHORT}] {base}"

    def resource_field(ref: str):
        kind, group, key, field = ref.split(".", 3)
        if field in OUTPUT_FIELDS.get(group, ()):
            return f"<{group}.{key}.{field}>"
        return resources[group][key][field] if kind == "resources" else None

    return substitute(resources, resource_field)


def wheel_tasks(resources: dict):
    for job_key, job in resources["jobs"].items():
        for task in job["tasks"]:
            if "python_wheel_task" in task:
                yield job_key, task


def cluster_env(resources: dict, job_key: str, task: dict) -> dict:
    clusters = {c["job_cluster_key"]: c["new_cluster"] for c in resources["jobs"][job_key]["job_clusters"]}
    return clusters[task["job_cluster_key"]]["spark_env_vars"]


def parse(argv: list[str], where: str):
    """`coinyear <argv>` parsed by the real CLI; a command or flag it lacks fails the test, naming `where`."""
    try:
        return cli.build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where} runs `coinyear {' '.join(argv)}`, which the CLI does not accept (see stderr)")


def app_env(app: dict) -> dict:
    return {item["name"]: item.get("value", item.get("value_from")) for item in app["config"]["env"]}


# ------------------------------------------------------------------------------------------------- structure
def test_top_level_targets_and_production_settings(bundle):
    assert bundle["bundle"]["name"] == "coinyear"
    assert set(bundle) <= TOP_LEVEL, set(bundle) - TOP_LEVEL
    targets = bundle["targets"]
    for target in targets.values():
        assert set(target) <= TARGET_KEYS, set(target) - TARGET_KEYS
    assert targets["dev"]["mode"] == "development" and targets["dev"]["default"] is True
    prod = targets["prod"]
    # production mode refuses a target without a fixed root path and an identity the jobs run as
    assert prod["mode"] == "production"
    assert prod["workspace"]["root_path"].startswith("/Workspace/")
    assert prod["run_as"] == {"service_principal_name": "${var.service_principal}"}


@pytest.mark.parametrize("target", [None, "dev", "prod"])
def test_every_resource_loads_into_the_databricks_bundles_models(bundle, target):
    resources = bundle["resources"] if target is None else deployed(bundle, target)
    assert set(resources) <= set(MODELS), f"no typed model checks {set(resources) - set(MODELS)}"
    for group, items in resources.items():
        for key, spec in items.items():
            try:
                MODELS[group].from_dict(copy.deepcopy(spec))
            except (ValueError, TypeError) as error:
                pytest.fail(f"resources.{group}.{key} ({target or 'as written'}): {error}")


def test_the_models_reject_what_the_bundle_must_not_contain():
    """The check above can fail: an unknown field or a bad enum value is an error of the typed models."""
    with pytest.raises(ValueError, match="Unexpected field"):
        Job.from_dict({"name": "x", "tasks": [{"task_key": "a", "python_wheel_task": {"package_name": "p",
                                                                                      "entrypoint": "e"}}]})
    with pytest.raises(ValueError):
        Job.from_dict({"name": "x", "schedule": {"quartz_cron_expression": "0 0 3 * * ?", "timezone_id": "UTC",
                                                 "pause_status": "RUNNING"}})


def test_every_reference_resolves(bundle):
    declared = set(bundle["variables"])
    for name, variable in bundle["variables"].items():  # without a default only what the docs' deploy step gives
        assert variable.get("description") and ("default" in variable or name in REQUIRED_VARIABLES), name
    for target in bundle["targets"].values():
        assert set(target.get("variables", {})) <= declared
    allowed_context = {"workspace.current_user.short_name", "workspace.current_user.userName",
                       "workspace.current_user.domain_friendly_name", "bundle.name", "bundle.target"}
    references = {ref for _, value in walk(bundle) if isinstance(value, str) for ref in REFERENCE.findall(value)}
    assert references, "the pattern found nothing: the check would pass vacuously"
    for reference in references:
        kind, _, rest = reference.partition(".")
        if kind == "var":
            assert rest in declared, f"${{{reference}}} is not declared under variables"
        elif kind == "resources":
            group, name, field = rest.split(".", 2)
            assert name in bundle["resources"].get(group, {}), f"${{{reference}}}: no such resource"
            assert field in bundle["resources"][group][name] or field in OUTPUT_FIELDS.get(group, ()), reference
        else:
            assert reference in allowed_context, f"unexpected reference ${{{reference}}}"
    for target in ("dev", "prod"):
        left = {ref for _, value in walk(deployed(bundle, target)) if isinstance(value, str)
                for ref in REFERENCE.findall(value)}
        assert not left, f"-t {target} leaves {left} unresolved"


def test_no_endpoint_no_pinned_version_no_forced_schedule(bundle):
    """The endpoint's version comes from the production alias (`coinyear deploy`), never from the bundle: a
    version pinned here fails on a workspace without it and resets the endpoint on every `bundle deploy`. An
    explicit pause_status would override development mode's paused schedules."""
    text = (BUNDLE_DIR / "databricks.yml").read_text()
    assert "model_serving_endpoints" not in bundle["resources"]
    assert "entity_version" not in text and "production_version" not in bundle["variables"]
    assert not [path for path, _ in walk(bundle) if path and path[-1] == "pause_status"]
    scheduled = [job for job in bundle["resources"]["jobs"].values() if "schedule" in job]
    assert {job["name"] for job in scheduled} == {"coinyear-retrain", "coinyear-monitor"}
    for job in bundle["resources"]["jobs"].values():
        assert job["max_concurrent_runs"] == 1  # development mode would otherwise allow concurrent runs


# ------------------------------------------------------------------------------------------------- names per target
def test_development_mode_every_unity_catalog_name_follows_the_prefixed_resource(bundle):
    resources = deployed(bundle, "dev")
    schema = f"main.dev_{SHORT}_coinyear"
    expected = {
        "COINYEAR_MODEL_NAME": f"{schema}.dev_{SHORT}_coinyear",
        "COINYEAR_LAKE_SCHEMA": schema,
        "COINYEAR_EXPERIMENT_NAME": f"/Shared/[dev {SHORT}] coinyear",
        "COINYEAR_ENDPOINT_NAME": f"dev_{SHORT}_coinyear",
        "COINYEAR_PAYLOAD_TABLE": f"{schema}.dev_{SHORT}_coinyear_payload",
        "COINYEAR_DATA_DIR": f"/Volumes/main/dev_{SHORT}_coinyear/reference/ocre",
        "COINYEAR_LOOP_VOLUME": f"/Volumes/main/dev_{SHORT}_coinyear/loop",
        "COINYEAR_DEPLOY_SCALE_TO_ZERO": "true",  # a developer's endpoint may sleep
        "COINYEAR_DEPLOY_QUERY_GROUP": "users",
        "COINYEAR_DEPLOY_QUERY_SERVICE_PRINCIPALS": "<apps.ui.service_principal_client_id>,"
                                                    "<apps.gateway.service_principal_client_id>",
    }
    tasks = list(wheel_tasks(resources))
    assert len(tasks) >= 7
    for job_key, task in tasks:
        environment = cluster_env(resources, job_key, task)
        assert {key: environment[key] for key in expected} == expected, (job_key, task["task_key"])
    for job in resources["jobs"].values():
        assert job["name"].startswith(f"[dev {SHORT}] coinyear-")
        if "schedule" in job:
            assert job["schedule"]["pause_status"] == "PAUSED"
    assert resources["schemas"]["coinyear"]["name"] == f"dev_{SHORT}_coinyear"
    for volume in resources["volumes"].values():
        assert volume["schema_name"] == f"dev_{SHORT}_coinyear"
    predict = resources["jobs"]["batch_predict"]["tasks"][0]["python_wheel_task"]["parameters"]
    assert predict[predict.index("--out-table") + 1] == f"{schema}.predictions"
    assert predict[predict.index("--images") + 1] == f"/Volumes/main/dev_{SHORT}_coinyear/photos"
    assert {app["name"] for app in resources["apps"].values()} == {f"coinyear-ui-{FRIENDLY}",
                                                                   f"coinyear-gateway-{FRIENDLY}"}
    for app in resources["apps"].values():
        environment = app_env(app)
        assert environment["COINYEAR_MODEL_NAME"] == expected["COINYEAR_MODEL_NAME"]
        assert environment["COINYEAR_LOOP_VOLUME"] == expected["COINYEAR_LOOP_VOLUME"]
        assert environment["COINYEAR_ENDPOINT_NAME"] == expected["COINYEAR_ENDPOINT_NAME"]


def test_production_names_are_unprefixed_and_schedules_run(bundle):
    resources = deployed(bundle, "prod")
    for job_key, task in wheel_tasks(resources):
        environment = cluster_env(resources, job_key, task)
        assert environment["COINYEAR_MODEL_NAME"] == "prod.coinyear.coinyear"
        assert environment["COINYEAR_EXPERIMENT_NAME"] == "/Shared/coinyear"
        assert environment["COINYEAR_PAYLOAD_TABLE"] == "prod.coinyear.coinyear_payload"
        assert environment["COINYEAR_DEPLOY_SCALE_TO_ZERO"] == "false"  # production must not cold-start
    for job in resources["jobs"].values():
        assert not job["name"].startswith("[dev")
        assert "pause_status" not in job.get("schedule", {})  # the API default: UNPAUSED
    assert {app["name"] for app in resources["apps"].values()} == {"coinyear-ui", "coinyear-gateway"}


@pytest.mark.parametrize("target", ["dev", "prod"])
def test_app_names_are_valid(bundle, target):
    for app in deployed(bundle, target)["apps"].values():
        assert re.fullmatch(r"[a-z0-9-]{2,30}", app["name"]), app["name"]  # Databricks Apps' naming rule


def test_uc_names_are_never_built_from_the_raw_variables(bundle):
    """${var.schema} / ${var.model_name} name the resources only; everything else refers to the resource, so the
    development prefix reaches the code."""
    for path, value in walk(bundle["resources"]):
        if isinstance(value, str) and ("${var.schema}" in value or "${var.model_name}" in value):
            assert path[-1] == "name" and path[0] in ("schemas", "registered_models"), path


# ------------------------------------------------------------------------------------------------- jobs vs code
def test_jobs_run_real_commands_through_the_job_entry_point(bundle):
    assert PROJECT["scripts"]["coinyear-job"] == "coinyear.cli:job"
    assert PROJECT["scripts"]["coinyear"] == "coinyear.cli:run"
    resources = deployed(bundle, "prod")
    commands = set()
    for job_key, task in wheel_tasks(resources):
        wheel_task = task["python_wheel_task"]
        assert wheel_task["package_name"] == PROJECT["name"]
        assert wheel_task["entry_point"] == "coinyear-job"  # never `coinyear`: its sys.exit ends the driver REPL
        args = parse(wheel_task["parameters"], f"jobs.{job_key} task {task['task_key']}")
        commands.add(" ".join(wheel_task["parameters"][:2] if args.command == "models" else [args.command]))
        # the wheel, and PyPI packages only where the task trains or scores (tests/code/test_extras.py)
        assert [library["whl"] for library in task["libraries"] if "pypi" not in library] == ["../../dist/*.whl"]
    assert commands == {"retrain", "deploy", "models rollback", "ingest-payloads", "monitor", "predict", "train"}
    train = resources["jobs"]["train_gpu"]
    parameters = train["tasks"][0]["python_wheel_task"]["parameters"]
    gpu_cluster = train["job_clusters"][0]["new_cluster"]
    assert parameters[parameters.index("--distributed") + 1] == str(gpu_cluster["num_workers"])
    assert {"--gpu", "--cluster"} <= set(parameters)  # the processes are Spark tasks, one per worker GPU
    assert gpu_cluster["spark_conf"]["spark.task.resource.gpu.amount"] == "1"


def test_job_environment_is_settings_and_keeps_state_off_volumes(bundle, monkeypatch):
    resources = deployed(bundle, "prod")
    for job_key, task in wheel_tasks(resources):
        environment = cluster_env(resources, job_key, task)
        assert set(environment) <= SETTINGS_ENV | MLFLOW_ENV, set(environment) - SETTINGS_ENV - MLFLOW_ENV
        assert environment["MLFLOW_REGISTRY_URI"] == "databricks-uc"
        assert environment["COINYEAR_LAKE_BACKEND"] == "spark"
        # delta-rs commits by rename and volumes have none: no Delta table, cache or spool under /Volumes
        assert environment["COINYEAR_HOME"].startswith("/local_disk0/")
        assert "COINYEAR_LAKE_URI" not in environment
        for key, value in environment.items():
            monkeypatch.setenv(key, value)
        settings = Settings()  # every value parses as its field's type (e.g. the lake backend literal)
        assert settings.lake_backend == "spark" and settings.lake_schema == "prod.coinyear"
        assert settings.deploy_target == "databricks"
    assert resources["jobs"]["train_gpu"]["job_clusters"][0]["new_cluster"]["spark_version"].split(".x-")[1]\
        .startswith("gpu-ml")


def test_retrain_job_always_deploys_and_reads_no_task_value(bundle):
    """The deploy task runs after every retrain, whatever it decided and even when it failed: `coinyear deploy`
    converges the endpoint on the production alias (SKIPPED when it already serves it), so nothing branches on a
    task value a failed or old run may not have set."""
    tasks = {task["task_key"]: task for task in bundle["resources"]["jobs"]["retrain"]["tasks"]}
    assert list(tasks) == ["ingest_payloads", "retrain", "deploy"]
    assert tasks["retrain"]["python_wheel_task"]["parameters"] == ["retrain"]
    assert tasks["deploy"]["depends_on"] == [{"task_key": "retrain"}] and tasks["deploy"]["run_if"] == "ALL_DONE"
    assert tasks["deploy"]["python_wheel_task"]["parameters"] == ["deploy"]
    assert not [path for path, _ in walk(bundle) if path and path[-1] == "condition_task"]
    assert "{{tasks." not in (BUNDLE_DIR / "databricks.yml").read_text()
    rollback = [task["task_key"] for task in bundle["resources"]["jobs"]["rollback"]["tasks"]]
    assert rollback == ["rollback", "deploy"]
    assert bundle["resources"]["jobs"]["rollback"]["tasks"][1]["depends_on"] == [{"task_key": "rollback"}]
    monitor = bundle["resources"]["jobs"]["monitor"]["tasks"]
    assert [task["python_wheel_task"]["parameters"] for task in monitor] == [["ingest-payloads"], ["monitor"]]
    assert monitor[1]["run_if"] == "ALL_DONE" and monitor[1]["depends_on"] == [{"task_key": "ingest_payloads"}]


def test_deploy_tasks_outlast_the_endpoint_waits(bundle, monkeypatch):
    """Model Serving gives a CPU deployment up to 30 minutes after its container build (which has no limit and is
    retried up to 3 times: "Debug model serving timeouts"), so one wait of `coinyear deploy` must be longer, and
    the task must outlast its four waits (an update in progress, the canary, the promotion, a restore) and the
    watch: a task killed in between would leave a canary nobody finishes watching."""
    resources = deployed(bundle, "prod")
    deploy_tasks = [(job_key, task) for job_key, task in wheel_tasks(resources)
                    if task["python_wheel_task"]["parameters"] == ["deploy"]]
    assert {job_key for job_key, _ in deploy_tasks} == {"retrain", "rollback"}
    for job_key, task in deploy_tasks:
        for key, value in cluster_env(resources, job_key, task).items():
            monkeypatch.setenv(key, value)
        settings = Settings()
        assert settings.deploy_timeout_seconds > 30 * 60
        assert task["timeout_seconds"] >= 4 * settings.deploy_timeout_seconds + settings.deploy_watch_seconds
        assert settings.deploy_lock_lease_seconds < settings.deploy_timeout_seconds  # renewed, not sized to it


def test_grants_and_permissions(bundle):
    resources = bundle["resources"]
    principal, group = "${var.uc_principal}", "${var.workspace_group}"
    # Unity Catalog grants name an account-level principal; workspace permissions name a workspace group
    assert bundle["variables"]["uc_principal"]["default"] == "account users"
    assert bundle["variables"]["workspace_group"]["default"] == "users"
    assert "users_group" not in bundle["variables"]
    schema_grants = {g["principal"]: set(g["privileges"]) for g in resources["schemas"]["coinyear"]["grants"]}
    assert {"USE_SCHEMA", "SELECT"} <= schema_grants[principal]
    model_grants = {g["principal"]: set(g["privileges"]) for g in resources["registered_models"]["coinyear"]["grants"]}
    for app in resources["apps"]:
        principal = f"${{resources.apps.{app}.service_principal_client_id}}"
        assert "EXECUTE" in model_grants[principal] and "USE_SCHEMA" in schema_grants[principal]
    assert "EXECUTE" in model_grants[principal]
    # the UI app creates (and owns) feedback_reviews through its warehouse; it may modify no table of the jobs'
    ui_schema = schema_grants["${resources.apps.ui.service_principal_client_id}"]
    assert "CREATE_TABLE" in ui_schema and not ui_schema & {"MODIFY", "ALL_PRIVILEGES", "MANAGE"}
    grantees = {g["principal"] for _, value in walk(resources) if isinstance(value, dict) and "grants" in value
                for g in value["grants"]}
    assert group not in grantees  # a workspace group is no Unity Catalog principal
    loop = {g["principal"]: set(g["privileges"]) for g in resources["volumes"]["loop"]["grants"]}
    assert loop["${resources.apps.gateway.service_principal_client_id}"] == {"READ_VOLUME", "WRITE_VOLUME"}
    for job in resources["jobs"].values():
        assert {"level": "CAN_VIEW", "group_name": group} in job["permissions"]
    for job_key, task in wheel_tasks(resources):
        if task["python_wheel_task"]["parameters"] == ["deploy"]:
            # the endpoint is `coinyear deploy`'s: it gives CAN_QUERY to the group and to both apps
            environment = cluster_env(resources, job_key, task)
            assert environment["COINYEAR_DEPLOY_QUERY_GROUP"] == group
            assert environment["COINYEAR_DEPLOY_QUERY_SERVICE_PRINCIPALS"].split(",") == [
                f"${{resources.apps.{app}.service_principal_client_id}}" for app in resources["apps"]]
    for app in resources["apps"].values():
        assert {"level": "CAN_USE", "group_name": group} in app["permissions"]
        # an app resource must exist when the app is created; the endpoint does not before the first retrain
        assert not [r for r in app.get("resources", []) if "serving_endpoint" in r]
        assert app_env(app)["COINYEAR_ENDPOINT_NAME"] == "${var.endpoint_name}"
    # both apps' users are who the Apps proxy signs in and forwards, with CAN_USE: no tokens of ours
    for app in resources["apps"].values():
        assert app_env(app)["COINYEAR_APPS_PROXY"] == "true" and "COINYEAR_API_TOKENS" not in app_env(app)
    assert resources["apps"]["ui"]["resources"] == [
        {"name": "sql-warehouse", "sql_warehouse": {"id": "${var.warehouse_id}", "permission": "CAN_USE"}}]
    ui = app_env(resources["apps"]["ui"])  # the tables through the warehouse (tests/system/test_ui_databricks.py)
    assert (ui["COINYEAR_LAKE_BACKEND"], ui["COINYEAR_SQL_WAREHOUSE_ID"]) == ("warehouse", "sql-warehouse")
    assert {"level": "CAN_READ", "group_name": group} in resources["experiments"]["coinyear"]["permissions"]


# ------------------------------------------------------------------------------------------------- apps
def test_apps_run_real_commands_with_settings_and_install_our_wheel(bundle):
    resources = bundle["resources"]
    paths = set()
    for key, app in resources["apps"].items():
        folder = (BUNDLE_DIR / app["source_code_path"]).resolve()
        paths.add(folder)
        assert folder.parent == BUNDLE_DIR / "apps"
        # the bundle's `config` becomes the folder's app.yml at deploy; a committed app.yaml would contradict it
        assert not list(folder.glob("app.y*ml"))
        lines = [line for line in (folder / "requirements.txt").read_text().splitlines()
                 if line and not line.startswith("#")]
        # our wheel with the app's extra, exactly this version (what else an app installs: tests/code/test_extras)
        extra = {"ui": "ui", "gateway": "serve"}[key]
        assert lines[:2] == ["--find-links ./wheels", f"coinyear[{extra}]=={PROJECT['version']}"]
        command = [part.replace("$DATABRICKS_APP_PORT", "8000") for part in app["config"]["command"]]
        assert command[0] == "coinyear"
        args = parse(command[1:], f"apps.{key}")
        assert args.command == {"ui": "ui", "gateway": "serve"}[key] and args.port == 8000
        assert args.host == "0.0.0.0"
        environment = app_env(app)
        assert set(environment) <= SETTINGS_ENV | MLFLOW_ENV, set(environment) - SETTINGS_ENV - MLFLOW_ENV
        assert environment["COINYEAR_ENDPOINT_NAME"] == "${var.endpoint_name}"
        sources = {item["value_from"] for item in app["config"]["env"] if "value_from" in item}
        assert sources <= {resource["name"] for resource in app.get("resources", [])}
    assert len(paths) == len(resources["apps"])  # the CLI refuses two apps in one folder (app.yml overwritten)
    assert app_env(resources["apps"]["gateway"])["COINYEAR_SERVING_BACKEND"] == "databricks"
    # the GPU job's ranks get a service principal's secret from the scope (tests/system/test_distributed_credentials)
    (gpu_task,) = resources["jobs"]["train_gpu"]["tasks"]
    assert "--cluster" in gpu_task["python_wheel_task"]["parameters"]
    assert cluster_env(resources, "train_gpu", gpu_task)["COINYEAR_WORKER_SECRET_SCOPE"] == "${var.secret_scope}"
    assert "apps/*/wheels/*.whl" in bundle["sync"]["include"]  # git-ignored, so uploaded only when included
    assert "apps/*/wheels/" in (BUNDLE_DIR / ".gitignore").read_text().split()
    assert "vendor_wheel.py" in bundle["artifacts"]["coinyear_wheel"]["build"]
    root = (BUNDLE_DIR / bundle["artifacts"]["coinyear_wheel"]["path"]).resolve()
    assert root == REPO and bundle["artifacts"]["coinyear_wheel"]["type"] == "whl"


# ------------------------------------------------------------------------------------------------- entry point
@pytest.fixture
def job_env(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("COINYEAR_HOME", str(home))
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "DATABRICKS_RUNTIME_VERSION"):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    yield home
    get_settings.cache_clear()


def test_job_entry_point_returns_on_success_and_raises_on_failure(job_env, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["coinyear-job", "models", "list", "--json"])
    assert cli.job() is None  # returned: the interpreter (the driver's REPL on Databricks) is still here
    assert capsys.readouterr().out.strip() == "[]"
    monkeypatch.setattr(sys, "argv", ["coinyear-job", "models", "rollback"])
    with pytest.raises(RuntimeError, match="models rollback failed with exit status 2"):
        cli.job()
    monkeypatch.setattr(sys, "argv", ["coinyear-job", "no-such-command"])
    with pytest.raises(RuntimeError, match="exit status 2"):  # argparse's SystemExit does not escape
        cli.job()


def forget_sdk_runtime(monkeypatch):
    """Make the next import of `databricks.sdk.runtime` run its module code again (it decides at import time)."""
    import databricks.sdk

    monkeypatch.delitem(sys.modules, "databricks.sdk.runtime", raising=False)
    monkeypatch.delattr(databricks.sdk, "runtime", raising=False)


@pytest.fixture
def databricks_runtime(monkeypatch):
    """A stand-in for the Databricks Runtime's `dbruntime` module, under the real `databricks.sdk.runtime`: the
    SDK hands a wheel task the REPL's `dbutils` from it. Returns the task values set."""
    values = {}
    task_values = types.SimpleNamespace(set=lambda key, value: values.__setitem__(key, value))
    dbutils = types.SimpleNamespace(jobs=types.SimpleNamespace(taskValues=task_values))
    namespace = types.SimpleNamespace(get_namespace_globals=lambda: {"dbutils": dbutils})
    dbruntime = types.ModuleType("dbruntime")
    dbruntime.UserNamespaceInitializer = types.SimpleNamespace(getOrCreate=lambda: namespace)
    monkeypatch.setitem(sys.modules, "dbruntime", dbruntime)
    forget_sdk_runtime(monkeypatch)  # re-imported against the stand-in
    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "17.3")
    return values


def test_retrain_sets_the_decision_task_value_on_databricks(job_env, databricks_runtime, monkeypatch):
    from coinyear.jobs import retrain

    monkeypatch.setattr(retrain, "run_retrain", lambda settings, dry_run, force: retrain.RetrainResult(
        retrain.PROMOTED, "candidate beats production", candidate_version="2", production_after="2"))
    monkeypatch.setattr(sys, "argv", ["coinyear-job", "retrain"])
    cli.job()
    assert databricks_runtime == {"decision": "promoted"}


def test_task_values_elsewhere_and_on_a_broken_runtime(job_env, monkeypatch):
    from coinyear.jobs.task_values import set_task_value

    assert set_task_value("decision", "rejected") is False  # no job run outside Databricks: nothing to set
    with pytest.raises(ValueError, match="JSON"):
        set_task_value("decision", object())
    # DATABRICKS_RUNTIME_VERSION without the runtime (and without credentials): a clear error, not a silent skip
    for name in [name for name in os.environ if name.startswith("DATABRICKS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "17.3")
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE", str(job_env / "no.databrickscfg"))
    forget_sdk_runtime(monkeypatch)
    monkeypatch.delitem(sys.modules, "dbruntime", raising=False)
    with pytest.raises(RuntimeError, match="decision"):
        set_task_value("decision", "promoted")


# ------------------------------------------------------------------------------------------------- the wheel
@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(dist), str(REPO)],
                   check=True, timeout=300)
    (built,) = dist.glob("coinyear-*.whl")
    assert built.name == f"coinyear-{PROJECT['version']}-py3-none-any.whl"
    return built


def test_apps_requirements_install_the_vendored_wheel(wheel, tmp_path):
    """What `bundle deploy` does for the apps, then what an app does with its folder: vendor_wheel.py copies the
    wheel in, and pip installs `coinyear` from requirements.txt (no dependencies: offline, ours only)."""
    sys.path.insert(0, str(BUNDLE_DIR / "apps"))
    try:
        import vendor_wheel
    finally:
        sys.path.pop(0)
    apps = tmp_path / "apps"
    shutil.copytree(BUNDLE_DIR / "apps", apps, ignore=shutil.ignore_patterns("wheels", "__pycache__"))
    (apps / "ui" / "wheels").mkdir()
    (apps / "ui" / "wheels" / "coinyear-0.0.1-py3-none-any.whl").write_bytes(b"stale")
    copies = vendor_wheel.vendor(wheel.parent, apps)
    assert sorted(copy.parent.parent.name for copy in copies) == ["gateway", "ui"]
    assert [p.name for p in (apps / "ui" / "wheels").iterdir()] == [wheel.name]  # the stale wheel is gone
    with pytest.raises(FileNotFoundError, match="build it first"):
        vendor_wheel.vendor(tmp_path / "empty", apps)
    target = tmp_path / "site"
    # run from elsewhere: --find-links ./wheels is relative to the requirements file, not to pip's directory
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target),
                    "-r", str(apps / "ui" / "requirements.txt")], check=True, cwd=tmp_path, timeout=120,
                   env={key: value for key, value in os.environ.items() if key != "PYTHONPATH"})
    (info,) = target.glob("coinyear-*.dist-info")
    assert info.name == f"coinyear-{PROJECT['version']}.dist-info"
    assert "coinyear-job = coinyear.cli:job" in (info / "entry_points.txt").read_text()


def python312() -> str | None:
    """A working Python 3.12 (pyenv's shim for `python3.12` exists even where it has no such version)."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = [*sorted(root.glob("versions/3.12*/bin/python3.12"), reverse=True), shutil.which("python3.12")]
    for candidate in filter(None, candidates):
        check = subprocess.run([str(candidate), "-c", "import sys; assert sys.version_info[:2] == (3, 12)"],
                               check=False, capture_output=True, timeout=60)
        if check.returncode == 0:
            return str(candidate)
    return None


def test_wheel_installs_and_runs_its_cli_under_python_312(wheel, tmp_path):
    """Databricks Runtime 17.3 LTS ML runs Python 3.12, so pyproject admits 3.12: the wheel installs there and
    its command line, settings and job entry point import and work. (The full dependency set, torch included,
    resolved to Python 3.12 wheels in a `pip install --dry-run` once by hand; it was never installed and
    imported under 3.12, and CI installs only what these modules need.)"""
    interpreter = require_tool(python312(), "python3.12 not found: CI must check the wheel under the runtime's Python")
    venv = tmp_path / "venv"
    # a clean environment: a PYTHONPATH with the source tree would make pip think coinyear is installed already
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", str(tmp_path))}
    subprocess.run([interpreter, "-m", "venv", str(venv)], check=True, timeout=120, env=env)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "--no-deps", str(wheel)], check=True, timeout=120, env=env)
    requirements = [r for r in PROJECT["dependencies"] if r.split(">")[0].split("=")[0] in ("pydantic",
                                                                                          "pydantic-settings")]
    subprocess.run(pip + requirements, check=True, timeout=300, env=env)
    probe = ("import sys, importlib.metadata as md; from coinyear import cli; from coinyear.config import Settings; "
             "from coinyear.jobs.task_values import set_task_value; "
             "assert sys.version_info[:2] == (3, 12); "
             "assert cli.build_parser().parse_args(['retrain']).func is cli.cmd_retrain; "
             "assert Settings(lake_backend='spark').lake_backend == 'spark'; "
             "assert set_task_value('decision', 'promoted') is False; "
             "(ep,) = [e for e in md.entry_points(group='console_scripts') if e.name == 'coinyear-job']; "
             "assert ep.load() is cli.job; print('ok')")
    result = subprocess.run([str(venv / "bin" / "python"), "-c", probe], check=False, capture_output=True, text=True,
                            timeout=120, cwd=tmp_path, env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
