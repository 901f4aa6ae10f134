"""The retraining job when the model registry fails under it: a real MLflow tracking + registry server
(`mlflow server`, SQLite store, proxied artifacts) behind a local HTTP proxy that makes chosen calls fail (500)
or hang past the client's timeout without reaching the server.

Whatever fails — reading `production`, training, moving the alias after a promote decision — the run is recorded
as `failed` with the reason, `production` does not move, the feedback is not consumed, and the rows the failed run
appended to `training_data` do not count; once the registry recovers, a re-run decides on the same feedback.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pandas as pd
import pytest
import requests

from coinyear import registry
from coinyear.jobs import ingest, retrain, scheduler
from coinyear.jobs.retrain import FAILED, PROMOTED, SKIPPED, run_retrain
from coinyear.lake import open_lake
from coinyear.lake.tables import FEEDBACK, INFERENCE_LOG, MODEL_DECISIONS, SCHEMAS, TRAINING_DATA, Lake
from tests.conftest import OCRE, make_settings

pytestmark = pytest.mark.slow

BASE_LIMIT = 40
ALIAS_PATH = "/api/2.0/mlflow/registered-models/alias"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FaultyProxy(BaseHTTPRequestHandler):
    """Forwards every call to the MLflow server, except the one `faults` names: {"get_production" | "set_production":
    "error" | "hang"}. A failed call never reaches the server, so the registry really stays as it was."""

    upstream = ""
    faults: ClassVar[dict[str, str]] = {}
    protocol_version = "HTTP/1.1"

    def fault_of(self, body: bytes) -> str | None:
        url = urlsplit(self.path)
        if not url.path.endswith(ALIAS_PATH):
            return None
        if self.command == "GET" and parse_qs(url.query).get("alias") == ["production"]:
            return self.faults.get("get_production")
        if self.command == "POST" and json.loads(body or b"{}").get("alias") == "production":
            return self.faults.get("set_production")
        return None

    def body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():  # requests uploads empty files so
            data = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                data += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return data
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def forward(self):
        body = self.body()
        fault = self.fault_of(body)
        if fault == "hang":
            time.sleep(8)  # past the client's MLFLOW_HTTP_REQUEST_TIMEOUT
        if fault:
            data = json.dumps({"error_code": "INTERNAL_ERROR", "message": "registry overloaded"}).encode()
            self.send_response(500)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("host", "content-length", "connection", "transfer-encoding")}
        answer = requests.request(self.command, self.upstream + self.path, data=body, headers=headers, timeout=120)
        self.send_response(answer.status_code)
        for key, value in answer.headers.items():
            if key.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(answer.content)))
        self.end_headers()
        self.wfile.write(answer.content)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward

    def log_message(self, *args):
        pass


@pytest.fixture
def faulty_registry(tmp_path, monkeypatch):
    """(proxy URL, server URL, faults dict): an `mlflow server` on SQLite behind `FaultyProxy`."""
    import mlflow

    port = free_port()
    store = tmp_path / "server"
    store.mkdir()
    with open(store / "server.log", "wb") as server_log:
        server = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
             "--artifacts-destination", str(store / "artifacts")],
            stdout=subprocess.DEVNULL, stderr=server_log)
    FaultyProxy.upstream, FaultyProxy.faults = f"http://127.0.0.1:{port}", {}
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), FaultyProxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        deadline = time.monotonic() + 180  # a busy 2-core machine: the server imports and migrates its store
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                    break
            except requests.RequestException:  # not listening yet, or too busy starting to answer
                pass
            assert server.poll() is None and time.monotonic() < deadline, (store / "server.log").read_text()[-3000:]
            time.sleep(0.3)
        # no retries with back-off (a failure must show at once), a short timeout for the hanging call
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        yield f"http://127.0.0.1:{proxy.server_port}", FaultyProxy.upstream, FaultyProxy.faults
    finally:
        proxy.shutdown()
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


class Millennium:
    """A production model that dates every coin AD 1000: valid, and certainly beaten by a trained candidate."""

    @staticmethod
    def log(settings) -> str:
        import mlflow

        class Constant(mlflow.pyfunc.PythonModel):
            def predict(self, context, model_input, params=None):
                return np.full(len(model_input), 1000.0)

        from coinyear.config import ensure_experiment

        with mlflow.start_run(experiment_id=ensure_experiment(settings)):
            info = mlflow.pyfunc.log_model(name="model", python_model=Constant(),
                                           registered_model_name=settings.model_name)
        return str(info.registered_model_version)


def feedback_for(settings, count: int) -> tuple[list[dict], list[dict]]:
    """Logged requests for `count` OCRE coins outside the base set and an expert's catalogue years for each."""
    from coinyear.data import read_manifest

    base = set(read_manifest(OCRE, limit=BASE_LIMIT, seed=settings.retrain_holdout_seed,
                             check_images=False).rows["coin_id"])
    manifest = pd.read_csv(OCRE / "manifest.csv").dropna(subset=["obverse", "reverse"])
    coins = manifest[~manifest["coin_id"].isin(base)].sample(count, random_state=11)
    logs, feedback = [], []
    for coin in coins.itertuples():
        now = datetime.now(UTC)
        request_id = uuid.uuid4().hex
        logs.append({"request_id": request_id, "timestamp": now, "date": now.date(), "status_code": 200,
                     "model_name": "coinyear", "model_version": "1", "prediction": 1000.0,
                     "front_image": (OCRE / coin.obverse).read_bytes(),
                     "back_image": (OCRE / coin.reverse).read_bytes()})
        feedback.append({"request_id": request_id, "year_from": int(coin.year_from), "year_to": int(coin.year_to),
                         "timestamp": now, "source": "test", "actor": "test-expert"})
    return logs, feedback


