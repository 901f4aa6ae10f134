"""Registry helpers tell "no such alias" apart from "the registry failed": only the first means none."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import mlflow
import pytest

from coinyear import registry
from tests.conftest import make_settings, send_json


class FailingRegistry(BaseHTTPRequestHandler):
    """An MLflow REST server that is up but fails every call (as during an outage or an overload)."""

    def do_GET(self):
        send_json(self, 500, {"error_code": "INTERNAL_ERROR", "message": "database is locked"})

    do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def failing_registry_uri(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = ThreadingHTTPServer(("127.0.0.1", 0), FailingRegistry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_missing_model_and_missing_alias_mean_none(tmp_path):
    settings = make_settings(tmp_path / "home")
    assert registry.version_by_alias(settings, registry.PRODUCTION) is None
    assert registry.list_versions(settings) == []
    registry.client(settings).create_registered_model(settings.model_name)
    assert registry.version_by_alias(settings, registry.PRODUCTION) is None
    assert registry.list_versions(settings) == []


def test_a_failing_registry_is_an_error_not_none(tmp_path, failing_registry_uri):
    settings = make_settings(tmp_path / "home").model_copy(update={"registry_uri": failing_registry_uri})
    try:
        with pytest.raises(registry.RegistryError, match="cannot read alias production"):
            registry.version_by_alias(settings, registry.PRODUCTION)
        with pytest.raises(registry.RegistryError, match="cannot list versions"):
            registry.list_versions(settings)
        # promote must not go ahead believing there was no production version to remember
        with pytest.raises(registry.RegistryError, match="cannot read version 1"):
            registry.promote(settings, "1", registry.PRODUCTION)
    finally:
        mlflow.set_registry_uri(None)


# ------------------------------------------------------------------------- promotion history and compare-and-set
def bare_versions(settings, count: int) -> list[str]:
    """`count` registered versions with no artifacts behind them: the registry's bookkeeping is all that is tested."""
    mlflow_client = registry.client(settings)
    mlflow_client.create_registered_model(settings.model_name)
    return [str(mlflow_client.create_model_version(settings.model_name, source=str(settings.home / f"v{n}")).version)
            for n in range(1, count + 1)]


def state(settings) -> tuple[str | None, dict[str, str]]:
    """(production, {version: the version it replaced}) as the registry holds them."""
    return (registry.version_by_alias(settings, registry.PRODUCTION),
            {v.version: v.tags[registry.PREVIOUS_TAG] for v in registry.list_versions(settings)
             if registry.PREVIOUS_TAG in v.tags})


def test_promotions_and_rollbacks_keep_the_history_and_aliases_right(tmp_path):
    settings = make_settings(tmp_path / "home")
    bare_versions(settings, 4)
    with pytest.raises(registry.RegistryError, match="no production version to roll back"):
        registry.rollback(settings)
    assert registry.promote(settings, "1", registry.PRODUCTION) is None
    assert state(settings) == ("1", {})
    with pytest.raises(registry.RegistryError, match="version 1 has no earlier production version"):
        registry.rollback(settings)  # the first production: nothing to roll back to, nothing moved
    assert state(settings) == ("1", {})
    assert registry.promote(settings, "2", registry.PRODUCTION) == "1"
    assert registry.promote(settings, "3", registry.PRODUCTION) == "2"
    assert state(settings) == ("3", {"2": "1", "3": "2"})
    assert registry.rollback(settings) == ("3", "2")
    assert state(settings) == ("2", {"2": "1", "3": "2"})
    assert registry.rollback(settings) == ("2", "1")
    assert state(settings) == ("1", {"2": "1", "3": "2"})
    tags = {v.version: v.tags for v in registry.list_versions(settings)}
    assert "rolled_back_at" in tags["3"] and "rolled_back_at" in tags["2"] and "rolled_back_at" not in tags["1"]
    with pytest.raises(registry.RegistryError, match="version 1 has no earlier production version"):
        registry.rollback(settings)
    # a promotion after the rollbacks replaces what production is now (1), not what it was before them (3)
    assert registry.promote(settings, "4", registry.PRODUCTION) == "1"
    assert state(settings) == ("4", {"2": "1", "3": "2", "4": "1"})
    assert registry.rollback(settings) == ("4", "1")
    assert state(settings)[0] == "1"
    # staging is an alias of its own: none of this moved it
    registry.promote(settings, "3", registry.STAGING)
    assert {v.version: v.aliases for v in registry.list_versions(settings)} == {
        "4": [], "3": ["staging"], "2": [], "1": ["production"]}


