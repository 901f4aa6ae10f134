"""Delta tables and the durable spool in front of them: schemas, empty reads, torn records, idempotent replay."""

from __future__ import annotations

import datetime as dt
import threading
import time

import pyarrow as pa
import pytest

from coinyear.lake import open_lake
from coinyear.lake.delta import DeltaLake
from coinyear.lake.segments import encode_frame, read_segment
from coinyear.lake.spool import SpooledAppender
from coinyear.lake.tables import FEEDBACK, INFERENCE_LOG, MONITORING, SCHEMAS

NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)


def log_row(request_id: str, **extra) -> dict:
    return {"request_id": request_id, "timestamp": NOW, "date": NOW.date(), "status_code": 200,
            "prediction": 12.5, "front_image": b"\xff\xd8front", **extra}


def test_a_missing_table_reads_as_an_empty_frame_with_its_columns(tmp_path):
    lake = DeltaLake(tmp_path / "lake")
    assert list(lake.read(INFERENCE_LOG).columns) == SCHEMAS[INFERENCE_LOG].names
    assert list(lake.read(FEEDBACK).columns) == ["request_id", "year_from", "year_to", "timestamp", "source", "note",
                                                 "actor"]
    assert lake.read(MONITORING).empty and lake.count(INFERENCE_LOG) == 0


def test_append_and_read_keep_types_and_fill_missing_columns(tmp_path):
    lake = DeltaLake(tmp_path / "lake")
    assert lake.append(INFERENCE_LOG, [log_row("a"), log_row("b", status_code=400, prediction=None)]) == 2
    rows = lake.read(INFERENCE_LOG).set_index("request_id")
    assert rows.loc["a", "prediction"] == 12.5 and bytes(rows.loc["a", "front_image"]) == b"\xff\xd8front"
    assert rows.loc["b", "status_code"] == 400 and rows.loc["a", "back_image"] is None
    assert str(rows["timestamp"].dtype) == "datetime64[us, UTC]"
    only_b = lake.read(INFERENCE_LOG, columns=["request_id"], filters=[("request_id", "=", "b")])
    assert list(only_b["request_id"]) == ["b"]
    with pytest.raises(pa.ArrowInvalid, match="not a number"):
        lake.append(INFERENCE_LOG, [{"request_id": "c", "status_code": "not a number"}])
    assert lake.count(INFERENCE_LOG) == 2  # nothing of the refused write landed
    # a table without a fixed schema takes new columns as they come
    lake.append(MONITORING, [{"metric": "mae", "value": 3.0}])
    lake.append(MONITORING, [{"metric": "drift", "value": 0.1, "window": "7d"}])
    assert set(lake.read(MONITORING).columns) == {"metric", "value", "window"}


def test_a_feedback_table_from_before_actors_still_reads_and_takes_new_rows(tmp_path):
    """`actor` was added to the feedback schema: a table (and a spool frame) written without it reads with a
    null actor, and takes rows with one."""
    from deltalake import write_deltalake

    lake, folder = DeltaLake(tmp_path / "lake"), tmp_path / "spool"
    old_schema = pa.schema([field for field in SCHEMAS[FEEDBACK] if field.name != "actor"])
    old_row = {"request_id": "old", "year_from": 5, "year_to": 5, "timestamp": NOW, "source": "ui", "note": None}
    write_deltalake(lake.uri(FEEDBACK), pa.Table.from_pylist([old_row], schema=old_schema))
    assert lake.read(FEEDBACK, columns=["request_id", "actor"]).to_dict("records") == [
        {"request_id": "old", "actor": None}]
    folder.mkdir()  # a frame the spool of the previous version left behind
    (folder / "000000000001.seg").write_bytes(encode_frame(pa.Table.from_pylist([{**old_row, "request_id": "spooled"}],
                                                                          schema=old_schema)))
    spool = SpooledAppender(lake, FEEDBACK, folder, flush_seconds=0.05).start()
    spool.write([{**old_row, "request_id": "new", "actor": "ada"}])
    assert spool.close(timeout=30) and not list((folder / "quarantine").glob("*.seg"))
    rows = lake.read(FEEDBACK).set_index("request_id")["actor"].to_dict()
    assert rows == {"old": None, "spooled": None, "new": "ada"}