def pending(lake: Lake) -> int:
    """Feedback rows no decision has consumed yet."""
    return len(ingest.read_new_feedback(lake, retrain.consumed_keys(retrain.retrain_decisions(lake)))[1])


def counted_training_rows(lake: Lake) -> int:
    return len(ingest.current_rows(lake.read(TRAINING_DATA), retrain.decided_runs(retrain.retrain_decisions(lake))))


def test_registry_failures_never_move_production_nor_consume_feedback(tmp_path, faulty_registry):
    url, upstream, faults = faulty_registry
    settings = make_settings(
        tmp_path / "home", backbone="mobilenet_v3_small", image_size=32, proj_dim=16, epochs=1, batch_size=16,
        seed=1, tta=False, retrain_base_limit=BASE_LIMIT, retrain_decade_min_coins=5,
        retrain_latency_budget_ms=60_000,
    ).model_copy(update={"tracking_uri": url, "registry_uri": url})
    direct = settings.model_copy(update={"tracking_uri": upstream, "registry_uri": upstream})  # what is true
    lake = open_lake(settings)
    v1 = Millennium.log(settings)
    registry.promote(settings, v1, registry.PRODUCTION)
    logs, feedback = feedback_for(settings, 8)
    lake.append(INFERENCE_LOG, [{k: row.get(k) for k in SCHEMAS[INFERENCE_LOG].names} for row in logs])
    lake.append(FEEDBACK, [{k: row.get(k) for k in SCHEMAS[FEEDBACK].names} for row in feedback])

    def unchanged(result, step: str, recorded_production: str | None) -> None:
        print(result.report())
        assert result.decision == FAILED and result.reason.startswith(f"{step} failed"), result.reason
        assert "production unchanged" in result.reason
        assert registry.version_by_alias(direct, registry.PRODUCTION) == v1
        assert pending(lake) == 8 and counted_training_rows(lake) == 0
        last = lake.read(MODEL_DECISIONS).sort_values("decided_at").iloc[-1]
        assert (last["decision"], last["reason"], last["production_after"]) == (FAILED, result.reason,
                                                                                recorded_production)
        assert last["consumed_feedback"] is None

    # (a) the registry answers 500, then hangs, when the job reads production: failed before anything is built
    faults["get_production"] = "error"
    unchanged(run_retrain(settings), "read production", None)  # the job could not know production
    assert "cannot read alias production" in lake.read(MODEL_DECISIONS)["reason"].iloc[0]
    faults["get_production"] = "hang"
    started = time.monotonic()
    unchanged(run_retrain(settings), "read production", None)
    assert time.monotonic() - started < 30
    faults.clear()
    assert not lake.exists(TRAINING_DATA)

    # (b) the candidate beats production, but moving the alias fails: the promotion did not happen
    faults["set_production"] = "error"
    failed = run_retrain(settings)
    unchanged(failed, "decide", v1)
    assert failed.candidate_version and failed.candidate_version != v1
    assert "cannot move production" in failed.reason and failed.candidate_metrics  # it was judged, then stopped
    tags = {v.version: v.tags for v in registry.list_versions(direct)}[failed.candidate_version]
    assert tags["decision"] == FAILED
    assert lake.count(TRAINING_DATA) > 0  # appended, but not counted: the run has no decision
    faults.clear()

    # the registry is back: the re-run decides on the same feedback and promotes a fresh candidate
    recovered = run_retrain(settings)
    print(recovered.report())
    assert recovered.decision == PROMOTED and recovered.new_feedback_rows == 8, recovered.reason
    assert recovered.production_before == v1
    assert registry.version_by_alias(settings, registry.PRODUCTION) == recovered.candidate_version
    assert recovered.candidate_version not in (v1, failed.candidate_version)
    assert pending(lake) == 0 and counted_training_rows(lake) == recovered.ingested_rows
    assert run_retrain(settings).decision == SKIPPED  # consumed exactly once
    decisions = lake.read(MODEL_DECISIONS).sort_values("decided_at")
    assert list(decisions["decision"]) == [FAILED, FAILED, FAILED, PROMOTED]


