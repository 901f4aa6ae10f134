"""The serving gateway as a real `coinyear serve` process on loopback: wire formats, the databricks-sdk client,
auth, bad input, feedback, ops endpoints, the Delta inference log, hot swap under load, and kill -9."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import requests
from PIL import Image

from tests.conftest import coin_image, make_settings

REPO = Path(__file__).resolve().parents[2]
COINYEAR = str(Path(sys.executable).with_name("coinyear"))
TOKENS = ("token-alpha", "token-beta")
AUTH = {"Authorization": f"Bearer {TOKENS[0]}"}
MAX_BODY = 1_000_000
FRONT, BACK = "front_image_base64", "back_image_base64"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def coin_row(seed: int) -> dict:
    return {FRONT: b64(coin_image(seed)), BACK: b64(coin_image(seed + 1000))}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`coinyear serve` in a subprocess, on a free loopback port, with its own COINYEAR_HOME."""

    def __init__(self, home: Path, **env):
        self.home, self.port = home, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "COINYEAR_HOME": str(home), "COINYEAR_API_TOKENS": ",".join(TOKENS),
                    "COINYEAR_ALIAS_POLL_SECONDS": "0.5", "COINYEAR_LOG_FLUSH_SECONDS": "0.3",
                    "COINYEAR_MAX_BODY_BYTES": str(MAX_BODY), "COINYEAR_NUM_THREADS": "2",
                    **{key: str(value) for key, value in env.items()}}
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "COINYEAR_TRACKING_URI", "COINYEAR_LAKE_URI"):
            self.env.pop(key, None)
        self.process: subprocess.Popen | None = None
        self.log_path = home / f"serve-{self.port}.log"
        self.tmp = home / f"tmp-{self.port}"  # the server's own TMPDIR: what it leaves there can be checked
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.env["TMPDIR"] = str(self.tmp)

    def start(self, timeout: float = 90) -> Server:
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - the server writes to it until stop() closes it
        self.process = subprocess.Popen([COINYEAR, "serve", "--port", str(self.port)], env=self.env, cwd=REPO,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"server exited: {self.log_path.read_text()[-3000:]}"
            try:
                if requests.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"server not ready in {timeout}s: {self.log_path.read_text()[-3000:]}")

    def post(self, body=None, path: str = "/serving-endpoints/coinyear/invocations", headers=None, **kwargs):
        return requests.post(self.url + path, json=body, headers={**AUTH, **(headers or {})}, timeout=60, **kwargs)

    def get(self, path: str):
        """GET as the operator, with a token (/version shows its error texts only to a caller with one)."""
        return requests.get(self.url + path, headers=AUTH, timeout=10)

    def wait_logged(self, timeout: float = 30) -> None:
        """Until every spooled row is committed to Delta."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lake = self.get("/version").json()["lake"]
            if all(table is None or table["backlog"] == 0 for table in lake.values()):
                return
            time.sleep(0.2)
        raise AssertionError(f"inference log backlog not committed: {lake}")

    def kill(self, sig=signal.SIGTERM) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def copy_home(trained, target: Path) -> Path:
    """A private copy of the trained fixture's registry (tests here move aliases and add versions)."""
    settings, _ = trained
    shutil.copytree(settings.home_dir, target, ignore=shutil.ignore_patterns("lake", "spool", "cache", "*.log"))
    return target


def register_variant(home: Path, year_center: float, broken: bool = False) -> str:
    """Log + register one more (untrained) version; `broken` gives it a checkpoint that cannot load."""
    import mlflow

    from coinyear.config import ensure_experiment
    from coinyear.model import ModelConfig, build_model, save_checkpoint
    from coinyear.pyfunc import log_model

    settings = make_settings(home)
    experiment = ensure_experiment(settings)
    checkpoint = home / f"variant-{year_center}.pt"
    if broken:
        checkpoint.write_bytes(b"this is not a torch checkpoint")
    else:
        config = ModelConfig(backbone="mobilenet_v3_small", image_size=64, proj_dim=32, pretrained=False)
        save_checkpoint(build_model(config, year_center=year_center, year_scale=1.0), checkpoint)
    example = pd.DataFrame([coin_row(7)])
    with mlflow.start_run(experiment_id=experiment):
        info = log_model(checkpoint, example, registered_model_name=settings.model_name)
    return str(info.registered_model_version)


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    home = copy_home(trained, tmp_path_factory.mktemp("serve") / "home")
    running = Server(home).start()
    yield running
    running.kill()


