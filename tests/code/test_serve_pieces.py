"""Gateway pieces without a server: when auth may be off, token checks, and the wire formats' edge cases."""

from __future__ import annotations

import base64
import contextlib
import io
import json as json_module

import hypothesis
import hypothesis.strategies as st
import pytest
from PIL import Image

from coinyear.config import Settings
from coinyear.lake.tables import FEEDBACK
from coinyear.serve.auth import BearerAuth, is_loopback
from coinyear.serve.errors import ApiError
from coinyear.serve.wire import InvalidRequest, parse_body, prepare_rows
from tests.conftest import coin_image


class FakeRequest:
    def __init__(self, authorization: str | None = None):
        self.headers = {"authorization": authorization} if authorization is not None else {}


def test_auth_can_be_off_only_on_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.org")
    BearerAuth(Settings(api_tokens=[]), "127.0.0.1").check(FakeRequest())  # local-dev mode: open
    for settings in (Settings(api_tokens=[]), Settings(api_tokens=["t"], auth_disabled=True)):
        with pytest.raises(RuntimeError, match="refusing"):
            BearerAuth(settings, "0.0.0.0")


def test_any_configured_token_is_accepted_and_nothing_else():
    auth = BearerAuth(Settings(api_tokens="old-token, new-token"), "0.0.0.0")
    for token in ("old-token", "new-token"):
        auth.check(FakeRequest(f"Bearer {token}"))
        auth.check(FakeRequest(f"bearer {token}"))
    for header, status in ((None, 401), ("", 401), ("Bearer ", 401), ("Basic old-token", 401),
                           ("Bearer old-toke", 403), ("Bearer old-token-x", 403), ("Bearer new-token old", 403)):
        with pytest.raises(ApiError) as error:
            auth.check(FakeRequest(header))
        assert error.value.status == status, header


def test_behind_the_apps_proxy_the_caller_is_the_forwarded_identity_and_tokens_are_not_read():
    """A Databricks App: the proxy checked the token and kept it; who it forwards is the actor. Nothing else is
    accepted, a bearer token least of all (COINYEAR_API_TOKENS is not read)."""
    auth = BearerAuth(Settings(apps_proxy=True, api_tokens="ada:t"), "0.0.0.0")  # on 0.0.0.0 without tokens
    forwarded = FakeRequest()
    forwarded.headers = {"x-forwarded-email": "ada@example.com", "x-forwarded-user": "123@456"}
    assert auth.check(forwarded) == "ada@example.com"
    forwarded.headers = {"x-forwarded-user": "123@456"}  # a service principal: no e-mail
    assert auth.check(forwarded) == "123@456"
    for request in (FakeRequest(), FakeRequest("Bearer t")):
        with pytest.raises(ApiError) as error:
            auth.check(request)
        assert error.value.status == 401


def test_under_the_apps_proxy_every_route_is_also_under_api():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from coinyear.serve.auth import AppsProxyRoutes

    app = FastAPI()

    @app.get("/version")
    def version():
        return {"ok": True}

    client = TestClient(AppsProxyRoutes(app))
    assert client.get("/api/version").json() == {"ok": True} and client.get("/version").status_code == 200
    assert client.get("/apiversion").status_code == 404 and client.get("/api/nothing").status_code == 404


ROW = {"front_image_base64": "f", "back_image_base64": "b"}


@pytest.mark.parametrize("body, rows", [
    ({"inputs": [ROW, ROW]}, 2),
    ({"instances": [ROW]}, 1),
    ({"inputs": {"front_image_base64": ["f", "f"], "back_image_base64": ["b", "b"]}}, 2),
    ({"inputs": {"front_image_base64": "f", "back_image_base64": "b"}}, 1),  # one row as scalars
    ({"dataframe_split": {"index": [0], "columns": ["back_image_base64", "front_image_base64"], "data": [["b", "f"]]}},
     1),
    ({"dataframe_records": [ROW], "params": {"batch_size": 8, "other": 1}, "client_request_id": "c-1"}, 1),
])
def test_every_format_gives_front_back_rows(body, rows):
    import json

    parsed = parse_body(json.dumps(body).encode(), max_rows=64)
    assert parsed.rows == [("f", "b")] * rows