def test_spooled_writes_reach_delta_in_few_commits(tmp_path):
    lake = DeltaLake(tmp_path / "lake")
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
    (folder / "000000000001.seg").write_bytes(encode_frame([log_row("kept")]) + encode_frame([log_row("torn")])[:-5])
    assert [r["request_id"] for r in read_segment(folder / "000000000001.seg")] == ["kept"]
    lake = DeltaLake(tmp_path / "lake")
    spool = SpooledAppender(lake, INFERENCE_LOG, folder, flush_seconds=0.1).start()
    assert spool.close(timeout=30)
    assert list(lake.read(INFERENCE_LOG)["request_id"]) == ["kept"]


def test_replay_after_a_crash_is_idempotent(tmp_path):
    lake, folder = DeltaLake(tmp_path / "lake"), tmp_path / "spool"
    first = SpooledAppender(lake, INFERENCE_LOG, folder, flush_seconds=0.1).start()
    first.write([log_row("r1"), log_row("r2")])
    assert first.close(timeout=30)  # its threads are gone: nothing below races them
    committed = lake.committed_version(INFERENCE_LOG, first.app_id)
    assert committed is not None and lake.count(INFERENCE_LOG) == 2
    # the crash, as files on disk: the committed segment's deletion was lost, and a later segment (fsync'ed and
    # acknowledged) never reached Delta
    (folder / f"{committed:012d}.seg").write_bytes(encode_frame([log_row("r1"), log_row("r2")]))
    (folder / f"{committed + 1:012d}.seg").write_bytes(encode_frame([log_row("r3")]))
    second = SpooledAppender(lake, INFERENCE_LOG, folder, flush_seconds=0.1).start()
    assert second.backlog == 3
    second.write([log_row("r4")])
    assert second.close(timeout=30)
    ids = sorted(lake.read(INFERENCE_LOG)["request_id"])
    assert ids == ["r1", "r2", "r3", "r4"]
    assert not list(folder.glob("*.seg"))


def test_segment_numbers_are_never_reused(tmp_path):
    lake, folder = DeltaLake(tmp_path / "lake"), tmp_path / "spool"
    for name in ("a", "b", "c"):
        spool = SpooledAppender(lake, INFERENCE_LOG, folder, flush_seconds=0.1).start()
        spool.write([log_row(name)])
        assert spool.close(timeout=30)
    # each run committed its own segment; a reused number would have been skipped as "already committed"
    assert sorted(lake.read(INFERENCE_LOG)["request_id"]) == ["a", "b", "c"]


def test_one_spool_folder_has_one_writer(tmp_path):
    lake = DeltaLake(tmp_path / "lake")
    first = SpooledAppender(lake, FEEDBACK, tmp_path / "spool").start()
    with pytest.raises(RuntimeError, match="in use"):
        SpooledAppender(lake, FEEDBACK, tmp_path / "spool").start()
    first.close()
    SpooledAppender(lake, FEEDBACK, tmp_path / "spool").start().close()


def test_a_record_that_does_not_fit_the_table_fails_its_caller_at_once(tmp_path):
    lake, folder = DeltaLake(tmp_path / "lake"), tmp_path / "spool"
    spool = SpooledAppender(lake, FEEDBACK, folder, flush_seconds=0.1).start()
    with pytest.raises(ValueError, match=r"year_from|not a year"):
        spool.write([{"request_id": "x", "year_from": "not a year", "year_to": 5, "timestamp": NOW}])
    spool.write([{"request_id": "y", "year_from": 5, "year_to": 5, "timestamp": NOW}])
    assert spool.close(timeout=30)
    assert list(lake.read(FEEDBACK)["request_id"]) == ["y"]
    assert spool.health()["quarantined_segments"] == 0  # the bad record never reached a segment


def test_submit_during_close_fails_at_once(tmp_path):
    (tmp_path / "not_a_folder").write_text("")  # every commit fails: close() waits out its timeout
    lake = DeltaLake(tmp_path / "not_a_folder")
    spool = SpooledAppender(lake, FEEDBACK, tmp_path / "spool", flush_seconds=0.05).start()
    spool.write([{"request_id": "a", "year_from": 5, "year_to": 5, "timestamp": NOW}])
    closing = threading.Thread(target=spool.close, kwargs={"timeout": 1.5})
    closing.start()
    time.sleep(0.3)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="clos"):
        spool.submit([{"request_id": "b", "year_from": 5, "year_to": 5, "timestamp": NOW}]).result(timeout=2)
    assert time.monotonic() - started < 1
    closing.join()
    # what was acknowledged before close() is still in the spool for the next start
    assert [r["request_id"] for _, path in spool._segments() for r in read_segment(path)] == ["a"]


