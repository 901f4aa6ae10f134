"""A real `coinyear serve` under load and abuse: feedback floods, too many large requests, a decode past the deadline.

- bogus request ids posted to `/feedback` by many clients at once must not starve scoring (its own threads;
  unknown ids refused from memory or after one rate-limited lookup);
- many concurrent large requests get 429 `REQUEST_LIMIT_EXCEEDED` with `Retry-After` past the in-flight bounds,
  never a 5xx, and the process's memory stays bounded;
- a request whose photo decoding runs past the deadline answers 504, is logged as that 504, is never scored and
  takes no feedback (tests/faults/inject/sitecustomize.py slows the decoding while a flag file exists).
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO
from tests.faults.test_gateway_faults import DEADLINE, SLACK, Traffic
from tests.system.test_serve import AUTH, Server, coin_row, copy_home, lake_rows

INJECT = Path(__file__).parent / "inject"


def start(home: Path, **env) -> Server:
    """A gateway with a 2 s deadline whose photo decoding turns slow while `home/slow-decode` exists, and its
    Delta commits while `home/slow-lake` exists."""
    return Server(home, PYTHONPATH=f"{INJECT}:{REPO}", COINYEAR_REQUEST_TIMEOUT_SECONDS=DEADLINE,
                  COINYEAR_FAULT_SLOW_DECODE_FILE=str(home / "slow-decode"),
                  COINYEAR_FAULT_SLOW_LAKE_FILE=str(home / "slow-lake"), **env).start()


@pytest.fixture(scope="module")
def gateway(trained, tmp_path_factory):
    server = start(copy_home(trained, tmp_path_factory.mktemp("load") / "home"))
    yield server
    server.kill()


def post_feedback(server: Server, request_id: str) -> requests.Response:
    return requests.post(f"{server.url}/feedback", json={"request_id": request_id, "year": 100}, headers=AUTH,
                         timeout=60)


# ------------------------------------------------------------------------- item 9: feedback floods
def test_a_flood_of_bogus_feedback_ids_does_not_starve_scoring(gateway):
    for seed in range(3):  # an inference log to look unknown ids up in
        assert gateway.post({"inputs": [coin_row(seed)]}).status_code == 200
    gateway.wait_logged()
    # a slow lake (a remote store under load): the spool's backlog takes seconds to commit, which a lookup of an
    # unknown id used to wait for on the threads that decode photos
    slow_lake = gateway.home / "slow-lake"
    slow_lake.write_text("3")
    feedback: list[tuple[int, str | None]] = []  # (status, Retry-After)
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            response = post_feedback(gateway, uuid.uuid4().hex)
            feedback.append((response.status_code, response.headers.get("retry-after")))

    flooders = [threading.Thread(target=flood, daemon=True) for _ in range(8)]
    try:
        with Traffic(gateway, clients=2) as traffic:
            for thread in flooders:
                thread.start()
            time.sleep(8)
            stop.set()
        for thread in flooders:
            thread.join(timeout=60)
    finally:
        slow_lake.unlink(missing_ok=True)
    assert len(feedback) > 8, len(feedback)
    assert {status for status, _ in feedback} <= {404, 429}, sorted({status for status, _ in feedback})
    assert 404 in {status for status, _ in feedback}, "no unknown id was looked up"
    assert all(retry == "1" for status, retry in feedback if status == 429)
    assert traffic.statuses() == {200}, [a for a in traffic.answers if a[0] != 200][:5]
    assert len(traffic.answers) >= 8, traffic.answers
    slowest = max(seconds for *_, seconds in traffic.answers)
    assert slowest < DEADLINE, f"a scoring request took {slowest:.2f} s while feedback was flooded"
    known = gateway.post({"inputs": [coin_row(9)]})
    assert post_feedback(gateway, known.headers["x-request-id"]).status_code == 200  # real feedback still goes in


# ------------------------------------------------------------------ item 11: a decode past the deadline
def batched_rows(server: Server) -> float:
    """Rows that went through a forward pass so far (the batch-size histogram's sum)."""
    (value,) = re.findall(r"^coinyear_batch_rows_sum (\S+)$", server.get("/metrics").text, flags=re.M)
    return float(value)


def test_a_decode_past_the_deadline_is_a_504_never_scored_logged_as_such_and_takes_no_feedback(gateway):
    flag = gateway.home / "slow-decode"
    decoded = Path(f"{flag}.decoded")
    decoded.unlink(missing_ok=True)
    before = batched_rows(gateway)
    flag.write_text("0.7")  # 3 rows: 6 photos, 4.2 s of decoding against the 2 s deadline
    try:
        started = time.monotonic()
        response = gateway.post({"inputs": [coin_row(1), coin_row(2), coin_row(3)]})
        took = time.monotonic() - started
        time.sleep(6 * 0.7 - took + 1.0)  # past the moment the decode thread would have finished every photo
    finally:
        flag.unlink(missing_ok=True)
    assert response.status_code == 504 and response.json()["error_code"] == "DEADLINE_EXCEEDED", response.text
    assert took < DEADLINE + SLACK, took
    photos = len(decoded.read_text().splitlines())
    assert photos <= 4, f"the abandoned request's decode thread went on: {photos} of 6 photos decoded"
    request_id = response.headers["x-request-id"]
    for asked in (request_id, f"{request_id}-0"):
        refused = post_feedback(gateway, asked)
        assert refused.status_code == 404 and refused.json()["error_code"] == "RESOURCE_DOES_NOT_EXIST", asked
    assert gateway.post({"inputs": [coin_row(4)]}).status_code == 200  # a batch runs after the abandoned request
    assert batched_rows(gateway) == before + 1, "the abandoned request's rows went through a forward pass"
    gateway.wait_logged()
    logged = lake_rows(gateway.home)
    mine = logged[logged["http_request_id"] == request_id]
    assert mine["status_code"].tolist() == [504] and mine["error_code"].tolist() == ["DEADLINE_EXCEEDED"]
    assert mine["prediction"].isna().all()
    assert post_feedback(gateway, request_id).status_code == 404  # nor once the log is in Delta


# ------------------------------------------------------------------- item 10: admission control
MB = 1_000_000


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def test_many_concurrent_large_requests_get_429_with_retry_after_and_memory_stays_bounded(trained, tmp_path):
    server = start(copy_home(trained, tmp_path / "home"), COINYEAR_MAX_BODY_BYTES=4 * MB,
                   COINYEAR_MAX_INFLIGHT_REQUESTS=4, COINYEAR_MAX_INFLIGHT_BYTES=8 * MB)
    try:
        pid = server.process.pid
        body = json.dumps({"inputs": [coin_row(1)], "padding": "x" * (3 * MB)}).encode()  # other keys are ignored
        for _ in range(3):  # warm: the first requests' allocations are not the load's
            assert server.post({"inputs": [coin_row(2)]}).status_code == 200
        baseline = peak = rss_bytes(pid)
        clients = 48
        answers: list[tuple[int, str | None, dict | None, float]] = []
        barrier = threading.Barrier(clients)
        sampling = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not sampling.is_set():
                peak = max(peak, rss_bytes(pid))
                time.sleep(0.005)

        def client() -> None:
            barrier.wait()
            started = time.monotonic()
            response = requests.post(f"{server.url}/serving-endpoints/coinyear/invocations", data=body, timeout=60,
                                     headers={**AUTH, "Content-Type": "application/json"})
            payload = response.json() if response.status_code != 200 else None
            answers.append((response.status_code, response.headers.get("retry-after"), payload,
                            time.monotonic() - started))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        sampling.set()
        sampler.join()
        statuses = [status for status, *_ in answers]
        assert len(answers) == clients and set(statuses) <= {200, 429}, sorted(statuses)
        refused = [answer for answer in answers if answer[0] == 429]
        assert refused and statuses.count(200) >= 1, sorted(statuses)
        for _, retry_after, payload, _ in refused:
            assert retry_after is not None and int(retry_after) >= 1
            assert payload["error_code"] == "REQUEST_LIMIT_EXCEEDED" and payload["message"], payload
        slowest = max(seconds for *_, seconds in refused)
        assert slowest < DEADLINE, f"a refusal took {slowest:.2f} s (it is answered from the headers)"
        growth = peak - baseline
        assert growth < 100 * MB, f"the gateway grew by {growth / MB:.0f} MB under {clients} requests of 3 MB"
        metrics = server.get("/metrics").text
        assert 'coinyear_requests_total{error_code="REQUEST_LIMIT_EXCEEDED",status="429"}' in metrics
    finally:
        server.kill()
