"""The two deployment targets, local and Databricks, chosen once from the settings: who scores behind the gateway
(`gateway_backend`, COINYEAR_SERVING_BACKEND) and where `coinyear deploy` deploys (`run_deploy`,
COINYEAR_DEPLOY_TARGET). Above both: the local target lives in coinyear.serve and coinyear.deploy, the Databricks
one in coinyear.databricks, and neither imports the other.
"""

from __future__ import annotations

from collections.abc import Callable

from coinyear.config import Settings
from coinyear.deploy import DeployError, DeployResult, deploy_local
from coinyear.serve.backend import BackendFactory


def gateway_backend(settings: Settings) -> BackendFactory:
    """Who scores for `coinyear serve`: this process (`local`) or the Model Serving endpoint it forwards to
    (`databricks`); the routes and the wire format are the same."""
    if settings.serving_backend == "databricks":
        from coinyear.databricks.gateway import RemoteBackend

        return RemoteBackend
    from coinyear.serve.local import LocalBackend

    return LocalBackend


def run_deploy(settings: Settings, version: str | None = None, dry_run: bool = False, workspace=None,
               progress: Callable[[str], None] | None = None) -> DeployResult:
    """Make the deploy target serve the production version (or `version`, which becomes production)."""
    if version is not None and not str(version).isdigit():
        raise DeployError(f"--version takes a version number, got {version!r}")
    if settings.deploy_target == "local":
        return deploy_local(settings, version, dry_run)
    from coinyear.databricks.deploy import Deployment

    return Deployment(settings, workspace, progress).run(version and str(version), dry_run)