def test_rows_are_decoded_as_in_training_and_bad_sides_are_dropped_from_the_log():
    good = coin_image(1)
    buffer = io.BytesIO()
    Image.new("L", (40, 40)).save(buffer, "PNG")
    rows = prepare_rows([(base64.b64encode(good).decode(), "data:image/png;base64," +
                          base64.b64encode(buffer.getvalue()).decode()),
                         ("!!", base64.b64encode(b"plain text").decode())], image_size=32, grayscale=True)
    assert rows[0].error is None and rows[0].arrays[0].shape == (1, 32, 32) and rows[0].front == good
    assert rows[1].error.startswith("row 1: front_image_base64 is not valid base64")
    assert rows[1].front is None and rows[1].back is None and rows[1].back_size == len(b"plain text")


# ------------------------------------------------------------------------------- the app, in this process
# The gateway app on an in-process ASGI client with a stand-in scorer: the real routes, auth, parsing, photo
# decoding, batcher and inference log; only the network is swapped for a few array operations, so deadlines,
# dispatcher failures and batching can be forced in milliseconds. tests/system/test_serve.py runs the same app
# as `coinyear serve` with a trained model.
TOKEN = "piece-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
PATH = "/serving-endpoints/coinyear/invocations"


class StandInScorer:
    """What the gateway needs of a CoinYearModel: `score_tensors`, `answers`, `size`, `grayscale`, `quality`."""

    size, grayscale = 32, False

    def __init__(self, quality: bool = True):
        self.quality = object() if quality else None
        self.batches: list[int] = []
        self.delay = 0.0
        self.fail_next: Exception | None = None

    def score_tensors(self, fronts, backs, with_features=False, batch_size=32):
        import time

        import numpy as np

        self.batches.append(len(fronts))
        time.sleep(self.delay)
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        year = (fronts.mean(dim=(1, 2, 3)) * 1000 - backs.mean(dim=(1, 2, 3)) * 100).numpy().astype(float)
        scored = {"year": year, "spread": np.zeros(len(year))}
        if with_features:
            scored["features"] = np.zeros((len(year), 4))
        return scored

    def answers(self, scored, level, neighbours=0, portraits=0):
        import pandas as pd

        year = scored["year"]
        return pd.DataFrame({"year": year, "low": year - 100 * level, "high": year + 100 * level,
                             "out_of_distribution": year > 1e9})


@contextlib.contextmanager
def gateway_client(home, **overrides):
    """The gateway in this process (a TestClient) serving a StandInScorer as version 7."""
    from fastapi.testclient import TestClient

    from coinyear.serve.app import create_app
    from coinyear.serve.lifecycle import ServedModel
    from tests.conftest import make_settings

    settings = make_settings(home, **{"api_tokens": [TOKEN], "request_timeout_seconds": 1.0,
                                      "log_flush_seconds": 0.2, "batch_max_wait_ms": 50, **overrides})
    app = create_app(settings, "127.0.0.1")
    gateway = app.state.gateway
    gateway.backend.models.start = lambda: None  # no registry here: the stand-in is put in place below
    scorer = StandInScorer()
    with TestClient(app, raise_server_exceptions=False) as client:
        gateway.backend.models.current = ServedModel("coinyear", "7", "models:/coinyear/7", scorer)
        client.gateway, client.scorer = gateway, scorer
        yield client


@pytest.fixture
def app_client(tmp_path):
    with gateway_client(tmp_path / "home") as client:
        yield client


def coin_body(*seeds: int, **extra) -> dict:
    rows = [{"front_image_base64": base64.b64encode(coin_image(s)).decode(),
             "back_image_base64": base64.b64encode(coin_image(s + 500)).decode()} for s in seeds]
    return {"inputs": rows, **extra}


def test_plain_and_interval_requests_share_a_batch_each_at_its_own_level(app_client):
    from concurrent.futures import ThreadPoolExecutor

    alone = {seed: app_client.post(PATH, json=coin_body(seed), headers=HEADERS).json()["predictions"][0]
             for seed in (1, 2, 3)}
    app_client.scorer.batches.clear()
    app_client.scorer.delay = 0.3  # the first batch runs while the others queue behind it
    bodies = [coin_body(9), coin_body(1), coin_body(2, params={"interval": 0.5}),
              coin_body(3, params={"interval": 0.9})]
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(app_client.post, PATH, json=bodies[0], headers=HEADERS)
        import time

        time.sleep(0.1)
        rest = [pool.submit(app_client.post, PATH, json=body, headers=HEADERS) for body in bodies[1:]]
        answers = [future.result().json()["predictions"][0] for future in [first, *rest]]
    assert app_client.scorer.batches[0] == 1 and sum(app_client.scorer.batches) == 4
    assert max(app_client.scorer.batches[1:]) >= 2, f"queued requests were not batched: {app_client.scorer.batches}"
    assert answers[1] == pytest.approx(alone[1])
    for answer, seed, level in ((answers[2], 2, 0.5), (answers[3], 3, 0.9)):
        assert answer["year"] == pytest.approx(alone[seed])
        assert (answer["low"], answer["high"]) == pytest.approx((alone[seed] - 100 * level, alone[seed] + 100 * level))
        assert answer["out_of_distribution"] is False