def test_commits_are_bounded_by_bytes(tmp_path):
    lake = DeltaLake(tmp_path / "lake")
    spool = SpooledAppender(lake, INFERENCE_LOG, tmp_path / "spool", flush_seconds=60,
                            max_commit_bytes=300_000).start()
    photo = bytes(100_000)
    for i in range(12):  # all before the first commit round: only the byte bound splits them
        spool.write([log_row(f"r{i}", front_image=photo)])
    assert spool.health()["pending_bytes"] >= 12 * 100_000
    assert spool.close(timeout=30)
    from deltalake import DeltaTable

    added = [h["operationMetrics"]["num_added_rows"] for h in DeltaTable(lake.uri(INFERENCE_LOG)).history()]
    assert sum(added) == 12 and len(added) >= 4 and max(added) <= 3


def test_a_segment_delta_refuses_is_quarantined_and_later_ones_commit(tmp_path):
    lake, folder = DeltaLake(tmp_path / "lake"), tmp_path / "spool"
    lake.append(MONITORING, [{"metric": "mae", "value": 3.0}])
    spool = SpooledAppender(lake, MONITORING, folder, flush_seconds=0.05).start()
    spool.write([{"metric": "drift", "value": "high"}])  # converts, but the table's `value` is a double
    started = time.monotonic()
    while not spool.health()["quarantined_segments"] and time.monotonic() - started < 20:
        time.sleep(0.05)
    health = spool.health()
    assert health["quarantined_segments"] == 1 and not health["ok"] and health["accepting"]
    assert "value" in health["last_quarantine_error"] or "cast" in health["last_quarantine_error"].lower()
    spool.write([{"metric": "mae", "value": 2.5}])
    assert spool.close(timeout=30)
    assert sorted(lake.read(MONITORING)["value"]) == [2.5, 3.0]
    kept = list((folder / "quarantine").glob("*.seg"))
    assert [r["value"] for path in kept for r in read_segment(path)] == ["high"]  # kept, never deleted


def test_an_unconvertible_segment_left_by_an_older_version_is_quarantined(tmp_path):
    lake, folder = DeltaLake(tmp_path / "lake"), tmp_path / "spool"
    folder.mkdir()
    (folder / "000000000001.seg").write_bytes(encode_frame([{"request_id": "x", "year_from": "not a year",
                                                       "year_to": 5, "timestamp": NOW}]))
    (folder / "000000000002.seg").write_bytes(encode_frame([{"request_id": "y", "year_from": 5, "year_to": 5,
                                                       "timestamp": NOW}]))
    spool = SpooledAppender(lake, FEEDBACK, folder, flush_seconds=0.05).start()
    assert spool.close(timeout=30)
    assert list(lake.read(FEEDBACK)["request_id"]) == ["y"]
    assert [p.name for p in (folder / "quarantine").glob("*.seg")] == ["000000000001.seg"]
    assert spool.health()["quarantined_segments"] == 1


def test_health_reports_a_lake_that_is_down_and_its_recovery(tmp_path):
    (tmp_path / "lake").write_text("")  # a file where the lake's folder should be: every commit fails
    lake = DeltaLake(tmp_path / "lake")
    spool = SpooledAppender(lake, FEEDBACK, tmp_path / "spool", flush_seconds=0.05).start()
    spool.write([{"request_id": "a", "year_from": 5, "year_to": 5, "timestamp": NOW}])
    started = time.monotonic()
    while spool.health()["last_error"] is None and time.monotonic() - started < 10:
        time.sleep(0.05)
    health = spool.health()
    assert set(health) >= {"ok", "accepting", "quarantined_segments", "pending_rows", "pending_bytes",
                           "last_error", "last_commit_at"}
    assert not health["ok"] and health["accepting"] and health["pending_rows"] == 1 and health["pending_bytes"] > 0
    assert health["quarantined_segments"] == 0 and health["last_commit_at"] is None
    (tmp_path / "lake").unlink()  # the lake is back
    assert spool.flush(timeout=30)
    health = spool.health()
    assert health["ok"] and health["last_error"] is None and health["pending_rows"] == 0
    assert health["pending_bytes"] == 0 and health["last_commit_at"] is not None
    assert spool.close(timeout=30)
    assert not spool.health()["accepting"]
    assert list(lake.read(FEEDBACK)["request_id"]) == ["a"]


