"""Registry stage: model versions and their lifecycle in the MLflow Model Registry.

None -> Staging -> Production is expressed with the aliases `staging` and `production` (MLflow 3 and Unity
Catalog have no stages). Each promotion to production tags the new version with the version it replaced
(`previous_production`), so `rollback` can walk back through the history one step at a time, repeatedly.

`promote(..., expected_current=v)` is a compare-and-set for a job that judged a candidate against `v`: the alias
moves only while it still points to `v`, else `AliasChanged` and nothing moves, so a rollback made meanwhile
stands.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from coinyear.config import Settings, configure_mlflow

log = logging.getLogger(__name__)

STAGING, PRODUCTION = "staging", "production"
ALIASES = (STAGING, PRODUCTION)
PREVIOUS_TAG = "previous_production"
# test_*: the test coin types, the quality figure; val_*: the validation coins choices were made on
KEY_METRICS = ("test_mae", "test_within_10y", "test_portrait_top1", "val_mae", "val_rmse", "val_within_10y",
               "cv_mae_mean", "train_seconds")


class RegistryError(RuntimeError):
    """A registry operation that cannot be done (unknown version, nothing to roll back to...)."""


class AliasChanged(RegistryError):
    """A compare-and-set `promote` found the alias no longer where the caller saw it: nothing was moved."""

    def __init__(self, alias: str, expected: str | None, actual: str | None):
        self.alias, self.expected, self.actual = alias, expected, actual
        super().__init__(f"{alias} is version {actual or 'none'} now, not {expected or 'none'} as expected: "
                         f"not moved")


class _Anything(enum.Enum):
    ANYTHING = "anything"


# `promote`'s default `expected_current`: move the alias wherever it points (a person's explicit choice)
ANYTHING = _Anything.ANYTHING


@dataclass
class VersionInfo:
    version: str
    aliases: list[str]
    run_id: str | None
    created: float
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


def client(settings: Settings) -> MlflowClient:
    configure_mlflow(settings)
    return MlflowClient(tracking_uri=settings.mlflow_tracking_uri, registry_uri=settings.mlflow_registry_uri)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _is_not_found(error: MlflowException) -> bool:
    """True when the registry answered that the model or alias does not exist (and nothing else).

    A missing model is RESOURCE_DOES_NOT_EXIST; a missing alias is INVALID_PARAMETER_VALUE "... not found" in
    MLflow's stores and Unity Catalog alike. Anything else (an unreachable or failing registry) is no answer."""
    if error.error_code == "RESOURCE_DOES_NOT_EXIST":
        return True
    return error.error_code == "INVALID_PARAMETER_VALUE" and "not found" in error.message.lower()


def version_by_alias(settings: Settings, alias: str) -> str | None:
    """The version `alias` points to; None only when the registry says the model or the alias does not exist.

    Any other registry error raises RegistryError: a transient failure must never read as "no production
    model", or a job would promote a candidate without comparing it to the model it replaces."""
    try:
        return str(client(settings).get_model_version_by_alias(settings.model_name, alias).version)
    except MlflowException as error:
        if _is_not_found(error):
            return None
        raise RegistryError(f"cannot read alias {alias} of {settings.model_name}: {error.message}") from error


