"""`coinyear ingest-payloads` on local PySpark: a payload table in the AI Gateway inference table's schema ->
`inference_log`, feedback files in a volume folder -> `feedback`, each exactly once.

The payload table is a real table of the local Spark session (the job reads it with `spark.table`, as on a job
cluster); the volume is a local folder standing for /Volumes/... (mounted on a job cluster); the lake is the
default delta-rs backend.
"""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from coinyear.databricks.payloads import PAYLOAD_COLUMNS, ingest_payloads
from coinyear.lake import open_lake
from coinyear.lake.tables import FEEDBACK, INFERENCE_LOG
from tests.conftest import coin_image, make_settings

FRONT, BACK = "front_image_base64", "back_image_base64"
# The columns and types Databricks gives an AI Gateway inference table (SHOW CREATE TABLE of a real one)
PAYLOAD_SCHEMA = ("request_date date, databricks_request_id string, client_request_id string, request_time timestamp, "
                  "status_code int, sampling_fraction double, execution_duration_ms bigint, request string, "
                  "response string, served_entity_id string, logging_error_codes array<string>, requester string")
T0 = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def payload(client_id, request, response, status=200, at=T0, errors=(), databricks_id=None):
    return {"request_date": at.date(), "databricks_request_id": databricks_id or str(uuid.uuid4()),
            "client_request_id": client_id, "request_time": at, "status_code": status, "sampling_fraction": 1.0,
            "execution_duration_ms": 42, "request": request if request is None or isinstance(request, str)
            else json.dumps(request), "response": json.dumps(response), "served_entity_id": "entity-3",
            "logging_error_codes": list(errors), "requester": "someone@example.org"}


def write_table(spark, name: str, rows: list[dict], mode: str = "append") -> None:
    spark.createDataFrame([tuple(row[c] for c in PAYLOAD_COLUMNS) for row in rows], PAYLOAD_SCHEMA) \
         .write.mode(mode).saveAsTable(name)


def feedback_file(volume, request_id, year, at: datetime, name: str | None = None) -> str:
    folder = volume / "feedback"
    folder.mkdir(parents=True, exist_ok=True)
    name = name or f"{at:%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex}.json"
    (folder / name).write_text(json.dumps({"request_id": request_id, "year_from": year, "year_to": year,
                                           "timestamp": at.isoformat(), "source": "ui", "note": None,
                                           "actor": "ada"}))
    return name


@pytest.fixture
def loop(spark, tmp_path):
    suffix = uuid.uuid4().hex[:8]
    table, entities = f"default.payload_{suffix}", f"default.served_entities_{suffix}"
    spark.createDataFrame([("entity-3", "coinyear", "3")], "served_entity_id string, entity_name string, "
                          "entity_version string").write.saveAsTable(entities)
    volume = tmp_path / "Volumes" / "main" / "coinyear" / "loop"
    volume.mkdir(parents=True)
    settings = make_settings(tmp_path / "home", payload_table=table, loop_volume=str(volume), endpoint_name="coinyear")
    yield settings, table, entities, volume
    spark.sql(f"DROP TABLE IF EXISTS {table}")
    spark.sql(f"DROP TABLE IF EXISTS {entities}")


