"""The lake's contract, run against both backends: delta-rs tables (the default) and tables written through local
PySpark (`COINYEAR_LAKE_BACKEND=spark`; Parquet here, Unity Catalog Delta tables on Databricks). Then the jobs
on the Spark backend: the retraining job's feedback ledger and the monitoring job, unchanged.

Spark is slow per action (about a second on 2 cores), so each test does few appends and reads.
"""

from __future__ import annotations

import itertools
import json
import shutil
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from coinyear.jobs import clean, ingest, monitor, retrain
from coinyear.lake import open_lake
from coinyear.lake.delta import DeltaLake
from coinyear.lake.tables import (
    DECISIONS_SCHEMA,
    FEEDBACK,
    INFERENCE_LOG,
    MODEL_DECISIONS,
    MONITORING,
    SCHEMAS,
    TRAINING_DATA,
    Lake,
)
from tests.conftest import coin_image, make_settings

NOW = datetime(2026, 11, 26, 12, 0, 0, 123456, tzinfo=UTC)
SCHEMA_NUMBERS = itertools.count()


def backend_settings(backend: str, home, request):
    """Settings for `backend`; the Spark backend gets a fresh schema in the session's warehouse."""
    if backend == "delta":
        return make_settings(home)
    spark = request.getfixturevalue("spark")
    schema = f"test_lake_{next(SCHEMA_NUMBERS)}"
    spark.sql(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    return make_settings(home, lake_backend="spark", lake_schema=schema)


@pytest.fixture(params=["delta", "spark"])
def lake(request, tmp_path) -> Lake:
    return open_lake(backend_settings(request.param, tmp_path / "home", request))


def log_row(request_id: str, **extra) -> dict:
    row = {"request_id": request_id, "http_request_id": request_id, "row_index": 0, "timestamp": NOW,
           "date": NOW.date(), "status_code": 200, "execution_time_ms": 4.5, "model_name": "coinyear",
           "model_version": "1",
           "prediction": -12.5, "front_image": b"\xff\xd8\x00front", "back_image": b"\x89PNG\x00back",
           "front_image_bytes": 9, "back_image_bytes": 9, "request_metadata": "{}", **extra}
    return {name: row.get(name) for name in SCHEMAS[INFERENCE_LOG].names}


def feedback_row(request_id: str, when: datetime = NOW, year: int = 60, source: str | None = "test") -> dict:
    return {"request_id": request_id, "year_from": year, "year_to": year + 5, "timestamp": when, "source": source,
            "note": None, "actor": "ada"}


def test_the_backend_is_chosen_by_settings(tmp_path):
    assert type(open_lake(make_settings(tmp_path))) is DeltaLake
    with pytest.raises(ValueError, match="COINYEAR_LAKE_SCHEMA"):
        open_lake(make_settings(tmp_path, lake_backend="spark"))  # no schema: a clear error before Spark starts


def test_a_missing_table_reads_as_an_empty_frame_with_its_columns(lake):
    assert list(lake.read(INFERENCE_LOG).columns) == SCHEMAS[INFERENCE_LOG].names
    assert list(lake.read(FEEDBACK, columns=["request_id", "timestamp"]).columns) == ["request_id", "timestamp"]
    assert lake.read(MONITORING).empty and lake.count(FEEDBACK) == 0 and not lake.exists(FEEDBACK)
    assert lake.version(FEEDBACK) == -1 and lake.committed_version(FEEDBACK, "app") is None


def test_each_table_round_trips_with_its_types(lake):
    logs = [log_row("a"), log_row("b", status_code=400, error_code="BAD_REQUEST", error_message="no photo",
                                  prediction=None, back_image=None, back_image_bytes=None, model_version=None)]
    feedback = [feedback_row("a"), feedback_row("b", source=None, year=-30)]
    training = pa.Table.from_pylist([{"coin_id": "base:1", "source": "base", "split": "train", "year_from": -27,
                                      "year_to": 14, "added_at": NOW, "feedback_version": 3}],
                                    schema=ingest.TRAINING_DATA_SCHEMA)
    decision = pa.Table.from_pylist([{"decided_at": NOW, "decision": "promoted", "candidate_mae": 12.25,
                                      "eval_rows": 40, "production_mae": float("nan")}],
                                    schema=DECISIONS_SCHEMA)
    metrics = pd.DataFrame({"date": [NOW.date()], "model_version": ["1"], "computed_at": [pd.Timestamp(NOW)],
                            "requests": [5], "feedback_mae": [float("nan")]})
    for table, rows in ((INFERENCE_LOG, logs), (FEEDBACK, feedback), (TRAINING_DATA, training),
                        (MODEL_DECISIONS, decision), (MONITORING, metrics)):
        assert lake.append(table, rows) == (rows.num_rows if isinstance(rows, pa.Table) else len(rows))

    got = lake.read(INFERENCE_LOG).set_index("request_id").sort_index()
    assert list(got.reset_index().columns) == SCHEMAS[INFERENCE_LOG].names
    assert str(got["timestamp"].dtype) == "datetime64[us, UTC]" and got.loc["a", "timestamp"] == NOW
    assert got.loc["a", "date"] == NOW.date() and got.loc["a", "prediction"] == -12.5
    assert bytes(got.loc["a", "front_image"]) == b"\xff\xd8\x00front" and got.loc["b", "back_image"] is None
    assert got.loc["b", "status_code"] == 400 and np.isnan(got.loc["b", "prediction"])
    assert got.loc["b", "model_version"] is None and got.loc["b", "error_message"] == "no photo"

    got = lake.read(FEEDBACK).sort_values("year_from")
    assert list(got.columns) == SCHEMAS[FEEDBACK].names and list(got["year_from"]) == [-30, 60]
    assert list(got["source"]) == [None, "test"] and (got["timestamp"] == NOW).all()

    got = lake.read(TRAINING_DATA)
    assert list(got.columns) == ingest.TRAINING_DATA_SCHEMA.names
    assert got.loc[0, "year_from"] == -27 and got.loc[0, "added_at"] == NOW and got.loc[0, "mint"] is None
    got = lake.read(MODEL_DECISIONS)
    assert list(got.columns) == DECISIONS_SCHEMA.names
    assert got.loc[0, "candidate_mae"] == 12.25 and np.isnan(got.loc[0, "production_mae"])
    assert str(got["decided_at"].dtype) == "datetime64[us, UTC]"
    got = lake.read(MONITORING)
    assert got.loc[0, "date"] == NOW.date() and got.loc[0, "computed_at"] == NOW and got.loc[0, "requests"] == 5


def test_appends_are_exactly_once_and_versions_read_back(lake):
    assert lake.append(FEEDBACK, [feedback_row("a")], transaction=("app", 1)) == 1
    first = lake.version(FEEDBACK)
    assert lake.append(FEEDBACK, [feedback_row("a")], transaction=("app", 1)) == 0  # a retry: already there
    assert lake.append(FEEDBACK, [feedback_row("b")], transaction=("app", 2), metadata={"run": "x"}) == 1
    assert lake.append(FEEDBACK, [feedback_row("c")]) == 1
    assert lake.committed_version(FEEDBACK, "app") == 2 and lake.committed_version(FEEDBACK, "other") is None
    assert lake.version(FEEDBACK) == first + 2
    assert list(lake.read(FEEDBACK, version=first)["request_id"]) == ["a"]  # the table as it was then
    picked = lake.read(FEEDBACK, columns=["request_id"], filters=[("request_id", "in", ["b", "c"])],
                       version=first + 1)
    assert list(picked.columns) == ["request_id"] and list(picked["request_id"]) == ["b"]
    assert lake.count(FEEDBACK) == 3


def test_a_table_without_a_fixed_schema_takes_new_columns(lake):
    lake.append(MONITORING, [{"metric": "mae", "value": 3.0, "empty": None}])
    lake.append(MONITORING, pd.DataFrame({"metric": ["drift"], "value": [0.1], "window": ["7d"]}))
    got = lake.read(MONITORING).sort_values("metric").reset_index(drop=True)
    assert list(got.columns) == ["metric", "value", "empty", "window"]
    assert list(got["window"]) == ["7d", None] and list(got["value"]) == [0.1, 3.0]


def test_the_retrain_feedback_ledger_and_training_data_on_both_backends(lake, tmp_path):
    """retrain's new-feedback read (an anti-join on the feedback ids that decisions consumed, no time travel),
    the decided runs whose training rows count, and the training set, through the lake API only; the feedback
    photo copies, lost with a job cluster's local disk, come back from the inference log."""
    settings = make_settings(tmp_path / "home")
    assert retrain.consumed_keys(retrain.retrain_decisions(lake)) == set()
    front, back = coin_image(1), coin_image(2)
    lake.append(INFERENCE_LOG, [log_row("a", front_image=front, back_image=back)])
    lake.append(FEEDBACK, [feedback_row("a"), feedback_row("b")])
    version, new = ingest.read_new_feedback(lake, set())
    assert sorted(new["request_id"]) == ["a", "b"]
    kept = pd.DataFrame({"coin_id": ["feedback:a"], "source": ["feedback"], "obverse": [None], "reverse": [None],
                         "year_from": [60], "year_to": [65], "date_text": ["60..65"], "denomination": [""],
                         "mint": [""], "content_hash": [clean.content_hash(front, back)], "request_id": ["a"],
                         "feedback_timestamp": [NOW.isoformat()], "group": ["60..65"], "front": [front],
                         "back": [back]})
    assert ingest.build(settings, lake, kept, version, "run-1") == 1
    decision = {"decided_at": NOW, "retrain_run_id": "run-1", "decision": "rejected", "kind": "retrain",
                "consumed_feedback": json.dumps(sorted(ingest.feedback_key(new)))}
    lake.append(MODEL_DECISIONS, pa.Table.from_pylist([decision], schema=DECISIONS_SCHEMA))
    lake.append(FEEDBACK, [feedback_row("c", when=NOW + timedelta(minutes=1))])
    history = retrain.retrain_decisions(lake)
    assert retrain.decided_runs(history) == {"run-1"}
    _, new = ingest.read_new_feedback(lake, retrain.consumed_keys(history))
    assert list(new["request_id"]) == ["c"]

    shutil.rmtree(ingest.image_store(settings))  # the next run, on a fresh cluster
    train, evaluation = ingest.dataset(lake, settings, ingest.table_version(lake, TRAINING_DATA), {"run-1"})
    rows = pd.concat([train.rows, evaluation.rows])
    assert list(rows["coin_id"]) == ["feedback:a"] and Path(rows["obverse_path"].iloc[0]).read_bytes() == front
    train, evaluation = ingest.dataset(lake, settings, ingest.table_version(lake, TRAINING_DATA), {"run-2"})
    assert train.rows.empty and evaluation.rows.empty  # an undecided run's rows do not count


def test_the_monitoring_job_runs_unchanged_on_the_spark_lake(tmp_path, request):
    """run_monitor on the Spark backend gives the same metrics as on delta-rs for the same inference log."""
    day1, day2 = datetime(2026, 3, 1, 10, tzinfo=UTC), datetime(2026, 3, 2, 10, tzinfo=UTC)
    rows = []
    for i, (when, version, status) in enumerate([(day1, "1", 200)] * 3 + [(day1, "1", 400), (day2, "2", 200)]):
        rows.append(log_row(uuid.uuid4().hex, timestamp=when, date=when.date(), status_code=status,
                            model_version=version, execution_time_ms=10.0 * (i + 1),
                            prediction=70.0 + i if status == 200 else None,
                            front_image=coin_image(i) if status == 200 else None))
    feedback = [feedback_row(rows[0]["request_id"], when=day1, year=60)]
    tables = {}
    for backend in ("delta", "spark"):
        settings = backend_settings(backend, tmp_path / backend, request).model_copy(
            update={"retrain_base_limit": 40})
        lake = open_lake(settings)
        lake.append(INFERENCE_LOG, rows)
        lake.append(FEEDBACK, feedback)
        tables[backend] = monitor.run_monitor(settings).drop(columns="computed_at")
        assert lake.count(MONITORING) == 2
    spark_table = tables["spark"]
    assert set(zip(spark_table["date"], spark_table["model_version"])) == {(date(2026, 3, 1), "1"),
                                                                          (date(2026, 3, 2), "2")}
    first = spark_table.set_index("model_version").loc["1"]
    assert first["requests"] == 4 and first["errors"] == 1 and first["feedback_rows"] == 1
    assert first["feedback_mae"] == pytest.approx(70.0 - 62.5) and np.isfinite(first["brightness_psi"])
    pd.testing.assert_frame_equal(spark_table, tables["delta"])