def test_a_failure_in_training_leaves_the_feedback_for_the_next_run(tmp_path, monkeypatch, capsys):
    """Before: an exception while training became a REJECTED decision that consumed the batch, and the next run
    said "no new feedback"."""
    # a recipe that cannot train: a fold ensemble without folds (each setting alone is valid, so the settings
    # are read; the recipe refuses the pair)
    settings = make_settings(tmp_path / "home", ensemble=True, retrain_base_limit=10)
    lake = open_lake(settings)
    logs, feedback = feedback_for(settings, 3)
    lake.append(INFERENCE_LOG, [{k: row.get(k) for k in SCHEMAS[INFERENCE_LOG].names} for row in logs])
    lake.append(FEEDBACK, [{k: row.get(k) for k in SCHEMAS[FEEDBACK].names} for row in feedback])

    result = run_retrain(settings)
    assert result.decision == FAILED and result.reason.startswith("train failed: ValueError: invalid training recipe")
    assert lake.count(TRAINING_DATA) == result.ingested_rows > 0 and counted_training_rows(lake) == 0
    assert pending(lake) == 3 and registry.version_by_alias(settings, registry.PRODUCTION) is None
    # the next run sees the same feedback again (and the base data: the failed run's rows do not count)
    preview = run_retrain(settings, dry_run=True)
    assert preview.new_feedback_rows == 3 and preview.ingested_rows == result.ingested_rows

    # the command reports the failure and exits non-zero, so a scheduler or a Databricks job run fails too
    from coinyear import cli
    from coinyear.config import get_settings

    for name, value in {"COINYEAR_HOME": settings.home, "COINYEAR_DATA_DIR": OCRE, "COINYEAR_ENSEMBLE": True,
                        "COINYEAR_RETRAIN_BASE_LIMIT": 10}.items():
        monkeypatch.setenv(name, str(value))
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "COINYEAR_TRACKING_URI", "COINYEAR_LAKE_URI"):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    try:
        assert cli.main(["retrain"]) == 1
    finally:
        get_settings.cache_clear()
    assert "decision: FAILED - train failed" in capsys.readouterr().out
    history = scheduler.RunHistory()  # and the scheduler counts it as failed, keeping its schedule
    scheduler.guarded(scheduler.retrain_job(settings), history)()
    assert history.failed == 1 and history.outcomes[0].startswith("failed: RuntimeError: train failed")
    assert pending(lake) == 3


