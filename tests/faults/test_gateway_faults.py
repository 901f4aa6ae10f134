"""Faults injected into a real `coinyear serve` on loopback while clients keep sending requests.

- SIGKILL while a new production version is being swapped in, then a restart on the same home;
- a registry that hangs (an exclusive lock on its SQLite file) and then errors (a corrupt file) during alias polls;
- a version whose first prediction raises (the smoke request fails);
- a version that turns slow (tests/faults/fault_model.py sleeps while a flag file exists).

Each test asserts that serving went on, that no acknowledged request is lost (every 200's request id is in the
Delta inference log), that no request waited past the deadline, and that the degraded state is reported.
"""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import pandas as pd
import pytest
import requests

from tests.conftest import REPO, make_settings
from tests.system.test_serve import Server, coin_row, copy_home, lake_rows, register_variant

DEADLINE = 2.0  # COINYEAR_REQUEST_TIMEOUT_SECONDS of these servers
SLACK = 1.5  # what a loaded 2-core machine may add to a deadline answer (HTTP, logging, thread hops)


@dataclass
class Traffic:
    """Client threads posting one-coin requests until stopped; what each answer was, and how long it took."""

    server: Server
    clients: int = 2
    answers: list[tuple] = field(default_factory=list)  # (status or error, request id, model version, seconds)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Self:
        self._threads = [threading.Thread(target=self._run, args=(seed,), daemon=True) for seed in range(self.clients)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _run(self, seed: int) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                response = self.server.post({"inputs": [coin_row(seed)]})
            except requests.RequestException as error:  # the server died under this request: never answered
                self.answers.append((type(error).__name__, None, None, time.monotonic() - started))
                time.sleep(0.2)
                continue
            self.answers.append((response.status_code, response.headers.get("x-request-id"),
                                 response.headers.get("served-model-version"), time.monotonic() - started))

    @property
    def acknowledged(self) -> set[str]:
        return {request_id for status, request_id, _, _ in self.answers if status == 200}

    def statuses(self) -> set:
        return {status for status, *_ in self.answers}


def assert_all_logged(server: Server, acknowledged: set[str]) -> pd.DataFrame:
    server.wait_logged(timeout=60)
    logged = lake_rows(server.home)
    missing = acknowledged - set(logged["request_id"])
    assert not missing, f"{len(missing)} acknowledged requests are not in the inference log"
    assert not logged["request_id"].duplicated().any()
    return logged


def register_faulty(home: Path, mode: str) -> str:
    """One more version whose python model is tests/faults/fault_model.FaultyModel(mode)."""
    import mlflow

    from coinyear.config import ensure_experiment
    from coinyear.model import ModelConfig, build_model, save_checkpoint
    from coinyear.pyfunc import CHECKPOINT, SIGNATURE, package_dir, pip_requirements
    from tests.faults.fault_model import FaultyModel

    settings = make_settings(home)
    checkpoint = home / f"faulty-{mode}.pt"
    config = ModelConfig(backbone="mobilenet_v3_small", image_size=64, proj_dim=32, pretrained=False)
    save_checkpoint(build_model(config, year_center=300.0, year_scale=1.0), checkpoint)
    with mlflow.start_run(experiment_id=ensure_experiment(settings)):
        info = mlflow.pyfunc.log_model(name="model", python_model=FaultyModel(mode),
                                       artifacts={CHECKPOINT: str(checkpoint)}, code_paths=[package_dir()],
                                       signature=SIGNATURE, registered_model_name=settings.model_name,
                                       pip_requirements=pip_requirements(config.backbone))
    return str(info.registered_model_version)


def promote(home: Path, version: str) -> None:
    from coinyear import registry

    registry.promote(make_settings(home), version, registry.PRODUCTION)


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}")


def start(home: Path, **env) -> Server:
    return Server(home, PYTHONPATH=str(REPO), COINYEAR_REQUEST_TIMEOUT_SECONDS=DEADLINE,
                  COINYEAR_FAULT_SLOW_FILE=str(home / "slow-flag"), **env).start()


# --------------------------------------------------------------------------------- kill -9 during a swap
def test_sigkill_mid_swap_then_restart_loses_no_acknowledged_request(trained, tmp_path):
    home = copy_home(trained, tmp_path / "home")
    first = start(home)
    new_version = register_variant(home, year_center=1500.0)
    with Traffic(first, clients=3) as traffic:
        time.sleep(1.0)
        promote(home, new_version)
        # the watcher has seen the new alias: the version is downloading / loading / warming right now
        wait_for(lambda: first.get("/version").json()["alias_version"] == new_version, 10, "alias seen")
        killed_pid = first.process.pid
        first.kill(signal.SIGKILL)
        time.sleep(0.5)
    assert len(traffic.acknowledged) > 5
    assert (home / "serving" / str(killed_pid)).is_dir(), "the killed gateway left no download folder to clean"

    second = start(home)
    try:
        assert second.get("/version").json()["model_version"] == new_version  # came up on the moved alias
        assert not (home / "serving" / str(killed_pid)).exists(), "the dead process's download folder is left"
        after = second.post({"inputs": [coin_row(5)]})
        assert after.status_code == 200 and after.headers["served-model-version"] == new_version
        assert_all_logged(second, traffic.acknowledged | {after.headers["x-request-id"]})
    finally:
        second.kill()


