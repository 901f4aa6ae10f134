"""`coinyear train --distributed N --cluster`: the ranks run on executors, which have none of the driver's
credentials, so the driver hands them the workspace's host and a service principal's OAuth secret from the secret
scope COINYEAR_WORKER_SECRET_SCOPE (coinyear.distributed.worker_environment), against the fake workspace.

The driver authenticates as a Databricks driver does, through something an executor does not have (here a config
file profile standing for the notebook context: no DATABRICKS_* variable a task could copy). TorchDistributor is
replaced by a recorder of what it would ship to the executors, and "an executor" is a fresh Python process whose
environment holds only what was shipped: it must reach the workspace as the service principal (OAuth M2M).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import make_settings, small_train_config
from tests.fake_workspace import DEPLOYER, FakeWorkspace

SCOPE = "coinyear"
CLIENT_ID, CLIENT_SECRET = "6f1c1d3e-0000-4000-8000-00000000beef", "dose-secret"

EXECUTOR = """
import json
from databricks.sdk import WorkspaceClient
from databricks.sdk.errors import DatabricksError
w = WorkspaceClient()
try:
    w.serving_endpoints.get("no-such-endpoint")
except DatabricksError as error:
    print(json.dumps({"auth_type": w.config.auth_type, "error_code": error.error_code}))
"""


class Shipped(Exception):
    """Raised by the recorder once it has what TorchDistributor would have shipped."""


@pytest.fixture
def driver(tmp_path, monkeypatch):
    """A fake workspace whose scope holds the service principal's secret, and a driver authenticated by a profile."""
    with FakeWorkspace("sqlite:///unused.db") as fake:
        from databricks.sdk import WorkspaceClient

        for name in [k for k in os.environ if k.startswith(("DATABRICKS_", "COINYEAR_"))]:
            monkeypatch.delenv(name)
        profile = tmp_path / "databrickscfg"
        profile.write_text(f"[DEFAULT]\nhost = {fake.url}\ntoken = {DEPLOYER}\n")
        monkeypatch.setenv("DATABRICKS_CONFIG_FILE", str(profile))
        deployer = WorkspaceClient(host=fake.url, token=DEPLOYER)
        deployer.secrets.create_scope(SCOPE)
        deployer.secrets.put_secret(SCOPE, "worker-client-id", string_value=CLIENT_ID)
        deployer.secrets.put_secret(SCOPE, "worker-client-secret", string_value=CLIENT_SECRET)
        fake.add_oauth_secret(CLIENT_ID, CLIENT_SECRET)
        yield fake


def shipped_environment(settings, monkeypatch) -> dict:
    """The credentials `run_distributed_training(..., cluster=True)` hands the ranks (TorchDistributor recorded)."""
    import pyspark.ml.torch.distributor as distributor

    from coinyear import spark
    from coinyear.data import read_manifest
    from coinyear.distributed import run_distributed_training

    recorded = {}

    class Recorder:
        def __init__(self, **options):
            assert options["local_mode"] is False  # --cluster: the ranks are executor tasks

        def run(self, function, *args):
            recorded["environment"] = args[-1]
            raise Shipped

    monkeypatch.setattr(distributor, "TorchDistributor", Recorder)
    monkeypatch.setattr(spark, "spark_session", lambda: None)
    config = small_train_config()
    manifest = read_manifest(settings.data_dir, settings.min_year, settings.max_year, limit=8, seed=0)
    with pytest.raises(Shipped):
        run_distributed_training(settings, config, manifest, processes=2, gpu=False, cluster=True)
    return recorded["environment"]


def test_cluster_ranks_get_the_host_and_the_service_principal_secret(driver, tmp_path, monkeypatch):
    settings = make_settings(tmp_path / "home", worker_secret_scope=SCOPE)
    environment = shipped_environment(settings, monkeypatch)
    assert environment == {"DATABRICKS_HOST": driver.url, "DATABRICKS_CLIENT_ID": CLIENT_ID,
                           "DATABRICKS_CLIENT_SECRET": CLIENT_SECRET}
    # an executor: nothing of the driver's (no profile, no variables) but what was shipped
    executor_env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "DATABRICKS_CONFIG_FILE": os.devnull,
                    **environment}
    done = subprocess.run([sys.executable, "-c", EXECUTOR], env=executor_env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    # authenticated (the endpoint is missing, not the caller unknown), as the service principal over OAuth
    assert answer == {"auth_type": "oauth-m2m", "error_code": "RESOURCE_DOES_NOT_EXIST"}
    assert ("POST", "/oidc/v1/token") in driver.calls


def test_cluster_without_the_scope_refuses_before_anything_starts(driver, tmp_path, monkeypatch):
    from coinyear.distributed import worker_environment

    with pytest.raises(ValueError, match="COINYEAR_WORKER_SECRET_SCOPE"):
        shipped_environment(make_settings(tmp_path / "home"), monkeypatch)
    assert worker_environment(make_settings(tmp_path / "home"), cluster=False) == {}  # locally: the driver's own


def test_the_fake_refuses_a_secret_to_whoever_may_not_read_it(driver, tmp_path):
    from databricks.sdk import WorkspaceClient
    from databricks.sdk.errors import DatabricksError

    driver.add_principal("someone", user_name="someone@example.com", groups=("users",))
    with pytest.raises(DatabricksError, match="READ permission"):
        WorkspaceClient(host=driver.url, token="someone").secrets.get_secret(SCOPE, "worker-client-secret")
    with pytest.raises(DatabricksError, match="Failed to get secret"):
        WorkspaceClient(host=driver.url, token=DEPLOYER).secrets.get_secret(SCOPE, "missing")
    from coinyear.distributed import worker_environment

    with pytest.raises(DatabricksError, match="Scope nowhere does not exist"):
        worker_environment(make_settings(tmp_path / "home", worker_secret_scope="nowhere"), cluster=True)
