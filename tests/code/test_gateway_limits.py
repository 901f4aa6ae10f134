"""The gateway under load and abuse, in process: feedback lookups of unknown ids stay off the scoring threads
and are cheap to repeat (the real-process fault tests are in tests/faults/test_gateway_load_faults.py)."""

from __future__ import annotations

import threading

from tests.code.test_serve_pieces import HEADERS, PATH, app_client, coin_body  # noqa: F401 - app_client: fixture


def test_an_unknown_feedback_id_is_looked_up_once_on_the_feedback_thread(app_client):  # noqa: F811
    gateway = app_client.gateway
    scans: list[str] = []
    real_read = gateway.backend.lake.read

    def counted_read(*args, **kwargs):
        scans.append(threading.current_thread().name)
        return real_read(*args, **kwargs)

    gateway.backend.lake.read = counted_read
    bogus = {"request_id": "no-such-request", "year": 100}
    answers = [app_client.post("/feedback", json=bogus, headers=HEADERS) for _ in range(5)]
    assert [answer.status_code for answer in answers] == [404] * 5
    assert answers[-1].json()["error_code"] == "RESOURCE_DOES_NOT_EXIST"
    assert 1 <= len(scans) <= 2, scans  # one lookup (a second read after the spool's backlog is committed)
    assert all(name.startswith("feedback") for name in scans), scans
    answered = app_client.post(PATH, json=coin_body(1), headers=HEADERS).headers["x-request-id"]
    feedback = app_client.post("/feedback", json={"request_id": answered, "year": 100}, headers=HEADERS)
    assert feedback.status_code == 200 and len(scans) <= 2  # an id this gateway answered needs no lookup


def test_only_an_answered_request_takes_feedback(app_client):  # noqa: F811
    """A 504 (its pass ran past the deadline) or a 400 was never dated: it is logged as what it answered, with no
    prediction, and feedback for it is refused, from memory and from the Delta table alike."""
    import time

    import pandas as pd

    gateway = app_client.gateway
    app_client.scorer.delay = 1.5  # the deadline is 1 s
    timed_out = app_client.post(PATH, json=coin_body(1), headers=HEADERS)
    app_client.scorer.delay = 0.0
    assert timed_out.status_code == 504, timed_out.text
    refused = app_client.post(PATH, json={"inputs": [{"front_image_base64": "!!", "back_image_base64": "!!"}]},
                              headers=HEADERS)
    assert refused.status_code == 400
    time.sleep(1.0)  # the abandoned pass ends
    answered = app_client.post(PATH, json=coin_body(2), headers=HEADERS)
    assert answered.status_code == 200
    ids = {response.headers["x-request-id"]: response.status_code for response in (timed_out, refused, answered)}
    assert gateway.backend.log_writer.flush(10)
    logged = gateway.backend.lake.read("inference_log").set_index("request_id")
    assert {request_id: logged.loc[request_id, "status_code"] for request_id in ids} == ids
    assert pd.isna(logged.loc[timed_out.headers["x-request-id"], "prediction"])
    for from_memory in (True, False):
        if not from_memory:
            gateway.backend.ids.recent_ids.clear()
            gateway.backend.ids.unknown_ids.clear()
        statuses = {request_id: app_client.post("/feedback", json={"request_id": request_id, "year": 100},
                                                headers=HEADERS).status_code for request_id in ids}
        assert statuses == {request_id: 200 if status == 200 else 404 for request_id, status in ids.items()}, \
            from_memory


def test_a_body_counts_as_its_declared_length_at_most_the_largest_body():
    from coinyear.config import Settings
    from coinyear.serve.admission import Admission

    admission = Admission(Settings(max_body_bytes=100, max_inflight_requests=2, max_inflight_bytes=250))
    assert admission.cost([(b"Content-Length", b"50")]) == 50
    assert admission.cost([(b"content-length", b"5000")]) == 100  # read_body answers 413 past 100: no more held
    assert admission.cost([(b"transfer-encoding", b"chunked")]) == 100
    assert admission.refusal(100) is None
    admission.requests, admission.bytes = 1, 200
    assert admission.refusal(50) is None
    refused = admission.refusal(51)
    assert refused is not None and refused.status == 429 and refused.error_code == "REQUEST_LIMIT_EXCEEDED"
    assert refused.headers == {"Retry-After": "1"} and "COINYEAR_MAX_INFLIGHT_BYTES" in refused.message
    admission.requests, admission.bytes = 2, 0
    assert "COINYEAR_MAX_INFLIGHT_REQUESTS" in admission.refusal(1).message