def test_interval_on_a_version_without_calibration_is_a_400(app_client):
    app_client.scorer.quality = None
    response = app_client.post(PATH, json=coin_body(1, params={"interval": 0.9}), headers=HEADERS)
    assert response.status_code == 400 and response.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "interval" in response.json()["message"]


def test_a_failing_batch_fails_its_requests_and_the_dispatcher_goes_on(app_client):
    app_client.scorer.fail_next = RuntimeError("boom in the forward pass")
    failed = app_client.post(PATH, json=coin_body(1), headers=HEADERS)
    assert failed.status_code == 500 and failed.json()["error_code"] == "INTERNAL_ERROR"
    assert app_client.post(PATH, json=coin_body(1), headers=HEADERS).status_code == 200
    assert app_client.get("/ready").status_code == 200
    assert app_client.get("/version").json()["dispatcher"] == {"alive": True, "failure": None, "failed_batches": 1}


def test_version_shows_error_texts_only_to_a_caller_with_a_token(app_client):
    """An unauthenticated probe learns that there is an error, not what it says (hosts, paths, versions)."""
    from coinyear.serve.app import HIDDEN

    models = app_client.gateway.backend.models
    models.last_error = "cannot read alias production: sqlite:////srv/secret/mlflow.db is locked"
    models.failed["9"] = ("version 9 failed its smoke request: /srv/secret/model.pt", 0.0)
    open_view = app_client.get("/version").json()
    assert open_view["last_error"] == HIDDEN and open_view["rejected_versions"] == {"9": HIDDEN}
    assert "/srv/secret" not in json_module.dumps(open_view) and open_view["model_version"] == "7"
    assert open_view["dispatcher"]["failure"] is None  # no error: nothing hidden
    for headers in ({"Authorization": "Bearer wrong"}, {}):
        assert "/srv/secret" not in app_client.get("/version", headers=headers).text
    signed_in = app_client.get("/version", headers=HEADERS).json()
    assert signed_in["last_error"].endswith("is locked") and "smoke request" in signed_in["rejected_versions"]["9"]


def test_a_dead_dispatcher_shows_in_ready_and_requests_fail_fast(app_client):
    import time

    app_client.gateway.backend.batcher._task.cancel()
    time.sleep(0.2)
    ready = app_client.get("/ready")
    assert ready.status_code == 503 and "dispatcher" in ready.json()["message"]
    started = time.monotonic()
    response = app_client.post(PATH, json=coin_body(1), headers=HEADERS)
    assert time.monotonic() - started < 0.9  # well inside the 1 s deadline: no waiting for a batch that never comes
    assert response.status_code == 503 and response.json()["error_code"] == "TEMPORARILY_UNAVAILABLE"
    assert app_client.get("/version").json()["dispatcher"]["alive"] is False


def test_a_slow_model_gets_a_504_at_the_deadline_and_is_logged(app_client):
    import time

    app_client.scorer.delay = 2.5
    started = time.monotonic()
    response = app_client.post(PATH, json=coin_body(1), headers=HEADERS)
    took = time.monotonic() - started
    assert response.status_code == 504 and response.json()["error_code"] == "DEADLINE_EXCEEDED", response.text
    assert 0.9 <= took < 2.0, took
    app_client.scorer.delay = 0.0
    time.sleep(2.5 - took + 0.2)  # the abandoned pass still holds the one inference thread until it ends
    assert app_client.post(PATH, json=coin_body(2), headers=HEADERS).status_code == 200
    request_id = response.headers["x-request-id"]
    assert app_client.gateway.backend.log_writer.flush(10) is not False
    logged = app_client.gateway.backend.lake.read("inference_log")
    assert logged.set_index("request_id").loc[request_id, "status_code"] == 504