def test_payload_rows_map_onto_inference_log_exactly_once_with_photos(spark, loop):
    settings, table, entities, volume = loop
    photos = {name: coin_image(seed) for seed, name in enumerate(["a0f", "a0b", "a1f", "a1b", "bf", "bb", "gf", "gb"])}
    split = {"dataframe_split": {"columns": [FRONT, BACK], "data": [[b64(photos["a0f"]), b64(photos["a0b"])],
                                                                     [b64(photos["a1f"]), b64(photos["a1b"])]]},
             "client_request_id": "req-a"}
    records = {"dataframe_records": [{FRONT: b64(photos["bf"]), BACK: b64(photos["bb"])}], "params": {"interval": 0.9},
               "client_request_id": "req-b"}
    bad_photo = {"dataframe_records": [{FRONT: "not base64!", BACK: b64(photos["bb"])}], "client_request_id": "req-e"}
    for side in ("front", "back"):  # what the gateway stored before forwarding a request over the logging limit
        (volume / "photos" / "req-big" / "0").mkdir(parents=True, exist_ok=True)
        (volume / "photos" / "req-big" / "0" / side).write_bytes(photos["gf" if side == "front" else "gb"])
    normal = payload("req-a", split, {"predictions": [10.5, -27.0]})
    rows = [
        normal,
        dict(normal),  # delivered twice (at-least-once): still one request
        payload("req-b", records, {"predictions": [{"year": 73.0, "low": 60.0, "high": 90.0,
                                                    "out_of_distribution": False}]}, at=T0 + timedelta(minutes=1)),
        payload("req-big", None, {"predictions": [120.0]}, errors=["MAX_REQUEST_SIZE_EXCEEDED"],
                at=T0 + timedelta(minutes=2)),
        payload("req-lost", None, {"predictions": [5.0]}, errors=["MAX_REQUEST_SIZE_EXCEEDED"],
                at=T0 - timedelta(hours=11)),  # the day before: the first run appends two days, in order
        payload("req-e", bad_photo, {"error_code": "INVALID_PARAMETER_VALUE", "message": "row 0: not base64"},
                status=400, at=T0 + timedelta(minutes=4)),
        payload(None, '{"dataframe_records": [', {"error_code": "BAD_REQUEST", "message": "Invalid input"},
                status=400, at=T0 + timedelta(minutes=5), databricks_id="dbx-badjson"),
    ]
    write_table(spark, table, rows, mode="overwrite")

    first = ingest_payloads(settings, spark, served_entities=entities)
    log = open_lake(settings).read(INFERENCE_LOG).set_index("request_id")
    assert sorted(log.index) == ["dbx-badjson", "req-a-0", "req-a-1", "req-b", "req-big", "req-e", "req-lost"]
    assert (first.requests_mapped, first.rows_appended) == (6, 7)
    assert log.loc["req-a-0", "prediction"] == 10.5 and log.loc["req-a-1", "prediction"] == -27.0
    assert log.loc["req-a-1", "front_image"] == photos["a1f"] and log.loc["req-a-1", "back_image"] == photos["a1b"]
    assert log.loc["req-a-1", "http_request_id"] == normal["databricks_request_id"]
    assert log.loc["req-a-1", "row_index"] == 1 and log.loc["req-a-1", "client_request_id"] == "req-a"
    assert log.loc["req-b", "prediction"] == 73.0 and log.loc["req-b", "front_image"] == photos["bf"]
    assert json.loads(log.loc["req-b", "request_metadata"])["input_format"] == "dataframe_records"
    assert log.loc["req-big", "front_image"] == photos["gf"] and log.loc["req-big", "back_image"] == photos["gb"]
    assert log.loc["req-big", "front_image_bytes"] == len(photos["gf"])
    assert json.loads(log.loc["req-big", "request_metadata"])["photos"] == "volume"
    assert log.loc["req-lost", "front_image"] is None and log.loc["req-lost", "prediction"] == 5.0
    assert (first.photos_from_volume, first.photos_missing, first.unreadable_requests) == (1, 1, 1)
    assert log.loc["req-e", "status_code"] == 400 and log.loc["req-e", "error_code"] == "INVALID_PARAMETER_VALUE"
    assert log.loc["req-e", "front_image"] is None and log.loc["req-e", "back_image"] == photos["bb"]
    assert log.loc["dbx-badjson", "status_code"] == 400 and log.loc["dbx-badjson", "error_message"] == "Invalid input"
    assert json.loads(log.loc["dbx-badjson", "request_metadata"])["photos"] == "unreadable"
    assert set(log["model_version"]) == {"3"} and set(log["model_name"]) == {"coinyear"}
    assert set(log["endpoint_name"]) == {"coinyear"} and set(log["execution_time_ms"]) == {42.0}
    assert log.loc["req-a-0", "timestamp"] == T0 and str(log.loc["req-a-0", "date"]) == "2026-11-20"
    assert first.watermark == (T0 + timedelta(minutes=5)).isoformat()
    # both steps configured: the report is about this table and this volume (the volume was once read as the
    # "table missing" flag, which hid the mapping and the feedback files from the report)
    assert not first.payload_table_missing and first.loop_volume == settings.loop_volume
    assert "does not exist yet" not in first.report() and "feedback files:" in first.report()

    again = ingest_payloads(settings, spark, served_entities=entities)
    assert (again.requests_mapped, again.rows_appended) == (0, 0)
    assert open_lake(settings).count(INFERENCE_LOG) == 7

    # a row delivered late (older than the watermark, inside the window) is mapped on the next run, once
    write_table(spark, table, [payload("req-late", records | {"client_request_id": "req-late"},
                                       {"predictions": [1.0]}, at=T0 - timedelta(hours=12))])
    late = ingest_payloads(settings, spark, served_entities=entities)
    assert (late.requests_mapped, late.rows_appended) == (1, 1)
    assert late.watermark == (T0 + timedelta(minutes=5, microseconds=1)).isoformat()  # never back; rises by 1 us
    assert open_lake(settings).count(INFERENCE_LOG) == 8
    assert ingest_payloads(settings, spark, served_entities=entities).rows_appended == 0

    from coinyear.jobs.monitor import run_monitor

    monitoring = run_monitor(settings)  # the mapped rows are what monitoring reads on Databricks
    assert list(monitoring["model_version"]) == ["3", "3"]  # two days, one version
    # requests, not rows: day two holds 5 requests, one of them with 2 coins (6 rows)
    assert list(monitoring["requests"]) == [2, 5]


