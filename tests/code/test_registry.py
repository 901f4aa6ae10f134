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
