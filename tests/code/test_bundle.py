"""The Databricks Asset Bundle cannot be deployed from here, so its structure is checked against the code it
runs: every variable it uses is declared, the jobs call real `coinyear` commands of our wheel, the settings it
passes are real settings, and the endpoint serves the model the jobs register."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from coinyear import cli
from coinyear.config import Settings

REPO = Path(__file__).resolve().parents[2]
BUNDLE_DIR = REPO / "deploy" / "databricks"
REFERENCE = re.compile(r"\$\{([^}]+)\}")


@pytest.fixture(scope="module")
def bundle() -> dict:
    return yaml.safe_load((BUNDLE_DIR / "databricks.yml").read_text())


def references(node, found=None) -> set[str]:
    found = set() if found is None else found
    if isinstance(node, dict):
        for value in node.values():
            references(value, found)
    elif isinstance(node, list):
        for value in node:
            references(value, found)
    elif isinstance(node, str):
        found.update(REFERENCE.findall(node))
    return found


def test_top_level_and_targets(bundle):
    assert bundle["bundle"]["name"] == "coinyear"
    assert set(bundle) <= {"bundle", "variables", "artifacts", "resources", "targets", "include", "sync"}
    targets = bundle["targets"]
    assert targets["dev"]["mode"] == "development" and targets["dev"]["default"] is True
    assert targets["prod"]["mode"] == "production"


def test_every_reference_resolves(bundle):
    declared = set(bundle["variables"])
    for target in bundle["targets"].values():
        assert set(target.get("variables", {})) <= declared
    for reference in references(bundle):
        kind, _, rest = reference.partition(".")
        if kind == "var":
            assert rest in declared, f"${{{reference}}} is not declared under variables"
        elif kind == "resources":
            group, name, field = rest.split(".", 2)
            assert field in bundle["resources"][group][name], f"${{{reference}}} does not exist"
        else:
            pytest.fail(f"unexpected reference ${{{reference}}}")
    for variable in bundle["variables"].values():
        assert variable.get("description") and "default" in variable


def test_the_wheel_artifact_is_this_package(bundle):
    artifact = bundle["artifacts"]["coinyear_wheel"]
    root = (BUNDLE_DIR / artifact["path"]).resolve()
    assert artifact["type"] == "whl" and root == REPO
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["name"] == "coinyear"


@pytest.mark.parametrize("job, command", [("retrain", cli.cmd_retrain), ("monitor", cli.cmd_monitor)])
def test_jobs_run_our_commands_one_at_a_time_on_a_schedule(bundle, job, command):
    spec = bundle["resources"]["jobs"][job]
    assert spec["max_concurrent_runs"] == 1
    schedule = spec["schedule"]
    assert schedule["timezone_id"] == "UTC"
    cron = bundle["variables"][REFERENCE.fullmatch(schedule["quartz_cron_expression"]).group(1)[4:]]["default"]
    assert len(cron.split()) in (6, 7), "Quartz cron: seconds minutes hours day month weekday [year]"
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    clusters = {c["job_cluster_key"]: c["new_cluster"] for c in spec["job_clusters"]}
    for task in spec["tasks"]:
        wheel_task = task["python_wheel_task"]
        assert wheel_task["package_name"] == "coinyear"
        assert scripts[wheel_task["entry_point"]] == "coinyear.cli:run"
        args = cli.build_parser().parse_args(wheel_task["parameters"])
        assert args.func is command
        assert [lib["whl"] for lib in task["libraries"]] == ["../../dist/*.whl"]
        environment = clusters[task["job_cluster_key"]]["spark_env_vars"]
        settings_fields = {f"COINYEAR_{name.upper()}" for name in Settings.model_fields}
        for key in environment:
            assert key in settings_fields or key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"), key
        assert environment["MLFLOW_REGISTRY_URI"] == "databricks-uc"
        assert environment["COINYEAR_LAKE_URI"].startswith("/Volumes/${var.catalog}/${var.schema}/")


def test_unity_catalog_model_matches_what_the_jobs_register_and_the_endpoint_serves(bundle):
    resources = bundle["resources"]
    model = resources["registered_models"]["coinyear"]
    full_name = f"{model['catalog_name']}.${{var.schema}}.{model['name']}"
    assert model["schema_name"] == "${resources.schemas.coinyear.name}"
    assert resources["schemas"]["coinyear"]["name"] == "${var.schema}"
    environment = resources["jobs"]["retrain"]["job_clusters"][0]["new_cluster"]["spark_env_vars"]
    assert environment["COINYEAR_MODEL_NAME"] == full_name
    endpoint = resources["model_serving_endpoints"]["coinyear"]
    served = endpoint["config"]["served_entities"]
    assert [entity["entity_name"] for entity in served] == [full_name]
    routes = endpoint["config"]["traffic_config"]["routes"]
    assert sum(route["traffic_percentage"] for route in routes) == 100
    assert {route["served_model_name"] for route in routes} == {entity["name"] for entity in served}
    tables = endpoint["ai_gateway"]["inference_table_config"]
    assert tables["enabled"] is True and tables["catalog_name"] == "${var.catalog}"
    for volume in resources["volumes"].values():
        assert volume["volume_type"] == "MANAGED"
        assert f"/Volumes/${{var.catalog}}/${{var.schema}}/{volume['name']}" in (
            environment["COINYEAR_LAKE_URI"], environment["COINYEAR_HOME"])