# ------------------------------------------------------------- one gateway through registry and model faults
@pytest.fixture(scope="module")
def faulty(trained, tmp_path_factory):
    home = copy_home(trained, tmp_path_factory.mktemp("faults") / "home")
    versions = {"raise": register_faulty(home, "raise"), "slow": register_faulty(home, "slow")}
    promote(home, "1")
    server = start(home, COINYEAR_ALIAS_POLL_SECONDS=0.3)
    yield server, versions
    server.kill()


def test_a_hanging_then_failing_registry_keeps_serving_and_reports_a_degraded_watch(faulty):
    server, _ = faulty
    database = server.home / "mlflow.db"
    watch_states = []
    with Traffic(server) as traffic:
        lock = sqlite3.connect(database, timeout=30, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")  # every alias read now waits for the lock (a hanging registry)
        try:
            watch_states.append(wait_for(lambda: (w := server.get("/version").json()["watch"])["poll_running_seconds"]
                                         >= 1.0 and w, 15, "a poll seen hanging"))
            watch_states.append(wait_for(lambda: not (w := server.get("/version").json()["watch"])["healthy"] and w,
                                         30, "the hanging registry reported"))
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        original = database.read_bytes()
        try:
            with open(database, "r+b") as handle:  # a registry that errors: its file is no database any more
                handle.write(b"this is no longer a sqlite file!" * 4)
            failing = wait_for(lambda: (v := server.get("/version").json())["watch"]["failed_polls_in_a_row"] >= 2
                               and v, 20, "the failing registry reported")
            assert "cannot read alias" in failing["last_error"]
            assert server.get("/ready").status_code == 200  # serving goes on: readiness is about scoring
        finally:
            database.write_bytes(original)
        wait_for(lambda: server.get("/version").json()["watch"]["healthy"], 20, "the watch recovered")
    assert server.get("/version").json()["last_error"] is None
    assert traffic.statuses() == {200}, [a for a in traffic.answers if a[0] != 200][:5]
    assert {version for _, _, version, _ in traffic.answers} == {"1"}
    assert max(seconds for *_, seconds in traffic.answers) < DEADLINE + SLACK
    assert len(traffic.answers) > 10
    assert_all_logged(server, traffic.acknowledged)


def test_a_version_whose_first_prediction_raises_is_not_swapped_in(faulty):
    server, versions = faulty
    bad = versions["raise"]
    with Traffic(server) as traffic:
        time.sleep(0.5)
        promote(server.home, bad)
        status = wait_for(lambda: (v := server.get("/version").json())["rejected_versions"].get(bad) and v, 60,
                          "the raising version rejected")
        time.sleep(1.0)
    assert "injected fault" in status["rejected_versions"][bad] and status["model_version"] == "1"
    assert status["alias_version"] == bad and "not swapped in" in status["last_error"]
    assert traffic.statuses() == {200} and {version for _, _, version, _ in traffic.answers} == {"1"}
    assert "coinyear_model_load_failures_total 1.0" in server.get("/metrics").text
    assert_all_logged(server, traffic.acknowledged)


def test_a_slow_model_answers_504_at_the_deadline_never_a_hang(faulty):
    server, versions = faulty
    slow = versions["slow"]
    promote(server.home, slow)
    wait_for(lambda: server.get("/version").json()["model_version"] == slow, 60, "the slow version served")
    flag = server.home / "slow-flag"
    flag.write_text("4")
    try:
        with Traffic(server, clients=3) as traffic:
            time.sleep(2 * DEADLINE + 1)
            flag.unlink()
            time.sleep(4 + DEADLINE)  # the pass that was asleep ends; the next ones are quick again
    finally:
        flag.unlink(missing_ok=True)
    timed_out = [answer for answer in traffic.answers if answer[0] == 504]
    assert len(timed_out) >= 3, traffic.answers[:10]
    assert max(seconds for *_, seconds in traffic.answers) < DEADLINE + SLACK, "a request waited past the deadline"
    assert traffic.answers[-1][0] == 200 and len(traffic.acknowledged) >= 3
    assert traffic.statuses() <= {200, 504}
    logged = assert_all_logged(server, traffic.acknowledged).set_index("request_id")
    assert (logged.loc[[answer[1] for answer in timed_out], "status_code"] == 504).all()
    assert (logged.loc[[answer[1] for answer in timed_out], "error_code"] == "DEADLINE_EXCEEDED").all()