def test_promote_with_expected_current_is_a_compare_and_set(tmp_path):
    settings = make_settings(tmp_path / "home")
    bare_versions(settings, 3)
    assert registry.promote(settings, "1", registry.PRODUCTION, expected_current=None) is None  # none yet, as seen
    with pytest.raises(registry.AliasChanged) as changed:
        registry.promote(settings, "2", registry.PRODUCTION, expected_current=None)
    assert (changed.value.alias, changed.value.expected, changed.value.actual) == ("production", None, "1")
    assert isinstance(changed.value, registry.RegistryError)
    assert registry.promote(settings, "2", registry.PRODUCTION, expected_current="1") == "1"
    assert state(settings) == ("2", {"2": "1"})
    with pytest.raises(registry.AliasChanged, match="production is version 2 now, not 1"):
        registry.promote(settings, "3", registry.PRODUCTION, expected_current=1)
    tags = {v.version: v.tags for v in registry.list_versions(settings)}["3"]
    assert registry.PREVIOUS_TAG not in tags and "production_since" not in tags  # nothing of it left behind
    assert state(settings) == ("2", {"2": "1"})


def test_a_rollback_while_the_promotion_writes_its_tags_stands(tmp_path, monkeypatch):
    """The alias moves between the compare and the set (here: while the candidate's tags are written). MLflow has
    no atomic compare-and-set, so the check is a read as the last call before the set: it sees the rollback, and
    the candidate's tags go back to what they were."""
    from mlflow import MlflowClient

    settings = make_settings(tmp_path / "home")
    bare_versions(settings, 3)
    registry.promote(settings, "1", registry.PRODUCTION)
    registry.promote(settings, "2", registry.PRODUCTION)
    registry.tag_version(settings, "3", {registry.PREVIOUS_TAG: "1"})  # from an earlier promotion of version 3
    real_set_tag = MlflowClient.set_model_version_tag
    rolled_back = []

    def set_tag_then_roll_back(self, name, version, key, value):
        real_set_tag(self, name, version, key, value)
        if version == "3" and not rolled_back:
            rolled_back.append(registry.rollback(settings))  # someone else, at this moment

    monkeypatch.setattr(MlflowClient, "set_model_version_tag", set_tag_then_roll_back)
    with pytest.raises(registry.AliasChanged, match="production is version 1 now, not 2"):
        registry.promote(settings, "3", registry.PRODUCTION, expected_current="2")
    monkeypatch.undo()
    assert rolled_back == [("2", "1")]
    assert state(settings) == ("1", {"2": "1", "3": "1"})  # the rollback stands; version 3's tag as it was
    assert "production_since" not in {v.version: v.tags for v in registry.list_versions(settings)}["3"]


def test_a_rollback_from_a_version_no_longer_in_production_moves_nothing(tmp_path):
    """A person asked to roll back version 2; meanwhile a retraining promoted 3. Rolling 3 back to 2 (or 2 to 1)
    is not what they asked for: compare-and-set on the version they saw, nothing moves."""
    settings = make_settings(tmp_path / "home")
    bare_versions(settings, 3)
    for version in ("1", "2"):
        registry.promote(settings, version, registry.PRODUCTION)
    registry.promote(settings, "3", registry.PRODUCTION, expected_current="2")  # the retraining, after they looked
    with pytest.raises(registry.AliasChanged, match="production is version 3 now, not 2"):
        registry.rollback(settings, expected_current="2")
    assert state(settings) == ("3", {"2": "1", "3": "2"})
    assert registry.rollback(settings, expected_current="3") == ("3", "2")  # what they see now: it rolls back