def test_a_segment_the_spark_lake_refuses_is_quarantined(spark, tmp_path):
    from tests.conftest import make_settings

    spark.sql("CREATE SCHEMA IF NOT EXISTS spool_quarantine")
    lake = open_lake(make_settings(tmp_path / "home", lake_backend="spark", lake_schema="spool_quarantine"))
    lake.append(MONITORING, [{"metric": "mae", "value": 3.0}])
    # one attempt: each Spark write takes seconds, and the bounded retries are tested on delta-rs above
    spool = SpooledAppender(lake, MONITORING, tmp_path / "spool", flush_seconds=0.05, max_attempts=1).start()
    spool.write([{"metric": "drift", "value": "high"}])  # converts, but the table's `value` is a double
    started = time.monotonic()
    while not spool.health()["quarantined_segments"] and time.monotonic() - started < 60:
        time.sleep(0.05)
    assert spool.health()["quarantined_segments"] == 1
    assert "CAST_INVALID_INPUT" in spool.health()["last_quarantine_error"]
    spool.write([{"metric": "mae", "value": 2.5}])
    assert spool.close(timeout=60)
    assert sorted(lake.read(MONITORING)["value"]) == [2.5, 3.0]


def test_start_counts_what_was_left_without_loading_it(tmp_path):
    """A long lake outage leaves many large segments: start() must count them in bounded memory (loading them all
    at once would crash the restarted gateway, again at every restart)."""
    import tracemalloc

    lake, folder = DeltaLake(tmp_path / "lake"), tmp_path / "spool"
    folder.mkdir()
    photo = bytes(250_000)
    for seq in range(1, 17):  # 16 segments of 4 frames of ~250 kB: ~16 MB left behind
        frames = [encode_frame(lake.storable(INFERENCE_LOG, [log_row(f"{seq}-{i}", front_image=photo)]))
                  for i in range(4)]
        if seq == 16:  # the last write of the killed process was torn (never acknowledged): not counted
            frames.append(encode_frame(lake.storable(INFERENCE_LOG, [log_row("torn", front_image=photo)]))[:-5])
        (folder / f"{seq:012d}.seg").write_bytes(b"".join(frames))
    left = sum(path.stat().st_size for path in folder.glob("*.seg"))
    spool = SpooledAppender(lake, INFERENCE_LOG, folder, flush_seconds=3600)
    tracemalloc.start()
    try:
        spool.start()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert spool.backlog == 64 and spool.backlog_bytes == left
    assert peak < left / 8, f"start() held {peak / 1e6:.1f} MB for {left / 1e6:.1f} MB of segments"
    assert spool.close(timeout=60)
    assert lake.count(INFERENCE_LOG) == 64 and "torn" not in set(lake.read(INFERENCE_LOG)["request_id"])


def test_open_lake_gives_the_backend_the_settings_name(tmp_path, monkeypatch):
    """`open_lake(settings)`, and `open_lake()` with the process's settings (what the Monitor page reads): with
    COINYEAR_LAKE_BACKEND=spark that must be the Spark tables, not an empty delta-rs folder nobody writes to."""
    from types import SimpleNamespace

    from coinyear import config
    from coinyear.lake.spark import SparkLake
    from tests.conftest import make_settings

    session = SimpleNamespace(conf=SimpleNamespace(get=lambda key, default=None: default))
    monkeypatch.setattr("coinyear.spark.spark_session", lambda: session)  # no Spark needed to pick the backend
    configured = make_settings(tmp_path / "home", lake_backend="spark", lake_schema="prod.coinyear")
    monkeypatch.setattr(config, "get_settings", lambda: configured)
    for lake in (open_lake(configured), open_lake()):
        assert isinstance(lake, SparkLake) and lake.uri(FEEDBACK) == "prod.coinyear.feedback"
    local = make_settings(tmp_path / "home")
    monkeypatch.setattr(config, "get_settings", lambda: local)
    for lake in (open_lake(local), open_lake()):
        assert type(lake) is DeltaLake and lake.root == str(local.lake_root)