def test_a_request_whose_log_write_failed_takes_no_feedback(app_client):
    from concurrent.futures import Future

    def failing_submit(rows):
        future = Future()
        future.set_exception(OSError("disk full"))
        return future

    writer = app_client.gateway.backend.log_writer
    real_submit, writer.submit = writer.submit, failing_submit
    try:
        response = app_client.post(PATH, json=coin_body(1), headers=HEADERS)
    finally:
        writer.submit = real_submit
    assert response.status_code == 503 and "inference log" in response.json()["message"]
    feedback = app_client.post("/feedback", json={"request_id": response.headers["x-request-id"], "year": 100},
                               headers=HEADERS)
    assert feedback.status_code == 404 and feedback.json()["error_code"] == "RESOURCE_DOES_NOT_EXIST"
    logged = app_client.post(PATH, json=coin_body(1), headers=HEADERS)
    assert app_client.post("/feedback", json={"request_id": logged.headers["x-request-id"], "year": 100},
                           headers=HEADERS).status_code == 200


def test_feedback_storage_failures_are_json_errors(app_client):
    """Every non-200 is `{"error_code", "message"}` JSON (docs/api_schema.md), feedback that cannot be stored
    included: a 503 the client can retry, never the framework's plain-text 500."""
    import errno
    from concurrent.futures import Future

    request_id = app_client.post(PATH, json=coin_body(1), headers=HEADERS).headers["x-request-id"]
    gateway = app_client.gateway

    def post_feedback(request_id: str):
        return app_client.post("/feedback", json={"request_id": request_id, "year": 100}, headers=HEADERS)

    def full_disk(rows):
        future = Future()
        future.set_exception(OSError(errno.ENOSPC, "No space left on device"))
        return future

    def lake_down(*args, **kwargs):
        raise OSError(errno.ECONNREFUSED, "the lake's store does not answer")

    def a_bug(record):
        raise RuntimeError("a bug")

    writer, lake = gateway.backend.feedback_writer, gateway.backend.lake
    for target, name, replacement, request, status, code in (
            (writer, "submit", full_disk, request_id, 503, "TEMPORARILY_UNAVAILABLE"),  # the spool's disk is full
            (lake, "read", lake_down, "not-in-memory", 503, "TEMPORARILY_UNAVAILABLE"),  # the id cannot be checked
            (gateway.backend, "store_feedback", a_bug, request_id, 500, "INTERNAL_ERROR")):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(target, name, replacement)
            response = post_feedback(request)
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == "application/json", response.text
        assert response.json()["error_code"] == code and response.json()["message"], response.text
    assert post_feedback(request_id).status_code == 200
    writer.close(timeout=5)  # a spool that takes no more writes
    closed = post_feedback(request_id)
    assert closed.status_code == 503 and closed.json()["error_code"] == "TEMPORARILY_UNAVAILABLE", closed.text


@pytest.mark.parametrize("client_request_id, status", [
    ("catalogue-42", 200), ("0f3a" * 8, 200), ("../../photos", 400), ("a/b", 400), ("..", 400), ("", 400),
    ("the client's own", 400), ("x" * 129, 400),
])
def test_a_client_request_id_must_be_a_plain_name(app_client, client_request_id, status):
    """It names a folder in the Databricks loop's volume (photos/<id>/...): letters, digits, '.', '_', '-'."""
    response = app_client.post(PATH, json=coin_body(1, client_request_id=client_request_id), headers=HEADERS)
    assert response.status_code == status, response.text
    if status == 400:
        assert response.json()["error_code"] == "INVALID_PARAMETER_VALUE"
        assert "client_request_id" in response.json()["message"]


def test_monitoring_counts_requests_not_coins(app_client):
    """A request of several coins logs one row per coin: `coinyear monitor` counts it (its error and its latency)
    once, as the gateway's own metrics do."""
    import numpy as np

    from coinyear.jobs.monitor import compute_monitoring

    answered = [app_client.post(PATH, json=coin_body(*seeds), headers=HEADERS) for seeds in ((1, 2, 3), (4,))]
    bad = dict(coin_body(5, 6), inputs=[coin_body(5)["inputs"][0], {"front_image_base64": "!!",
                                                                      "back_image_base64": "!!"}])
    refused = app_client.post(PATH, json=bad, headers=HEADERS)
    assert [r.status_code for r in answered] == [200, 200] and refused.status_code == 400
    gateway = app_client.gateway
    assert gateway.backend.log_writer.flush(10)
    log = gateway.backend.lake.read("inference_log")
    assert len(log) == 6  # 3 + 1 + 2 coins
    latencies = log.drop_duplicates("http_request_id")["execution_time_ms"].to_numpy()
    (row,) = compute_monitoring(gateway.settings, gateway.backend.lake).to_dict("records")
    assert row["requests"] == 3 and row["errors"] == 1 and row["error_rate"] == 1 / 3
    assert row["rows"] == 6
    assert row["latency_p50_ms"] == np.quantile(latencies, 0.5)
    assert row["latency_p90_ms"] == np.quantile(latencies, 0.9)