def lake_rows(home: Path, table: str = "inference_log"):
    from coinyear.lake.delta import DeltaLake

    return DeltaLake(str(home / "lake")).read(table)


# ------------------------------------------------------------------------------------------------ formats
def test_three_input_formats_give_the_same_predictions(server):
    rows = [coin_row(1), coin_row(2)]
    bodies = {
        "inputs records": {"inputs": rows},
        "inputs columns": {"inputs": {FRONT: [r[FRONT] for r in rows], BACK: [r[BACK] for r in rows]}},
        "dataframe_records": {"dataframe_records": rows},
        "dataframe_split": {"dataframe_split": {"columns": [FRONT, BACK], "data": [[r[FRONT], r[BACK]] for r in rows]},
                            "params": {"batch_size": 2}},
    }
    answers = {}
    for name, body in bodies.items():
        for path in ("/serving-endpoints/coinyear/invocations", "/invocations"):
            response = server.post(body, path)
            assert response.status_code == 200, (name, response.text)
            assert response.headers["served-model-name"] == "coinyear"
            assert response.headers["served-model-version"] == "1"
            assert response.headers["x-request-id"]
            answers[(name, path)] = response.json()["predictions"]
    first = next(iter(answers.values()))
    assert len(first) == 2 and all(isinstance(year, float) for year in first)
    for key, predictions in answers.items():
        assert predictions == pytest.approx(first, abs=1e-3), key
    # input order is kept: the rows reversed give the predictions reversed
    reversed_answer = server.post({"inputs": rows[::-1]}).json()["predictions"]
    assert reversed_answer == pytest.approx(first[::-1], abs=1e-3)


def test_predictions_match_the_registered_pyfunc(server, trained):
    """The gateway and `mlflow.pyfunc` (what `mlflow models serve` runs) answer the same for the same photos."""
    import mlflow

    settings, _ = trained
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(settings.mlflow_registry_uri)
    rows = [coin_row(11), coin_row(12), coin_row(13)]
    expected = mlflow.pyfunc.load_model(f"models:/{settings.model_name}@production").predict(pd.DataFrame(rows))
    assert server.post({"inputs": rows}).json()["predictions"] == pytest.approx(list(expected), abs=1e-3)


def test_databricks_sdk_client_works_unchanged(server):
    from databricks.sdk import WorkspaceClient

    client = WorkspaceClient(host=server.url, token=TOKENS[1])
    answer = client.serving_endpoints.query("coinyear", inputs=[coin_row(3)])
    direct = server.post({"inputs": [coin_row(3)]}).json()["predictions"]
    assert answer.predictions == pytest.approx(direct, abs=1e-3)
    assert answer.served_model_name == "coinyear"
    records = client.serving_endpoints.query("coinyear", dataframe_records=[coin_row(3), coin_row(4)])
    assert len(records.predictions) == 2


def test_interval_param_gives_a_range_around_the_same_year(server):
    plain = server.post({"inputs": [coin_row(6)]}).json()["predictions"][0]
    response = server.post({"inputs": [coin_row(6)], "params": {"interval": 0.9}})
    assert response.status_code == 200, response.text
    answer = response.json()["predictions"][0]
    assert set(answer) == {"year", "low", "high", "out_of_distribution"}
    assert answer["year"] == pytest.approx(plain, abs=1e-3)
    assert answer["low"] <= answer["year"] <= answer["high"]