def list_versions(settings: Settings) -> list[VersionInfo]:
    """Every version of the model, newest first, with its aliases, key run metrics and tags."""
    mlflow_client = client(settings)
    try:
        versions = mlflow_client.search_model_versions(f"name='{settings.model_name}'")
    except MlflowException as error:
        if _is_not_found(error):
            return []
        raise RegistryError(f"cannot list versions of {settings.model_name}: {error.message}") from error
    if not versions:  # also when the model is not registered at all
        return []
    # search results carry no aliases; the registered model has the alias -> version map
    aliases: dict[str, list[str]] = {}
    for alias, version in (mlflow_client.get_registered_model(settings.model_name).aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    infos = []
    for mv in sorted(versions, key=lambda v: int(v.version), reverse=True):
        metrics = {}
        if mv.run_id:
            try:
                run_metrics = mlflow_client.get_run(mv.run_id).data.metrics
                metrics = {k: run_metrics[k] for k in KEY_METRICS if k in run_metrics}
            except MlflowException:
                pass
        infos.append(VersionInfo(str(mv.version), sorted(aliases.get(str(mv.version), [])), mv.run_id,
                                 (mv.creation_timestamp or 0) / 1000, metrics, dict(mv.tags or {})))
    return infos


def promote(settings: Settings, version: str | int, to: str,
            expected_current: str | int | _Anything | None = ANYTHING) -> str | None:
    """Point alias `to` at `version`; returns the version the alias pointed to before (or None).

    With `expected_current` (a version, or None: no such alias yet) it is a compare-and-set: the alias moves only
    while it still points there; otherwise AliasChanged is raised and nothing moved, the version's tags as before.
    """
    if to not in ALIASES:
        raise RegistryError(f"unknown alias {to!r}; use one of {', '.join(ALIASES)}")
    mlflow_client, name, version = client(settings), settings.model_name, str(version)
    try:
        tags_before = dict(mlflow_client.get_model_version(name, version).tags or {})
    except MlflowException as error:
        if _is_not_found(error):
            raise RegistryError(f"model {name} has no version {version}") from error
        raise RegistryError(f"cannot read version {version} of {name}: {error.message}") from error
    previous: str | None
    if isinstance(expected_current, _Anything):
        checked, previous = False, version_by_alias(settings, to)
    else:  # the tags below assume it; the read right before the set checks it
        checked, previous = True, None if expected_current is None else str(expected_current)
    tags = {f"{to}_since": _now()}
    if to == PRODUCTION and previous and previous != version:
        tags[PREVIOUS_TAG] = previous
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(name, version, key, value)
    if checked:
        # MLflow (Unity Catalog too) has no atomic compare-and-set of an alias: reading it as the very last call
        # before the set leaves a change one round trip to slip in, instead of the tag writes and the caller's
        # whole run (a long training)
        try:
            actual = version_by_alias(settings, to)
        except RegistryError:
            _restore_tags(mlflow_client, name, version, tags_before, tags)
            raise
        if actual != previous:
            _restore_tags(mlflow_client, name, version, tags_before, tags)
            raise AliasChanged(to, previous, actual)
    try:
        _set_alias(mlflow_client, name, to, version)
    except RegistryError:
        _restore_tags(mlflow_client, name, version, tags_before, tags)
        raise
    return previous


def _set_alias(mlflow_client: MlflowClient, name: str, alias: str, version: str) -> None:
    """Point `alias` at `version`, or raise RegistryError saying why not. In Unity Catalog only the model's owner
    (or a metastore admin) may move an alias ("Set Registered Model Alias"), whatever else a principal was
    granted: a job or an app running as someone else is refused (403 PERMISSION_DENIED)."""
    try:
        mlflow_client.set_registered_model_alias(name, alias, version)
    except MlflowException as error:
        owner = " (only the model's owner may move an alias)" if error.error_code == "PERMISSION_DENIED" else ""
        raise RegistryError(f"cannot point {alias} of {name} at version {version}{owner}: {error.message}") from error


def _restore_tags(mlflow_client: MlflowClient, name: str, version: str, before: Mapping[str, str],
                  written: Mapping[str, str]) -> None:
    """Put back the tags a promotion that did not happen wrote (best effort: a failure here only logs)."""
    for key in written:
        try:
            if key in before:
                mlflow_client.set_model_version_tag(name, version, key, before[key])
            else:
                mlflow_client.delete_model_version_tag(name, version, key)
        except MlflowException as error:
            log.warning("cannot restore tag %s of %s version %s: %s", key, name, version, error.message)


def rollback(settings: Settings, expected_current: str | int | None = None) -> tuple[str, str]:
    """Move `production` back to the version it pointed to before the current one: (from, to).

    With `expected_current` (the version a person saw when they asked, e.g. on the Models page) it is a
    compare-and-set like `promote`'s: when production has moved since (a retraining promoted a candidate, someone
    else rolled back), AliasChanged is raised and nothing moves, rather than rolling back a version they never saw.
    """
    mlflow_client, name = client(settings), settings.model_name
    current = version_by_alias(settings, PRODUCTION)
    if current is None:
        raise RegistryError(f"model {name} has no production version to roll back")
    if expected_current is not None and current != str(expected_current):
        raise AliasChanged(PRODUCTION, str(expected_current), current)
    target = mlflow_client.get_model_version(name, current).tags.get(PREVIOUS_TAG)
    if not target:
        raise RegistryError(f"version {current} has no earlier production version to roll back to")
    if expected_current is not None and (now := version_by_alias(settings, PRODUCTION)) != current:
        # the last read before the set, as in `promote`: a move during the tag read is not undone
        raise AliasChanged(PRODUCTION, current, now)
    _set_alias(mlflow_client, name, PRODUCTION, target)
    mlflow_client.set_model_version_tag(name, current, "rolled_back_at", _now())
    mlflow_client.set_model_version_tag(name, target, f"{PRODUCTION}_since", _now())
    return current, target


def tag_version(settings: Settings, version: str | int, tags: Mapping[str, object]) -> None:
    """Set each tag on the version; values are stored as their str()."""
    mlflow_client = client(settings)
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(settings.model_name, str(version), key, str(value))


def model_uri(settings: Settings, alias_or_version: str) -> str:
    """`models:/name@alias` for an alias, `models:/name/N` for a version number."""
    if str(alias_or_version).isdigit():
        return f"models:/{settings.model_name}/{alias_or_version}"
    return f"models:/{settings.model_name}@{alias_or_version}"