def test_feedback_checks_the_token_before_looking_at_the_body(app_client):
    for body in ({"nonsense": True}, {"request_id": "x", "year": "ninety"}):
        anonymous = app_client.post("/feedback", json=body)
        assert anonymous.status_code == 401 and "request_id" not in anonymous.text and "year" not in anonymous.text
    raw = app_client.post("/feedback", content=b"{not json", headers={**HEADERS, "Content-Type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    openapi = app_client.get("/openapi.json").json()  # the body schema is still published
    body = openapi["paths"]["/feedback"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/FeedbackIn"}
    assert "request_id" in openapi["components"]["schemas"]["FeedbackIn"]["required"]


def post_correction(client, token: str | None, year: int = 70, **extra):
    """Score a coin, then correct it, both with `token` (none: no Authorization header)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    scored = client.post(PATH, json=coin_body(1), headers=headers)
    assert scored.status_code == 200, scored.text
    return client.post("/feedback", json={"request_id": scored.headers["x-request-id"], "year": year, **extra},
                       headers=headers)


def test_a_feedback_row_records_the_tokens_actor_and_never_the_token(tmp_path):
    """Who gave a correction is what the gateway knows of the caller: the name of a `name:token` entry of
    COINYEAR_API_TOKENS, else a short SHA-256 fingerprint of the token; never the token itself, and never what
    the body claims. Before: the feedback table had no actor (and `name:token` was taken as one whole token)."""
    import hashlib

    fingerprint = f"token:{hashlib.sha256(b'bare-secret-2').hexdigest()[:8]}"
    with gateway_client(tmp_path / "home", api_tokens="ada:ada-secret-1, bare-secret-2") as client:
        named, bare = post_correction(client, "ada-secret-1"), post_correction(client, "bare-secret-2", 71)
        assert (named.status_code, bare.status_code) == (200, 200), named.text + bare.text
        assert (named.json()["actor"], bare.json()["actor"]) == ("ada", fingerprint)
        entry = client.post("/feedback", json={"request_id": "x", "year": 70},
                            headers={"Authorization": "Bearer ada:ada-secret-1"})
        assert entry.status_code == 403  # the entry is not the token
        claimed = post_correction(client, "bare-secret-2", actor="ada")
        assert claimed.status_code == 400 and "actor" in claimed.json()["message"]
        assert client.gateway.backend.feedback_writer.flush(10)
        rows = client.gateway.backend.lake.read(FEEDBACK)
    assert dict(zip(rows["year_from"], rows["actor"], strict=True)) == {70: "ada", 71: fingerprint}
    stored = rows.astype(str).to_csv()
    assert "ada-secret-1" not in stored and "bare-secret-2" not in stored


def test_an_open_loopback_gateway_records_its_feedback_as_anonymous(tmp_path):
    with gateway_client(tmp_path / "home", api_tokens=[]) as client:
        answer = post_correction(client, None)
        assert answer.status_code == 200 and answer.json()["actor"] == "anonymous", answer.text
        assert client.gateway.backend.feedback_writer.flush(10)
        assert list(client.gateway.backend.lake.read(FEEDBACK)["actor"]) == ["anonymous"]


@pytest.mark.parametrize("content_type, status", [
    ("application/json", 200), ("application/json; charset=utf-8", 200), ("Application/JSON; charset=UTF-8", 200),
    (None, 200), ("text/plain", 415), ("application/x-www-form-urlencoded", 415), ("text/csv", 415),
    ("application/json; charset=latin-1", 415), ("application/json; format=pandas-split", 415),
])
def test_only_json_bodies_are_accepted(app_client, content_type, status):
    import json

    headers = {**HEADERS, **({"Content-Type": content_type} if content_type else {})}
    response = app_client.post(PATH, content=json.dumps(coin_body(1)).encode(), headers=headers)
    assert response.status_code == status, response.text
    if status != 200:
        assert response.json()["error_code"] == "BAD_REQUEST" and content_type in response.json()["message"]


# ------------------------------------------------------------------------- no body may produce a 5xx
def _nested(depth: int) -> bytes:
    return b'{"inputs": ' + b"[" * depth + b"]" * depth + b"}"


GOOD_ROW = {"front_image_base64": base64.b64encode(coin_image(3)).decode(),
            "back_image_base64": base64.b64encode(coin_image(4)).decode()}
NASTY_BODIES = {
    "deep nesting": _nested(100_000),
    "deep nesting in a photo": b'{"inputs": [{"front_image_base64": ' + b"[" * 50_000 + b"]" * 50_000 + b"}]}",
    "huge integer": b'{"inputs": [], "params": {"batch_size": ' + b"9" * 5000 + b"}}",
    "huge float": b'{"inputs": [{"front_image_base64": "a", "back_image_base64": "b"}], "params": {"interval": 1e999}}',
    "NaN interval": b'{"inputs": [], "params": {"interval": NaN}}',
    "NaN photo": b'{"dataframe_records": [{"front_image_base64": NaN, "back_image_base64": -Infinity}]}',
    "invalid UTF-8": b'{"inputs": [{"front_image_base64": "\xff\xfe", "back_image_base64": "\xc3\x28"}]}',
    "lone surrogate id": b'{"inputs": [{"front_image_base64": "a", "back_image_base64": "b"}], '
                         b'"client_request_id": "\\ud800"}',
    "lone surrogate photo": b'{"inputs": [{"front_image_base64": "\\udfff", "back_image_base64": "b"}]}',
    "truncated": json_module.dumps({"inputs": [GOOD_ROW]}).encode()[:-40],
    "empty": b"",
    "null": b"null",
    "split mismatched columns": json_module.dumps({"dataframe_split": {
        "columns": ["front_image_base64", "back_image_base64", "x"], "data": [[GOOD_ROW["front_image_base64"]]]}})
    .encode(),
    "split columns not strings": b'{"dataframe_split": {"columns": [[1], {"a": 2}], "data": [[1, 2]]}}',
    "split duplicated columns": json_module.dumps({"dataframe_split": {
        "columns": ["front_image_base64", "front_image_base64"], "data": [["a", "b"]]}}).encode(),
    "columns of different lengths": b'{"inputs": {"front_image_base64": ["a", "b"], "back_image_base64": ["c"]}}',
    "photo a list": b'{"inputs": [{"front_image_base64": ["x"], "back_image_base64": {"y": 1}}]}',
    "params a number": b'{"inputs": [{"front_image_base64": "a", "back_image_base64": "b"}], "params": 3}',
    "interval a string": b'{"inputs": [{"front_image_base64": "a", "back_image_base64": "b"}], '
                         b'"params": {"interval": "0.9"}}',
    "interval true": b'{"inputs": [{"front_image_base64": "a", "back_image_base64": "b"}], '
                     b'"params": {"interval": true}}',
    "data URL without data": b'{"inputs": [{"front_image_base64": "data:image/jpeg;base64,", '
                             b'"back_image_base64": "b"}]}',
    "base64 of random bytes": json_module.dumps({"inputs": [{"front_image_base64": base64.b64encode(bytes(range(256)))
                                                             .decode(), "back_image_base64": "AAAA"}]}).encode(),
    "utf-16 body": json_module.dumps({"inputs": [GOOD_ROW]}).encode("utf-16"),
}


def _assert_client_error(response, case) -> None:
    assert response.status_code < 500, (case, response.status_code, response.text[:300])
    if response.status_code != 200:
        answer = response.json()
        assert 400 <= response.status_code < 500 and answer["error_code"] and answer["message"], (case, answer)


def test_malformed_bodies_get_a_4xx_json_answer(app_client):
    for case, body in NASTY_BODIES.items():
        response = app_client.post(PATH, content=body, headers={**HEADERS, "Content-Type": "application/json"})
        _assert_client_error(response, case)
        assert response.status_code != 200, case
    assert app_client.post(PATH, json={"inputs": [GOOD_ROW]}, headers=HEADERS).status_code == 200


class StandInWorkspace:
    """The databricks backend's workspace calls, in this process: the "endpoint" answers as the local gateway's
    parser and photo decoding judge the forwarded body (a 400 in MLflow JSON, or one prediction per row)."""

    def __init__(self):
        self.invoked: list[bytes] = []

    async def open(self):
        pass

    async def close(self):
        pass

    async def endpoint(self, name):
        return {"state": {"ready": "READY"},
                "config": {"served_entities": [{"name": "e", "entity_name": "coinyear", "entity_version": "3"}]}}

    async def invoke(self, endpoint, body):
        import httpx

        self.invoked.append(body)
        try:
            rows = prepare_rows(parse_body(body, max_rows=64).rows, image_size=32, grayscale=False)
        except InvalidRequest as error:
            return httpx.Response(400, json={"error_code": error.error_code, "message": error.message})
        if any(row.error for row in rows):
            return httpx.Response(400, json={"error_code": "INVALID_PARAMETER_VALUE", "message": "a bad photo"})
        return httpx.Response(200, json={"predictions": [100.0] * len(rows)})

    async def upload(self, path, data, overwrite):
        pass


@pytest.fixture
def databricks_client(tmp_path):
    from fastapi.testclient import TestClient

    from coinyear.databricks.gateway import RemoteBackend
    from coinyear.serve.app import create_app
    from tests.conftest import make_settings

    settings = make_settings(tmp_path / "home", api_tokens=[TOKEN], serving_backend="databricks",
                             loop_volume=str(tmp_path / "volume"), request_timeout_seconds=5.0)
    app = create_app(settings, "127.0.0.1", RemoteBackend)
    app.state.gateway.backend.workspace = workspace = StandInWorkspace()
    with TestClient(app, raise_server_exceptions=False) as client:
        client.workspace = workspace
        yield client


def test_malformed_bodies_get_a_4xx_json_answer_from_the_databricks_backend(databricks_client):
    """The databricks backend reads the body only to set client_request_id; what it cannot read (nesting past
    the stack, integers over 4,300 digits) is the client's error, a 400, not forwarded."""
    for case, body in NASTY_BODIES.items():
        sent = len(databricks_client.workspace.invoked)
        response = databricks_client.post(PATH, content=body, headers={**HEADERS, "Content-Type": "application/json"})
        _assert_client_error(response, case)
        assert response.status_code != 200, case
        if case in ("deep nesting", "deep nesting in a photo", "huge integer"):
            assert response.json()["error_code"] == "BAD_REQUEST", (case, response.text)
            assert len(databricks_client.workspace.invoked) == sent, case  # refused here: nothing forwarded
    good = databricks_client.post(PATH, json={"inputs": [GOOD_ROW]}, headers=HEADERS)
    assert good.status_code == 200 and good.json() == {"predictions": [100.0]}


def test_the_databricks_backends_feedback_file_names_the_tokens_actor(databricks_client, monkeypatch):
    """The volume's feedback file carries who posted it (what `coinyear ingest-payloads` puts in `actor`)."""
    import hashlib

    files: dict[str, bytes] = {}

    async def upload(path, data, overwrite):
        files[path] = data

    monkeypatch.setattr(databricks_client.workspace, "upload", upload)
    answer = databricks_client.post("/feedback", json={"request_id": "r-1", "year": 70}, headers=HEADERS)
    assert answer.status_code == 200, answer.text
    (content,) = files.values()
    assert json_module.loads(content)["actor"] == f"token:{hashlib.sha256(TOKEN.encode()).hexdigest()[:8]}"
    assert TOKEN.encode() not in content


JSON_LEAVES = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
               | st.text(max_size=20) | st.sampled_from([GOOD_ROW["front_image_base64"], "data:image/png;base64,AA=="]))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.sampled_from(["front_image_base64", "back_image_base64", "columns",
                                                              "data", "index", "interval", "batch_size"])
                                             | st.text(max_size=8), inner, max_size=4), max_leaves=12)