# ------------------------------------------------------------------- after the gate: the promotion and its record
def register_constant(settings, year: float) -> str:
    """A registered pyfunc that dates every coin `year`: loads and scores like a model, in a second."""
    import mlflow

    from coinyear.config import ensure_experiment

    class Constant(mlflow.pyfunc.PythonModel):
        def __init__(self, year: float):
            self.year = year

        def predict(self, context, model_input, params=None):
            return np.full(len(model_input), self.year)

    with mlflow.start_run(experiment_id=ensure_experiment(settings)):
        info = mlflow.pyfunc.log_model(name="model", python_model=Constant(year),
                                       registered_model_name=settings.model_name)
    return str(info.registered_model_version)


@pytest.fixture
def quick_retrain(tmp_path, monkeypatch):
    """(settings, lake): a registry with v1 (dates every coin AD 1000) in production and 8 feedback rows; training
    registers a model dating every coin AD 100 instead of training one, so the real gate promotes it in seconds."""
    import coinyear.train

    settings = make_settings(tmp_path / "home", retrain_base_limit=BASE_LIMIT, retrain_decade_min_coins=5,
                             retrain_latency_budget_ms=60_000)

    def train_a_constant(settings, config, manifest=None, register=True, run_name=None, tags=None, **_):
        return coinyear.train.RunOutcome(run_id="", version=register_constant(settings, 100.0), metrics={})

    monkeypatch.setattr(coinyear.train, "run_training", train_a_constant)
    lake = open_lake(settings)
    registry.promote(settings, register_constant(settings, 1000.0), registry.PRODUCTION)
    logs, feedback = feedback_for(settings, 8)
    lake.append(INFERENCE_LOG, [{k: row.get(k) for k in SCHEMAS[INFERENCE_LOG].names} for row in logs])
    lake.append(FEEDBACK, [{k: row.get(k) for k in SCHEMAS[FEEDBACK].names} for row in feedback])
    yield settings, lake
    import mlflow

    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


@pytest.mark.parametrize("failing", ["tagging", "read-back", "record"])
def test_a_failure_after_the_promotion_is_recorded_as_the_promotion_it_was(quick_retrain, monkeypatch, failing):
    """Before: a failure once `production` had moved (reading the alias back, tagging the version, writing the
    decision row) was recorded as `failed`, "production unchanged", tagged the new live version `decision=failed`
    and left the feedback new, so the next run retrained on it again."""
    settings, lake = quick_retrain
    moved: list[str] = []
    armed = [True]  # the faults, until the run is over
    real_promote, real_alias, real_tag = registry.promote, registry.version_by_alias, registry.tag_version
    real_record = retrain.Retraining.record

    def promote(settings, version, to, *args, **kwargs):
        previous = real_promote(settings, version, to, *args, **kwargs)
        if to == registry.PRODUCTION:
            moved.append(str(version))
        return previous

    def version_by_alias(settings, alias):
        if failing == "read-back" and moved and armed:
            raise registry.RegistryError("cannot read alias production of coinyear: registry overloaded")
        return real_alias(settings, alias)

    def tag_version(settings, version, tags):
        if failing == "tagging" and moved and armed:
            raise registry.RegistryError("registry overloaded")
        real_tag(settings, version, tags)

    def record(self, result, feedback_version, consumed):
        if failing == "record" and moved and armed and not getattr(self, "_failed_once", False):
            self._failed_once = True
            raise OSError("lake briefly unwritable")
        real_record(self, result, feedback_version, consumed)

    monkeypatch.setattr(registry, "promote", promote)
    monkeypatch.setattr(registry, "version_by_alias", version_by_alias)
    monkeypatch.setattr(registry, "tag_version", tag_version)
    monkeypatch.setattr(retrain.Retraining, "record", record)

    result = run_retrain(settings)
    print(result.report())
    armed.clear()
    candidate = result.candidate_version
    assert moved == [candidate] and registry.version_by_alias(settings, registry.PRODUCTION) == candidate
    assert result.decision == PROMOTED, result.reason
    assert "production unchanged" not in result.reason and "after the promotion" in result.reason, result.reason
    assert result.production_after == candidate
    last = lake.read(MODEL_DECISIONS).sort_values("decided_at").iloc[-1]
    assert (last["decision"], last["production_before"], last["production_after"]) == (PROMOTED, "1", candidate)
    assert last["reason"] == result.reason
    assert len(json.loads(last["consumed_feedback"])) == 8 and pending(lake) == 0
    assert counted_training_rows(lake) == result.ingested_rows > 0
    tags = {v.version: v.tags for v in registry.list_versions(settings)}[candidate]
    assert tags.get("decision") != FAILED
    if failing != "tagging":
        assert tags["decision"] == PROMOTED
    assert run_retrain(settings).decision == SKIPPED  # the feedback was used: consumed, not retrained on again


