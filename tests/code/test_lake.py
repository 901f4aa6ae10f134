"""Delta tables and the durable spool in front of them: schemas, empty reads, torn records, idempotent replay."""

from __future__ import annotations

import datetime as dt
import threading

import pytest

from coinyear.lake import (FEEDBACK, INFERENCE_LOG, MONITORING, SCHEMAS, Lake, SpooledAppender, _frame,
                           read_segment)

NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)


def log_row(request_id: str, **extra) -> dict:
    return {"request_id": request_id, "timestamp": NOW, "date": NOW.date(), "status_code": 200,
            "prediction": 12.5, "front_image": b"\xff\xd8front", **extra}


def test_a_missing_table_reads_as_an_empty_frame_with_its_columns(tmp_path):
    lake = Lake(tmp_path / "lake")
    assert list(lake.read(INFERENCE_LOG).columns) == SCHEMAS[INFERENCE_LOG].names
    assert list(lake.read(FEEDBACK).columns) == ["request_id", "year_from", "year_to", "timestamp", "source", "note"]
    assert lake.read(MONITORING).empty and lake.count(INFERENCE_LOG) == 0


def test_append_and_read_keep_types_and_fill_missing_columns(tmp_path):
    lake = Lake(tmp_path / "lake")
    assert lake.append(INFERENCE_LOG, [log_row("a"), log_row("b", status_code=400, prediction=None)]) == 2
    rows = lake.read(INFERENCE_LOG).set_index("request_id")
    assert rows.loc["a", "prediction"] == 12.5 and bytes(rows.loc["a", "front_image"]) == b"\xff\xd8front"
    assert rows.loc["b", "status_code"] == 400 and rows.loc["a", "back_image"] is None
    assert str(rows["timestamp"].dtype) == "datetime64[us, UTC]"
    only_b = lake.read(INFERENCE_LOG, columns=["request_id"], filters=[("request_id", "=", "b")])
    assert list(only_b["request_id"]) == ["b"]
    with pytest.raises(Exception):
        lake.append(INFERENCE_LOG, [{"request_id": "c", "status_code": "not a number"}])
    # a table without a fixed schema takes new columns as they come
    lake.append(MONITORING, [{"metric": "mae", "value": 3.0}])
    lake.append(MONITORING, [{"metric": "drift", "value": 0.1, "window": "7d"}])
    assert set(lake.read(MONITORING).columns) == {"metric", "value", "window"}


def test_spooled_writes_reach_delta_in_few_commits(tmp_path):
    lake = Lake(tmp_path / "lake")
    spool = SpooledAppender(lake, INFERENCE_LOG, tmp_path / "spool", flush_seconds=0.2).start()
    threads = [threading.Thread(target=lambda k=k: [spool.write([log_row(f"{k}-{i}")]) for i in range(50)])
               for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert spool.close(timeout=30)
    assert lake.count(INFERENCE_LOG) == 200 and spool.backlog == 0
    from deltalake import DeltaTable

    assert len(DeltaTable(lake.uri(INFERENCE_LOG)).history()) < 20  # batched, not one commit per write
    assert not list((tmp_path / "spool").glob("*.seg"))


def test_a_torn_last_record_is_ignored(tmp_path):
    folder = tmp_path / "spool"
    folder.mkdir()
    # the process died in the middle of writing the second record, which was therefore never acknowledged
    (folder / "000000000001.seg").write_bytes(_frame([log_row("kept")]) + _frame([log_row("torn")])[:-5])
    assert [r["request_id"] for r in read_segment(folder / "000000000001.seg")] == ["kept"]
    lake = Lake(tmp_path / "lake")
    spool = SpooledAppender(lake, INFERENCE_LOG, folder, flush_seconds=0.1).start()
    assert spool.close(timeout=30)
    assert list(lake.read(INFERENCE_LOG)["request_id"]) == ["kept"]


def test_replay_after_a_crash_is_idempotent(tmp_path):
    lake, folder = Lake(tmp_path / "lake"), tmp_path / "spool"
    first = SpooledAppender(lake, INFERENCE_LOG, folder, flush_seconds=0.1).start()
    first.write([log_row("r1"), log_row("r2")])
    assert first.flush(timeout=30)
    first.write([log_row("r3")])
    first._seal()
    committed_segment = [path for path in sorted(folder.glob("*.seg")) if path.stat().st_size][-1]  # sealed
    saved = committed_segment.read_bytes()
    assert first.flush(timeout=30)
    first._stop.set()  # a crash: no close(), the lock dies with the "process"
    first._lock_file.close()
    committed_segment.write_bytes(saved)  # ...and the segment's deletion after the commit was lost
    second = SpooledAppender(lake, INFERENCE_LOG, folder, flush_seconds=0.1).start()
    second.write([log_row("r4")])
    assert second.close(timeout=30)
    ids = sorted(lake.read(INFERENCE_LOG)["request_id"])
    assert ids == ["r1", "r2", "r3", "r4"]


def test_segment_numbers_are_never_reused(tmp_path):
    lake, folder = Lake(tmp_path / "lake"), tmp_path / "spool"
    for name in ("a", "b", "c"):
        spool = SpooledAppender(lake, INFERENCE_LOG, folder, flush_seconds=0.1).start()
        spool.write([log_row(name)])
        assert spool.close(timeout=30)
    # each run committed its own segment; a reused number would have been skipped as "already committed"
    assert sorted(lake.read(INFERENCE_LOG)["request_id"]) == ["a", "b", "c"]


def test_one_spool_folder_has_one_writer(tmp_path):
    lake = Lake(tmp_path / "lake")
    first = SpooledAppender(lake, FEEDBACK, tmp_path / "spool").start()
    with pytest.raises(RuntimeError, match="in use"):
        SpooledAppender(lake, FEEDBACK, tmp_path / "spool").start()
    first.close()
    SpooledAppender(lake, FEEDBACK, tmp_path / "spool").start().close()


def test_a_record_that_does_not_fit_the_table_is_set_aside(tmp_path):
    lake, folder = Lake(tmp_path / "lake"), tmp_path / "spool"
    spool = SpooledAppender(lake, FEEDBACK, folder, flush_seconds=0.1).start()
    spool.write([{"request_id": "x", "year_from": "not a year", "year_to": 5, "timestamp": NOW}])
    spool.flush(timeout=5)
    spool.write([{"request_id": "y", "year_from": 5, "year_to": 5, "timestamp": NOW}])
    assert spool.close(timeout=30)
    assert list(lake.read(FEEDBACK)["request_id"]) == ["y"]
    assert len(list((folder / "rejected").glob("*.seg"))) == 1