def test_smoke_queries_of_coinyear_deploy_are_not_traffic(spark, loop):
    """Model Serving logs the deploy's smoke queries like any request; they are the deploy checking a version, so
    they never reach inference_log (monitoring and retraining read it), and the report counts them."""
    from coinyear.databricks.volume import SMOKE_REQUEST_PREFIX

    settings, table, entities, _ = loop
    body = {"dataframe_records": [{FRONT: b64(coin_image(1)), BACK: b64(coin_image(2))}]}
    smoke_id = f"{SMOKE_REQUEST_PREFIX}coinyear-3-0a1b2c3d4e5f"
    write_table(spark, table, [payload(smoke_id, body | {"client_request_id": smoke_id}, {"predictions": [99.0]}),
                               payload("req-real", body | {"client_request_id": "req-real"}, {"predictions": [12.0]},
                                       at=T0 + timedelta(seconds=1))], mode="overwrite")
    result = ingest_payloads(settings, spark, served_entities=entities)
    assert list(open_lake(settings).read(INFERENCE_LOG)["request_id"]) == ["req-real"]
    assert (result.requests_mapped, result.smoke_requests_skipped) == (1, 1)
    assert "skipped 1 smoke queries of `coinyear deploy`" in result.report()


@pytest.mark.parametrize("backend", ["delta", "spark"])
def test_feedback_files_wait_for_their_request_and_land_once(spark, loop, backend):
    """With either lake backend: `spark` is the Databricks job's (Unity Catalog tables through Spark)."""
    settings, table, entities, volume = loop
    if backend == "spark":
        schema = f"lake_{uuid.uuid4().hex[:8]}"
        spark.sql(f"CREATE SCHEMA {schema}")
        settings = settings.model_copy(update={"lake_backend": "spark", "lake_schema": schema})
    now = T0 + timedelta(hours=1)
    row = {"dataframe_records": [{FRONT: b64(coin_image(1)), BACK: b64(coin_image(2))}], "client_request_id": "r-1"}
    write_table(spark, table, [payload("r-1", row, {"predictions": [50.0]})], mode="overwrite")
    known = feedback_file(volume, "r-1", 41, now)
    waiting = feedback_file(volume, "r-2", -27, now)
    stale = feedback_file(volume, "r-never", 12, now - timedelta(days=3))
    (volume / "feedback" / "broken.json").write_text('{"request_id": "r-1", "year_from": 0')
    (volume / "feedback" / "zero.json").write_text(json.dumps({"request_id": "r-1", "year_from": 0, "year_to": 3,
                                                              "timestamp": now.isoformat()}))

    first = ingest_payloads(settings, spark, now=now, served_entities=entities)
    feedback = open_lake(settings).read(FEEDBACK)
    assert list(feedback["request_id"]) == ["r-1"] and list(feedback["year_from"]) == [41]
    assert (first.feedback_appended, first.feedback_waiting, first.feedback_already_in) == (1, 1, 0)
    assert set(first.feedback_rejected) == {stale, "broken.json", "zero.json"}
    assert "year_from=0" in first.feedback_rejected["zero.json"] and "after" in first.feedback_rejected[stale]
    assert (volume / "feedback" / "ingested" / known).is_file() and (volume / "feedback" / waiting).is_file()
    assert {p.name for p in (volume / "feedback" / "rejected").iterdir()} == {stale, "broken.json", "zero.json"}

    # the request arrives in the payload table later: its feedback follows; nothing lands twice
    write_table(spark, table, [payload("r-2", row | {"client_request_id": "r-2"}, {"predictions": [-20.0]},
                                       at=T0 + timedelta(minutes=30))])
    second = ingest_payloads(settings, spark, now=now, served_entities=entities)
    assert (second.requests_mapped, second.feedback_appended, second.feedback_waiting) == (1, 1, 0)
    # a run that stopped between the append and the move leaves a file whose row is in the table already
    (volume / "feedback" / "ingested" / known).rename(volume / "feedback" / known)
    third = ingest_payloads(settings, spark, now=now, served_entities=entities)
    assert (third.feedback_appended, third.feedback_already_in) == (0, 1)
    feedback = open_lake(settings).read(FEEDBACK).sort_values("request_id")
    assert list(feedback["request_id"]) == ["r-1", "r-2"] and list(feedback["year_to"]) == [41, -27]
    assert list(feedback["actor"]) == ["ada", "ada"]  # who the file says gave it

    from coinyear.jobs.ingest import feedback_candidates

    # the retraining job finds each correction's photos through the mapped inference_log
    candidates = feedback_candidates(open_lake(settings), feedback).set_index("coin_id")
    assert candidates.loc["feedback:r-1", "front"] == coin_image(1) and candidates["problem"].isna().all()


def test_a_payload_table_not_created_yet_is_nothing_to_map(spark, loop):
    """Before the endpoint's first deployment its payload table does not exist: the step reports it and maps
    nothing, instead of failing the monitoring and retraining jobs that run it first."""
    settings, _table, entities, _ = loop
    result = ingest_payloads(settings, spark=spark, served_entities=entities)  # `table` was never written
    assert result.payload_table_missing and result.rows_appended == 0
    assert "does not exist yet" in result.report()
    assert open_lake(settings).read(INFERENCE_LOG).empty
