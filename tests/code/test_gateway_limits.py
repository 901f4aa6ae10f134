"""The gateway under load and abuse, in process: feedback lookups of unknown ids stay off the scoring threads
and are cheap to repeat (the real-process fault tests are in tests/faults/test_gateway_load_faults.py)."""

from __future__ import annotations

import threading

from tests.code.test_serve_pieces import HEADERS, PATH, app_client, coin_body  # noqa: F401 - app_client: fixture


def test_an_unknown_feedback_id_is_looked_up_once_on_the_feedback_thread(app_client):  # noqa: F811
    gateway = app_client.gateway
    scans: list[str] = []
    real_read = gateway.lake.read

    def counted_read(*args, **kwargs):
        scans.append(threading.current_thread().name)
        return real_read(*args, **kwargs)

    gateway.lake.read = counted_read
    bogus = {"request_id": "no-such-request", "year": 100}
    answers = [app_client.post("/feedback", json=bogus, headers=HEADERS) for _ in range(5)]
    assert [answer.status_code for answer in answers] == [404] * 5
    assert answers[-1].json()["error_code"] == "RESOURCE_DOES_NOT_EXIST"
    assert 1 <= len(scans) <= 2, scans  # one lookup (a second read after the spool's backlog is committed)
    assert all(name.startswith("feedback") for name in scans), scans
    answered = app_client.post(PATH, json=coin_body(1), headers=HEADERS).headers["x-request-id"]
    feedback = app_client.post("/feedback", json={"request_id": answered, "year": 100}, headers=HEADERS)
    assert feedback.status_code == 200 and len(scans) <= 2  # an id this gateway answered needs no lookup