# --------------------------------------------------------------------------------------------------- auth
def test_auth_requires_a_configured_bearer_token(server):
    body = {"inputs": [coin_row(5)]}
    url = server.url + "/invocations"
    missing = requests.post(url, json=body, timeout=30)
    assert missing.status_code == 401 and missing.json()["error_code"] == "UNAUTHENTICATED"
    wrong = requests.post(url, json=body, headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 403 and wrong.json()["error_code"] == "PERMISSION_DENIED"
    basic = requests.post(url, json=body, headers={"Authorization": f"Basic {TOKENS[0]}"}, timeout=30)
    assert basic.status_code == 401
    for token in TOKENS:
        assert requests.post(url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30).ok
    feedback = requests.post(server.url + "/feedback", json={"request_id": "x", "year": 5}, timeout=30)
    assert feedback.status_code == 401
    assert TOKENS[0] not in server.log_path.read_text()


# ---------------------------------------------------------------------------------------------- bad input
def _truncated_jpeg() -> str:
    data = coin_image(9, size=(200, 200))
    return b64(data[: len(data) // 2])


def _bomb_png() -> str:
    buffer = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(buffer, "PNG")  # 144 Mpx in a few kB
    return b64(buffer.getvalue())


GOOD = coin_row(0)
BAD_INPUTS = [
    # (case, body: dict | bytes, path, expected status, expected error_code)
    ("not json", b"{not json", None, 400, "BAD_REQUEST"),
    ("not utf-8", b"\xff\xfe\x00{", None, 400, "BAD_REQUEST"),
    ("json list", [GOOD], None, 400, "BAD_REQUEST"),
    ("no format key", {"rows": [GOOD]}, None, 400, "BAD_REQUEST"),
    ("two format keys", {"inputs": [GOOD], "dataframe_records": [GOOD]}, None, 400, "BAD_REQUEST"),
    ("inputs a string", {"inputs": "coin"}, None, 400, "BAD_REQUEST"),
    ("record not an object", {"inputs": [[1, 2]]}, None, 400, "BAD_REQUEST"),
    ("split without data", {"dataframe_split": {"columns": [FRONT, BACK]}}, None, 400, "BAD_REQUEST"),
    ("split row too short", {"dataframe_split": {"columns": [FRONT, BACK], "data": [[GOOD[FRONT]]]}}, None, 400,
     "BAD_REQUEST"),
    ("missing back", {"inputs": [{FRONT: GOOD[FRONT]}]}, None, 400, "INVALID_PARAMETER_VALUE"),
    ("split missing column", {"dataframe_split": {"columns": [FRONT], "data": [[GOOD[FRONT]]]}}, None, 400,
     "INVALID_PARAMETER_VALUE"),
    ("no rows", {"inputs": []}, None, 400, "INVALID_PARAMETER_VALUE"),
    ("too many rows", {"inputs": [{FRONT: "x", BACK: "y"}] * 65}, None, 400, "INVALID_PARAMETER_VALUE"),
    ("number instead of photo", {"inputs": [{FRONT: 42, BACK: GOOD[BACK]}]}, None, 400, "INVALID_PARAMETER_VALUE"),
    ("not base64", {"inputs": [{FRONT: "%%%not base64%%%", BACK: GOOD[BACK]}]}, None, 400,
     "INVALID_PARAMETER_VALUE"),
    ("not an image", {"inputs": [{FRONT: b64(b"hello, I am text"), BACK: GOOD[BACK]}]}, None, 400,
     "INVALID_PARAMETER_VALUE"),
    ("truncated jpeg", {"inputs": [{FRONT: GOOD[FRONT], BACK: _truncated_jpeg()}]}, None, 400,
     "INVALID_PARAMETER_VALUE"),
    ("decompression bomb", {"inputs": [{FRONT: _bomb_png(), BACK: GOOD[BACK]}]}, None, 400,
     "INVALID_PARAMETER_VALUE"),
    ("second row bad", {"inputs": [GOOD, {FRONT: "bad!", BACK: GOOD[BACK]}]}, None, 400, "INVALID_PARAMETER_VALUE"),
    ("params not an object", {"inputs": [GOOD], "params": [1]}, None, 400, "INVALID_PARAMETER_VALUE"),
    ("bad batch_size", {"inputs": [GOOD], "params": {"batch_size": -3}}, None, 400, "INVALID_PARAMETER_VALUE"),
    ("interval out of range", {"inputs": [GOOD], "params": {"interval": 1.5}}, None, 400, "INVALID_PARAMETER_VALUE"),
    ("client id not a string", {"inputs": [GOOD], "client_request_id": 7}, None, 400, "INVALID_PARAMETER_VALUE"),
    ("body over the limit", {"inputs": [{FRONT: "A" * (MAX_BODY + 10), BACK: "B"}]}, None, 413,
     "RESOURCE_LIMIT_EXCEEDED"),
    ("unknown endpoint", {"inputs": [GOOD]}, "/serving-endpoints/other/invocations", 404, "ENDPOINT_NOT_FOUND"),
    ("unknown path", {"inputs": [GOOD]}, "/serving-endpoints/coinyear/nothing", 404, "NOT_FOUND"),
]


def test_bad_input_gets_a_json_4xx_and_the_server_stays_healthy(server):
    seen = {}
    for case, body, path, _status, _error_code in BAD_INPUTS:
        kwargs = {"data": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) \
            else {"body": body}
        response = server.post(path=path or "/serving-endpoints/coinyear/invocations", **kwargs)
        answer = response.json()
        seen[case] = (response.status_code, answer.get("error_code"))
        assert answer.get("message"), case
        assert server.get("/health").status_code == 200, f"server unhealthy after {case!r}"
    expected = {case: (status, code) for case, _, _, status, code in BAD_INPUTS}
    assert seen == expected
    # a GET on the scoring route is a JSON 405, and a good request still works after all of that
    assert requests.get(server.url + "/invocations", timeout=10).json()["error_code"] == "BAD_REQUEST"
    assert server.post({"inputs": [GOOD]}).status_code == 200


def test_failed_requests_are_logged_without_unreadable_photos(server):
    good_front = coin_image(21)
    response = server.post({"inputs": [{FRONT: b64(good_front), BACK: b64(b"not a photo")}],
                            "client_request_id": "bad-photo-case"})
    assert response.status_code == 400
    server.wait_logged()
    rows = lake_rows(server.home)
    row = rows[rows["request_id"] == response.headers["x-request-id"]].iloc[0]
    assert row["status_code"] == 400 and row["error_code"] == "INVALID_PARAMETER_VALUE"
    assert row["client_request_id"] == "bad-photo-case"
    assert bytes(row["front_image"]) == good_front and row["back_image"] is None
    assert row["back_image_bytes"] == len(b"not a photo") and pd.isna(row["prediction"])


# ------------------------------------------------------------------------------------------ log, feedback
def test_every_answered_row_is_in_the_inference_log(server):
    sent = [coin_row(30), coin_row(31), coin_row(32)]
    single = server.post({"inputs": sent[:1], "client_request_id": "client-1"})
    multi = server.post({"dataframe_records": sent})
    assert single.ok and multi.ok
    server.wait_logged()
    rows = lake_rows(server.home).set_index("request_id")
    one = rows.loc[single.headers["x-request-id"]]
    assert one["client_request_id"] == "client-1" and one["status_code"] == 200
    assert one["model_name"] == "coinyear" and one["model_version"] == "1"
    assert one["prediction"] == pytest.approx(single.json()["predictions"][0])
    assert bytes(one["front_image"]) == base64.b64decode(sent[0][FRONT])
    assert one["front_image_bytes"] == len(base64.b64decode(sent[0][FRONT]))
    assert one["execution_time_ms"] > 0 and str(one["date"]) == str(one["timestamp"].date())
    base = multi.headers["x-request-id"]
    for index, year in enumerate(multi.json()["predictions"]):
        row = rows.loc[f"{base}-{index}"]
        assert row["row_index"] == index and row["http_request_id"] == base
        assert row["prediction"] == pytest.approx(year)
        assert bytes(row["back_image"]) == base64.b64decode(sent[index][BACK])


def test_feedback_is_recorded_against_a_logged_request(server):
    answer = server.post({"inputs": [coin_row(40), coin_row(41)]})
    second_row = f"{answer.headers['x-request-id']}-1"
    ok = server.post({"request_id": second_row, "year_from": -27, "year_to": 14, "source": "test"}, "/feedback")
    assert ok.status_code == 200, ok.text
    actor = f"token:{hashlib.sha256(TOKENS[0].encode()).hexdigest()[:8]}"  # who sent it, never the token
    assert ok.json() == {"request_id": second_row, "year_from": -27, "year_to": 14, "recorded": True, "actor": actor}
    single = server.post({"inputs": [coin_row(42)]}).headers["x-request-id"]
    assert server.post({"request_id": single, "year": 117}, "/feedback").status_code == 200
    cases = [
        ({"request_id": "no-such-request", "year": 100}, 404, "RESOURCE_DOES_NOT_EXIST"),
        ({"request_id": single, "year": 0}, 400, "INVALID_PARAMETER_VALUE"),
        ({"request_id": single, "year_from": 50, "year_to": 10}, 400, "INVALID_PARAMETER_VALUE"),
        ({"request_id": single, "year": 3000}, 400, "INVALID_PARAMETER_VALUE"),
        ({"request_id": single, "year": -5000}, 400, "INVALID_PARAMETER_VALUE"),
        ({"request_id": single, "year_from": 10}, 400, "INVALID_PARAMETER_VALUE"),
        ({"request_id": single, "year": "ninety"}, 400, "INVALID_PARAMETER_VALUE"),
        ({"request_id": single, "year": 12.5}, 400, "INVALID_PARAMETER_VALUE"),
        ({"year": 12}, 400, "INVALID_PARAMETER_VALUE"),
    ]
    for body, status, code in cases:
        response = server.post(body, "/feedback")
        assert (response.status_code, response.json()["error_code"]) == (status, code), body
    server.wait_logged()
    feedback = lake_rows(server.home, "feedback").set_index("request_id")
    assert (feedback.loc[second_row, "year_from"], feedback.loc[second_row, "year_to"]) == (-27, 14)
    assert feedback.loc[second_row, "source"] == "test"
    assert (feedback.loc[single, "year_from"], feedback.loc[single, "year_to"]) == (117, 117)
    assert len(feedback) == 2 and set(feedback["actor"]) == {actor}


def test_ops_endpoints(server):
    assert server.get("/health").json() == {"status": "ok"}
    assert server.get("/ready").json()["model_version"] == "1"
    version = server.get("/version").json()
    assert (version["model_name"], version["model_version"], version["alias"]) == ("coinyear", "1", "production")
    assert version["loaded_at"] and version["last_error"] is None
    metrics = server.get("/metrics").text
    for series in ("coinyear_requests_total{", "coinyear_request_latency_seconds_bucket",
                   "coinyear_batch_rows_bucket", "coinyear_model_version 1.0", "coinyear_inference_log_backlog"):
        assert series in metrics, series
    assert 'status="400"' in metrics and 'status="200"' in metrics
    assert server.get("/docs").status_code == 200
    assert "/serving-endpoints/{name}/invocations" in server.get("/openapi.json").json()["paths"]


def test_concurrent_requests_are_batched_into_one_forward_pass(server):
    def batches() -> tuple[float, float]:
        lines = [line for line in server.get("/metrics").text.splitlines() if line.startswith("coinyear_batch_rows_")]
        value = {line.split()[0]: float(line.split()[1]) for line in lines}
        return value["coinyear_batch_rows_count"], value["coinyear_batch_rows_sum"]

    before = batches()
    results = []
    # every other client asks for an interval (as the UI always does): those go through the batcher too
    bodies = [{"inputs": [coin_row(i)], **({"params": {"interval": 0.8}} if i % 2 else {})} for i in range(24)]
    threads = [threading.Thread(target=lambda body=body: results.append(server.post(body).status_code))
               for body in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = batches()
    assert results == [200] * 24
    forward_passes, rows = after[0] - before[0], after[1] - before[1]
    assert rows == 24
    assert forward_passes < 24, "no two concurrent requests shared a forward pass"


# ----------------------------------------------------------------------------------------------- hot swap
def test_hot_swap_under_steady_traffic_fails_no_request(server):
    statuses, versions, stop = [], [], threading.Event()

    def client():
        while not stop.is_set():
            try:
                response = server.post({"inputs": [coin_row(50)]})
                statuses.append(response.status_code)
                versions.append(response.headers.get("served-model-version"))
            except requests.RequestException as error:
                statuses.append(repr(error))

    clients = [threading.Thread(target=client) for _ in range(2)]
    for thread in clients:
        thread.start()
    try:
        time.sleep(1)
        from coinyear import registry

        settings = make_settings(server.home)
        new_version = register_variant(server.home, year_center=1500.0)
        registry.promote(settings, new_version, registry.PRODUCTION)
        deadline = time.monotonic() + 60
        while new_version not in versions[-3:] and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)
        # a version that cannot load is reported and not swapped in; the good one keeps serving
        broken = register_variant(server.home, year_center=0.0, broken=True)
        registry.promote(settings, broken, registry.PRODUCTION)
        deadline = time.monotonic() + 60
        while broken not in server.get("/version").json()["rejected_versions"] and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    assert len(statuses) > 20
    assert set(statuses) == {200}, [s for s in statuses if s != 200][:5]
    first_new = versions.index(new_version)
    # a request that started on version 1 finishes on it; with two scoring passes at once (COINYEAR_BATCH_WORKERS)
    # it may answer just after the other client's first new answer: at most one such straggler per other client
    after = versions[first_new:]
    assert set(versions[:first_new]) == {"1"} and set(after) <= {"1", new_version}
    assert after.count("1") <= len(clients) - 1, after[:5]
    status = server.get("/version").json()
    assert status["model_version"] == new_version and broken in status["rejected_versions"]
    assert status["alias_version"] == broken and "not swapped in" in status["last_error"]
    new_answer = server.post({"inputs": [coin_row(50)]})
    assert new_answer.headers["served-model-version"] == new_version
    assert "coinyear_model_load_failures_total 1.0" in server.get("/metrics").text
    # only the served version's download is kept: the replaced one and the broken one are deleted, and nothing
    # is left in the temporary folder (MLflow's default download place)
    downloads = [folder.name for folder in (server.home / "serving" / str(server.process.pid)).iterdir()]
    assert len(downloads) == 1 and downloads[0].startswith(f"v{new_version}-"), downloads
    assert not [path for path in server.tmp.iterdir() if path.is_dir()], list(server.tmp.iterdir())


# ------------------------------------------------------------------------------------------------ kill -9
def test_kill9_loses_no_answered_request(trained, tmp_path):
    home = copy_home(trained, tmp_path / "home")
    first = Server(home, COINYEAR_LOG_FLUSH_SECONDS=0.5).start()
    answered, stop = [], threading.Event()

    def client(seed: int):
        while not stop.is_set():
            try:
                response = first.post({"inputs": [coin_row(seed)] * (1 + seed % 2)})
            except requests.RequestException:
                return  # the server died under this request: it was never answered
            if response.status_code == 200:
                base, count = response.headers["x-request-id"], len(response.json()["predictions"])
                answered.extend([base] if count == 1 else [f"{base}-{i}" for i in range(count)])

    clients = [threading.Thread(target=client, args=(seed,)) for seed in range(4)]
    for thread in clients:
        thread.start()
    time.sleep(3)
    first.kill(signal.SIGKILL)
    stop.set()
    for thread in clients:
        thread.join()
    assert len(answered) > 10
    from coinyear.lake.segments import read_segment

    spooled = {record["request_id"] for path in (home / "spool" / "inference_log").glob("*.seg")
               for record in read_segment(path)}
    # answered in the last moments before the kill: in the spool, not yet in Delta, so the restart must replay them
    assert spooled & set(answered), "kill -9 left no answered row waiting in the spool: the replay is not exercised"

    second = Server(home).start()
    try:
        second.wait_logged()
        logged = lake_rows(home)["request_id"]
        assert set(answered) <= set(logged), f"{len(set(answered) - set(logged))} answered rows lost"
        assert not logged.duplicated().any(), "replay committed some rows twice"
    finally:
        second.kill()