BODIES = st.one_of(
    st.binary(max_size=200),
    JSON_VALUES.map(lambda value: json_module.dumps(value).encode()),
    st.fixed_dictionaries({}, optional={"inputs": JSON_VALUES, "instances": JSON_VALUES,
                                        "dataframe_records": JSON_VALUES, "dataframe_split": JSON_VALUES,
                                        "params": JSON_VALUES, "client_request_id": JSON_VALUES})
    .map(lambda value: json_module.dumps(value).encode()),
    st.tuples(st.integers(0, 400), st.binary(max_size=8)).map(
        lambda cut: json_module.dumps({"dataframe_split": {"columns": list(GOOD_ROW),
                                                           "data": [list(GOOD_ROW.values())]},
                                       "params": {"interval": 0.9}}).encode()[:cut[0]] + cut[1]),
)


@hypothesis.settings(max_examples=150, deadline=None, derandomize=True,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture,
                                            hypothesis.HealthCheck.too_slow])
@hypothesis.given(body=BODIES)
def test_generated_bodies_never_get_a_5xx(app_client, body):
    response = app_client.post(PATH, content=body, headers={**HEADERS, "Content-Type": "application/json"})
    _assert_client_error(response, body[:200])


def test_the_dispatcher_survives_a_failing_concatenation_and_metrics_callback():
    import asyncio

    import numpy as np
    import torch

    from coinyear.serve.batching import MicroBatcher

    def run(model, fronts, backs):
        return {"year": fronts.flatten(1).mean(1).numpy(), "spread": np.zeros(len(fronts))}

    def on_batch(rows):
        raise ValueError("metrics backend broke")

    async def scenario():
        batcher = MicroBatcher(run, max_size=8, max_wait_ms=50, on_batch=on_batch)
        batcher.start()
        model, ones = object(), torch.ones(1, 3, 4, 4)
        batcher.preparing = 1  # a third request "decoding": the dispatcher waits for more, so both share a batch
        mismatched = [asyncio.ensure_future(batcher.submit(model, ones, ones)),
                      asyncio.ensure_future(batcher.submit(model, torch.ones(1, 3, 5, 5), torch.ones(1, 3, 5, 5)))]
        results = await asyncio.wait_for(asyncio.gather(*mismatched, return_exceptions=True), timeout=5)
        batcher.preparing = 0
        answer = await asyncio.wait_for(batcher.submit(model, ones * 2, ones), timeout=5)
        alive, failed = batcher.alive, batcher.failed_batches
        await batcher.stop()
        return results, answer, alive, failed

    results, answer, alive, failed = asyncio.run(scenario())
    assert all(isinstance(result, RuntimeError) for result in results), results  # torch.cat: sizes differ
    assert answer["year"].tolist() == [2.0] and alive  # delivered although on_batch raised afterwards
    assert failed == 2  # the torch.cat batch and the on_batch failure, both survived