def test_quarantined_segments_are_replayed_once_and_never_deleted_unreplayed(tmp_path):
    """A quarantined segment moved back into the spool was deleted as "already committed" (later segments had
    moved the commit marker past it): it now goes back to quarantine, and `replay_quarantine` commits its rows
    once the table takes them, exactly once however often it runs."""
    import shutil

    from coinyear.lake.delta import DeltaLake

    class Refusing(DeltaLake):  # the table refuses the row "bad" until an operator puts it right
        refuse = True

        def append(self, table, rows, **kwargs):
            if self.refuse and "bad" in self.storable(table, rows).column("request_id").to_pylist():
                raise pa.ArrowInvalid("cannot cast: the table's schema changed (injected)")
            return super().append(table, rows, **kwargs)

    def feedback(request_id):
        return {"request_id": request_id, "year_from": 5, "year_to": 5, "timestamp": NOW}

    lake, folder = Refusing(tmp_path / "lake"), tmp_path / "spool"
    spool = SpooledAppender(lake, FEEDBACK, folder, flush_seconds=0.05, max_attempts=1).start()
    spool.write([feedback("bad")])
    started = time.monotonic()
    while not spool.health()["quarantined_segments"] and time.monotonic() - started < 20:
        time.sleep(0.05)
    spool.write([feedback("good")])  # commits, with a marker past the quarantined segment's number
    assert spool.close(timeout=30)
    (segment,) = (folder / "quarantine").glob("*.seg")
    content = segment.read_bytes()

    shutil.move(segment, folder / segment.name)  # an operator's first idea: put it back in the spool
    again = SpooledAppender(lake, FEEDBACK, folder, flush_seconds=0.05).start()
    assert again.close(timeout=30)
    assert (folder / "quarantine" / segment.name).read_bytes() == content, "a never-committed segment was lost"
    assert again.health()["quarantined_segments"] == 1 and not list(folder.glob("*.seg"))

    from coinyear.lake.spool import replay_quarantine

    assert replay_quarantine(lake, FEEDBACK, folder) == {segment.name: "not committed: ArrowInvalid: cannot cast: "
                                                                       "the table's schema changed (injected)"}
    assert (folder / "quarantine" / segment.name).exists()  # still refused: kept
    lake.refuse = False  # the table is put right
    assert replay_quarantine(lake, FEEDBACK, folder) == {segment.name: "committed"}
    assert sorted(lake.read(FEEDBACK)["request_id"]) == ["bad", "good"]
    assert not list((folder / "quarantine").iterdir())
    # stopped between the commit and the deletion: the file is back, the rows are not committed twice
    (folder / "quarantine" / segment.name).write_bytes(content)
    assert replay_quarantine(lake, FEEDBACK, folder) == {segment.name: "already committed"}
    assert sorted(lake.read(FEEDBACK)["request_id"]) == ["bad", "good"]
    assert replay_quarantine(lake, FEEDBACK, folder) == {}


def test_the_replay_command_commits_what_the_table_takes_again(tmp_path, monkeypatch, capsys):
    """`coinyear lake replay-quarantine`: a segment quarantined while the table refused it is committed once the
    table takes it again (exit 0); asked again, nothing is left to replay."""
    from coinyear.cli import main
    from coinyear.config import get_settings
    from coinyear.lake.delta import DeltaLake

    class Refusing(DeltaLake):
        def append(self, table, rows, **kwargs):
            raise pa.ArrowInvalid("cannot cast: the table's schema changed (injected)")

    monkeypatch.setenv("COINYEAR_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    try:
        settings = get_settings()
        spool = SpooledAppender(Refusing(settings.lake_root), FEEDBACK, settings.spool_dir / FEEDBACK,
                                flush_seconds=0.05, max_attempts=1).start()
        spool.write([{"request_id": "late", "year_from": 5, "year_to": 5, "timestamp": NOW}])
        started = time.monotonic()
        while not spool.health()["quarantined_segments"] and time.monotonic() - started < 20:
            time.sleep(0.05)
        spool.close(timeout=10)
        assert main(["lake", "replay-quarantine", "--table", "feedback"]) == 0
        assert ": committed" in capsys.readouterr().out
        assert open_lake(settings).read(FEEDBACK)["request_id"].tolist() == ["late"]
        assert main(["lake", "replay-quarantine", "--table", "feedback"]) == 0
        assert "nothing in quarantine for feedback" in capsys.readouterr().out
    finally:
        get_settings.cache_clear()