def test_the_inflight_bytes_must_hold_one_largest_body():
    import pydantic
    import pytest

    from coinyear.config import Settings

    with pytest.raises(pydantic.ValidationError, match="max_inflight_bytes"):
        Settings(max_body_bytes=1000, max_inflight_bytes=999)
    with pytest.raises(pydantic.ValidationError):
        Settings(max_inflight_requests=0)


def test_past_the_inflight_bound_a_post_gets_429_at_once_and_ops_still_answer(app_client):  # noqa: F811
    import time
    from concurrent.futures import ThreadPoolExecutor

    gateway = app_client.gateway
    gateway.admission.max_requests = 1
    app_client.scorer.delay = 0.6
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(app_client.post, PATH, json=coin_body(1), headers=HEADERS)
        deadline = time.monotonic() + 5
        while gateway.admission.requests == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        refused = app_client.post(PATH, json=coin_body(2), headers=HEADERS)
        took = time.monotonic() - started
        feedback = app_client.post("/feedback", json={"request_id": "x", "year": 1}, headers=HEADERS)
        ready = app_client.get("/ready")
        metrics = app_client.get("/metrics").text
        assert slow.result().status_code == 200
    assert refused.status_code == 429 and took < 0.5, (refused.text, took)
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error_code"] == "REQUEST_LIMIT_EXCEEDED" and refused.json()["message"]
    assert feedback.status_code == 429 and ready.status_code == 200
    assert "coinyear_inflight_requests 1.0" in metrics
    assert 'coinyear_requests_total{error_code="REQUEST_LIMIT_EXCEEDED",status="429"} 1.0' in metrics
    assert gateway.admission.requests == 0 and gateway.admission.bytes == 0


def test_refusals_are_logged_and_counted(app_client):  # noqa: F811
    """401, 403, 404 and 415 are answers like any other: in the inference log (no body was read: no photos) and
    in coinyear_requests, with the request id header that finds the row."""
    import json

    gateway = app_client.gateway
    body = json.dumps(coin_body(1)).encode()
    refused = {
        "UNAUTHENTICATED": app_client.post(PATH, content=body),
        "PERMISSION_DENIED": app_client.post(PATH, content=body, headers={"Authorization": "Bearer wrong"}),
        "ENDPOINT_NOT_FOUND": app_client.post("/serving-endpoints/elsewhere/invocations", content=body,
                                              headers=HEADERS),
        "BAD_REQUEST": app_client.post(PATH, content=body, headers={**HEADERS, "Content-Type": "text/plain"}),
    }
    statuses = {code: response.status_code for code, response in refused.items()}
    assert statuses == {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "ENDPOINT_NOT_FOUND": 404,
                        "BAD_REQUEST": 415}
    assert refused["UNAUTHENTICATED"].headers["www-authenticate"] == "Bearer"
    assert gateway.backend.log_writer.flush(10)
    logged = gateway.backend.lake.read("inference_log")
    assert sorted(zip(logged["status_code"], logged["error_code"])) == sorted(
        (status, code) for code, status in statuses.items())
    assert logged["front_image"].isna().all() and logged["prediction"].isna().all()
    by_id = logged.set_index("http_request_id")
    for code, response in refused.items():
        assert by_id.loc[response.headers["x-request-id"], "error_code"] == code
    metrics = app_client.get("/metrics").text
    for code, status in statuses.items():
        assert f'coinyear_requests_total{{error_code="{code}",status="{status}"}} 1.0' in metrics, code


def test_execution_time_ms_excludes_the_spool_fsync_and_the_latency_metric_includes_it(app_client):  # noqa: F811
    """A row cannot hold the time of its own fsync: `execution_time_ms` runs from arrival until the answer was
    ready and its row handed to the spool. What the client waited, fsync included, is in
    coinyear_request_latency_seconds."""
    import re
    import threading
    import time
    from concurrent.futures import Future

    writer = app_client.gateway.backend.log_writer
    real_submit = writer.submit

    def slow_fsync(rows):  # the rows are spooled for real, then the fsync takes 0.5 s more
        done: Future = Future()
        spooled = real_submit(rows)
        threading.Timer(0.5, lambda: done.set_result(spooled.result())).start()
        return done

    writer.submit = slow_fsync
    try:
        started = time.monotonic()
        response = app_client.post(PATH, json=coin_body(1), headers=HEADERS)
        waited = time.monotonic() - started
    finally:
        writer.submit = real_submit
    assert response.status_code == 200 and waited >= 0.5
    assert writer.flush(10)
    (row,) = app_client.gateway.backend.lake.read("inference_log").to_dict("records")
    assert row["execution_time_ms"] < 500, row["execution_time_ms"]
    metrics = app_client.get("/metrics").text
    (observed,) = re.findall(r"^coinyear_request_latency_seconds_sum (\S+)$", metrics, flags=re.M)
    assert 0.5 <= float(observed) <= waited, (observed, waited)