def test_a_rollback_during_the_run_is_not_undone_by_the_promotion(quick_retrain, monkeypatch):
    """Before: the candidate was judged against the production of the run's start, but `promote` set the alias
    whatever it pointed to by then, silently undoing a rollback made (in the UI) while the job trained."""
    settings, lake = quick_retrain
    v2 = register_constant(settings, 900.0)
    registry.promote(settings, v2, registry.PRODUCTION)  # replaces v1
    real_validate = retrain.validate

    def validate_then_roll_back(settings, candidate, production, eval_rows):
        verdict = real_validate(settings, candidate, production, eval_rows)
        assert registry.rollback(settings) == (v2, "1")  # someone rolls back while the gate runs
        return verdict

    monkeypatch.setattr(retrain, "validate", validate_then_roll_back)
    result = run_retrain(settings)
    print(result.report())
    monkeypatch.setattr(retrain, "validate", real_validate)
    assert registry.version_by_alias(settings, registry.PRODUCTION) == "1"  # the rollback stands
    assert result.decision == retrain.SUPERSEDED, result.reason
    assert (result.production_before, result.production_after) == (v2, "1")
    assert f"v{v2}" in result.reason and "v1" in result.reason
    last = lake.read(MODEL_DECISIONS).sort_values("decided_at").iloc[-1]
    assert (last["decision"], last["production_before"], last["production_after"]) == (retrain.SUPERSEDED, v2, "1")
    assert last["consumed_feedback"] is None
    assert pending(lake) == 8 and counted_training_rows(lake) == 0  # not used for a live model: still new
    tags = {v.version: v.tags for v in registry.list_versions(settings)}[result.candidate_version]
    assert tags["decision"] == retrain.SUPERSEDED and registry.PREVIOUS_TAG not in tags

    # the next run judges a fresh candidate against the production the user chose, and promotes it
    again = run_retrain(settings)
    assert again.decision == PROMOTED and again.production_before == "1" and again.new_feedback_rows == 8
    assert registry.version_by_alias(settings, registry.PRODUCTION) == again.candidate_version
    assert pending(lake) == 0


def test_a_tracking_failure_closing_the_run_does_not_undo_the_decision(quick_retrain, monkeypatch):
    """Before: the retrain run's closing calls (its decision tags, its end) were not guarded: a tracking server
    failing there raised out of `run_retrain` after production had moved and the decision was recorded, so the
    job exited as failed."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    settings, lake = quick_retrain

    real_set_terminated = MlflowClient.set_terminated

    def unavailable_for_the_retrain_run(self, run_id, *args, **kwargs):
        if self.get_run(run_id).data.tags.get("coinyear.job") == "retrain":  # the steps' runs end as usual
            raise MlflowException("tracking server unavailable")
        return real_set_terminated(self, run_id, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "set_terminated", unavailable_for_the_retrain_run)
    result = run_retrain(settings)
    assert result.decision == PROMOTED, result.reason
    assert registry.version_by_alias(settings, registry.PRODUCTION) == result.candidate_version
    assert lake.read(MODEL_DECISIONS)["decision"].tolist() == [PROMOTED]