@pytest.mark.parametrize("workers, overlapped", [(1, False), (2, True)])
def test_batches_overlap_on_several_inference_threads(workers, overlapped):
    """With `workers` > 1 a second batch starts while the first is still scoring (ONNX Runtime gains nothing from
    big batches, so serial batches only queue); with 1 they run one after the other."""
    import asyncio
    import threading
    import time

    import numpy as np
    import torch

    from coinyear.serve.batching import MicroBatcher

    running, most = 0, 0
    lock = threading.Lock()

    def run(model, fronts, backs):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.3)
        with lock:
            running -= 1
        return {"year": np.ones(len(fronts)), "spread": np.zeros(len(fronts))}

    async def scenario():
        batcher = MicroBatcher(run, max_size=1, max_wait_ms=0, workers=workers)
        batcher.start()
        ones = torch.ones(1, 3, 4, 4)
        answers = await asyncio.wait_for(asyncio.gather(*[batcher.submit("m", ones, ones) for _ in range(4)]), 10)
        await batcher.stop()
        return answers

    answers = asyncio.run(scenario())
    assert [a["year"].tolist() for a in answers] == [[1.0]] * 4
    assert (most == workers) and (most > 1) == overlapped


def test_the_two_backends_implement_one_protocol_and_neither_extends_the_other():
    """Backends by composition: the routes call only the Backend protocol, which the local and the Databricks
    backend each implement in full; neither is a subclass of the other (before: the Databricks gateway overrode
    the local one method by method)."""
    import inspect

    from coinyear.databricks.gateway import RemoteBackend
    from coinyear.serve.backend import Backend
    from coinyear.serve.local import LocalBackend

    protocol = {name for name, _ in inspect.getmembers(Backend, inspect.isfunction) if not name.startswith("_")}
    assert {"score", "log", "known", "store_feedback", "ready", "version"} <= protocol
    for backend in (LocalBackend, RemoteBackend):
        missing = {name for name in protocol if not inspect.isfunction(backend.__dict__.get(name))}
        assert not missing, (backend.__name__, missing)
    assert not issubclass(RemoteBackend, LocalBackend) and not issubclass(LocalBackend, RemoteBackend)
