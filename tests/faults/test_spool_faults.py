"""Faults injected into the inference-log spool (coinyear.lake.SpooledAppender), with real processes, real
Delta tables and real OS errors; nothing of ours is mocked.

- kill -9 mid-commit: a child process spooling records is SIGKILLed while its commit is under way (paused just
  before and just after the Delta commit by a Lake subclass in the child), and at random points of a write loop;
  after a restart every acknowledged record is in the table exactly once.
- full disk: a 2 MiB tmpfs under the spool and another under the lake (when running as root and `mount` works),
  and a file-size limit (RLIMIT_FSIZE: EFBIG) in a child process, which needs no privilege; writers get an OS
  error (never a silent ack), health() says so, and nothing acknowledged is lost once space is back; a small record
  whose write failed half-way leaves nothing behind that a later write could complete (no silent late commit).
- a concurrent writer: a second process appends to the same Delta table with deltalake while the spool commits;
  the spool's rows land exactly once (conflicting commits are retried, transaction markers keep them single).
- a table whose schema changed under a running gateway: the spool quarantines what Delta refuses, /ready says
  `degraded` (still 200) and /metrics counts the quarantined segment; a closed spool makes /ready a 503.

Run as a script, this file is the child process of the tests above (`python test_spool_faults.py MODE ARGS`).
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)
PHOTO = 20_000  # bytes of "photo" per row: a few rows fill a small disk


def log_row(request_id: str, photo: int = PHOTO) -> dict:
    return {"request_id": request_id, "timestamp": NOW, "date": NOW.date(), "status_code": 200,
            "prediction": 12.5, "front_image": os.urandom(photo)}


# ------------------------------------------------------------------------------------------ the child process
def child_writer(lake_root: str, spool_dir: str, prefix: str, count: int, pause: str, marker: str) -> None:
    """Spool `count` records, printing each id once `write` acknowledged it; `pause` (before/after) makes the
    first Delta commit stop (before it is written / after it landed) and touch `marker`, to be killed there."""
    from coinyear.lake.delta import DeltaLake
    from coinyear.lake.spool import SpooledAppender
    from coinyear.lake.tables import INFERENCE_LOG

    class PausingLake(DeltaLake):
        def append(self, table, rows, **kwargs):
            if pause == "before":
                Path(marker).touch()
                time.sleep(600)
            written = super().append(table, rows, **kwargs)
            if pause == "after":
                Path(marker).touch()
                time.sleep(600)
            return written

    spool = SpooledAppender(PausingLake(lake_root), INFERENCE_LOG, spool_dir, flush_seconds=0.02).start()
    for i in range(count):
        spool.write([log_row(f"{prefix}-{i}", 2_000)])
        print(f"{prefix}-{i}", flush=True)
    spool.close()


def child_file_size_limit(lake_root: str, spool_dir: str) -> None:
    """A full disk by RLIMIT_FSIZE (EFBIG), in this process only; prints what each step saw as JSON."""
    import resource

    from coinyear.lake.delta import DeltaLake
    from coinyear.lake.spool import SpooledAppender
    from coinyear.lake.tables import INFERENCE_LOG

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the default: being killed
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    seen: dict = {"acked": []}
    spool = SpooledAppender(DeltaLake(lake_root), INFERENCE_LOG, spool_dir, flush_seconds=3600).start()
    for i in range(3):
        spool.write([log_row(f"a{i}", 100_000)])
        seen["acked"].append(f"a{i}")
    resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, hard))  # the disk is "full" from here on
    seen["flushed_while_full"] = spool.flush(timeout=1.5)  # the lake's parquet file cannot be written
    seen["health_lake_full"] = spool.health()
    try:
        spool.write([log_row("refused", 100_000)])  # the spool's segment cannot grow past the limit
        seen["refused"] = None
    except OSError as error:
        seen["refused"] = [error.errno, str(error)]
    seen["health_spool_full"] = spool.health()
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space is back
    spool.write([log_row("after", 100_000)])
    seen["acked"].append("after")
    seen["flushed"] = spool.flush(timeout=30)
    seen["health_after"] = spool.health()
    seen["closed"] = spool.close(timeout=30)
    print(json.dumps(seen))


def child_small_frames(lake_root: str, spool_dir: str) -> None:
    """A write of a small record (well under the 8 KiB of a buffered file) fails half-way by RLIMIT_FSIZE; prints
    what the segment holds afterwards as JSON."""
    import resource

    from coinyear.lake.delta import DeltaLake
    from coinyear.lake.segments import read_segment
    from coinyear.lake.spool import SpooledAppender
    from coinyear.lake.tables import INFERENCE_LOG

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    seen: dict = {"acked": []}
    spool = SpooledAppender(DeltaLake(lake_root), INFERENCE_LOG, spool_dir, flush_seconds=3600).start()
    spool.write([log_row("a0", 500)])
    seen["acked"].append("a0")
    segment = next(Path(spool_dir).glob("*.seg"))
    seen["good"] = good = segment.stat().st_size
    resource.setrlimit(resource.RLIMIT_FSIZE, (good + 300, hard))  # the next frame gets 300 bytes in, then EFBIG
    try:
        spool.write([log_row("refused", 500)])
        seen["refused"] = None
    except OSError as error:
        seen["refused"] = error.errno
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space is back
    seen["size_after_failure"] = segment.stat().st_size
    spool.write([log_row("after", 50)])
    seen["acked"].append("after")
    seen["in_segment"] = [row["request_id"] for row in read_segment(segment)]
    seen["closed"] = spool.close(timeout=30)
    print(json.dumps(seen))


def child_other_writer(table_uri: str, count: int) -> None:
    """Another writer of the same Delta table: `count` one-row appends with deltalake, each retried on conflict."""
    import pyarrow as pa
    from deltalake import write_deltalake

    from coinyear.lake.tables import INFERENCE_LOG, SCHEMAS

    for i in range(count):
        data = pa.Table.from_pylist([log_row(f"other-{i}", 500)], schema=SCHEMAS[INFERENCE_LOG])
        for attempt in range(20):
            try:
                write_deltalake(table_uri, data, mode="append", partition_by=["date"])
                break
            except Exception:  # noqa: BLE001 - a conflicting commit: the next attempt reads the new version
                time.sleep(0.01 * (attempt + 1))
        else:
            raise SystemExit(f"other-{i} never committed")
        print(f"other-{i}", flush=True)


def child_restart_on_backlog(lake_root: str, spool_dir: str) -> None:
    """A gateway's spool restarted on what a long lake outage left (the lake still down: nothing commits): start
    it, then print how many rows it counted and this process's peak resident memory (kB)."""
    import resource

    from coinyear.lake.delta import DeltaLake
    from coinyear.lake.spool import SpooledAppender
    from coinyear.lake.tables import INFERENCE_LOG

    class DownLake(DeltaLake):
        def append(self, table, rows, **kwargs):
            raise OSError("lake unreachable")

    spool = SpooledAppender(DownLake(lake_root), INFERENCE_LOG, spool_dir, flush_seconds=3600).start()
    print(json.dumps({"backlog": spool.backlog, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}),
          flush=True)
    os._exit(0)  # as a SIGKILL would: nothing is committed or cleaned up


if __name__ == "__main__":
    {"writer": lambda a: child_writer(a[0], a[1], a[2], int(a[3]), a[4], a[5]),
     "backlog": lambda a: child_restart_on_backlog(a[0], a[1]),
     "fsize": lambda a: child_file_size_limit(a[0], a[1]),
     "small": lambda a: child_small_frames(a[0], a[1]),
     "other": lambda a: child_other_writer(a[0], int(a[1]))}[sys.argv[1]](sys.argv[2:])
    sys.exit(0)

# ------------------------------------------------------------------------------------------------- the tests
import pytest  # noqa: E402 - after the child process above, which needs none of the test dependencies

from coinyear.lake.delta import DeltaLake  # noqa: E402
from coinyear.lake.segments import read_segment  # noqa: E402
from coinyear.lake.spool import SpooledAppender  # noqa: E402
from coinyear.lake.tables import INFERENCE_LOG, Lake  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def child(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def recover(lake: Lake, spool_dir: Path) -> None:
    """The restart after a crash: a new spool on the same folder commits what was left."""
    assert SpooledAppender(lake, INFERENCE_LOG, spool_dir, flush_seconds=0.02).start().close(timeout=30)


def assert_exactly_once(lake: Lake, acked: list[str]) -> None:
    counts = lake.read(INFERENCE_LOG, columns=["request_id"])["request_id"].value_counts()
    assert not (counts > 1).any(), f"rows logged twice: {list(counts[counts > 1].index)}"
    missing = sorted(set(acked) - set(counts.index))
    assert not missing, f"acknowledged rows lost: {missing}"


@pytest.mark.parametrize("pause", ["before", "after"])
def test_kill_9_inside_a_commit_loses_and_repeats_nothing(tmp_path, pause):
    lake, spool_dir, marker = DeltaLake(tmp_path / "lake"), tmp_path / "spool", tmp_path / "in_commit"
    process = child("writer", str(lake.root), str(spool_dir), "r", "30", pause, str(marker))
    deadline = time.monotonic() + 30
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert marker.exists(), process.communicate()[1][-2000:]
    process.send_signal(signal.SIGKILL)
    acked = process.communicate()[0].split()
    assert process.returncode == -signal.SIGKILL and acked
    # before: nothing reached Delta; after: the killed commit landed but its segments were not deleted
    assert (lake.count(INFERENCE_LOG) > 0) == (pause == "after")
    recover(lake, spool_dir)
    assert_exactly_once(lake, acked)


def test_kill_9_at_random_points_loses_and_repeats_nothing(tmp_path):
    lake, spool_dir, acked, left = DeltaLake(tmp_path / "lake"), tmp_path / "spool", [], 0
    rng = random.Random(12)
    for run in range(4):  # each run restarts on what the killed one left in the spool
        process = child("writer", str(lake.root), str(spool_dir), f"k{run}", "100000", "none", "-")
        first = process.stdout.readline().strip()
        assert first, process.communicate()[1][-2000:]
        time.sleep(rng.uniform(0.05, 0.6))
        process.send_signal(signal.SIGKILL)
        acked += [first, *process.communicate()[0].split()]
        left += sum(len(read_segment(path)) for path in spool_dir.glob("*.seg"))
    assert left  # the kills left acknowledged rows that only the restarts could commit
    recover(lake, spool_dir)
    assert_exactly_once(lake, acked)
    assert not list(spool_dir.glob("*.seg"))


def test_full_disk_by_file_size_limit(tmp_path):
    """The fallback that needs no privilege: RLIMIT_FSIZE makes every write past 64 kB fail with EFBIG."""
    lake = DeltaLake(tmp_path / "lake")
    done = child("fsize", str(lake.root), str(tmp_path / "spool"))
    out, err = done.communicate(timeout=120)
    assert done.returncode == 0, err[-3000:]
    seen = json.loads(out.strip().splitlines()[-1])
    assert not seen["flushed_while_full"]
    full = seen["health_lake_full"]
    assert not full["ok"] and full["accepting"] and full["pending_rows"] == 3
    assert "too large" in full["last_error"].lower()
    assert seen["refused"] and seen["refused"][0] == errno.EFBIG  # the writer hears of it: no silent ack
    assert not seen["health_spool_full"]["ok"]
    assert seen["flushed"] and seen["closed"] and seen["health_after"]["ok"]
    assert seen["health_after"]["pending_rows"] == 0 and seen["health_after"]["quarantined_segments"] == 0
    assert_exactly_once(lake, seen["acked"])
    assert sorted(lake.read(INFERENCE_LOG)["request_id"]) == sorted(seen["acked"])  # the refused row is not there


def test_a_failed_small_write_leaves_exactly_the_good_prefix(tmp_path):
    """A record whose caller heard of a failed write never lands later: the bytes of a half-written frame must not
    wait in a buffer for the next write (a feedback row, an inference row without photos: all under 8 KiB)."""
    lake = DeltaLake(tmp_path / "lake")
    done = child("small", str(lake.root), str(tmp_path / "spool"))
    out, err = done.communicate(timeout=120)
    assert done.returncode == 0, err[-3000:]
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen["good"] < 8192  # a small frame: the case the 20 kB frames above never reach
    assert seen["refused"] == errno.EFBIG  # the caller heard of it
    assert seen["size_after_failure"] == seen["good"]  # exactly the good prefix is left
    assert seen["in_segment"] == ["a0", "after"]
    assert seen["closed"]
    assert sorted(lake.read(INFERENCE_LOG)["request_id"]) == ["a0", "after"]


def mount_tmpfs(path: Path, size: str = "2m") -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          check=False, capture_output=True).returncode == 0


def fill(folder: Path) -> Path:
    """Fill the file system of `folder` to the last byte; deleting the returned file gives the space back."""
    filler = folder / "filler"
    with open(filler, "wb") as file:
        try:
            while True:
                file.write(bytes(16384))
                file.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC
    return filler


@pytest.fixture
def gateway_factory(tmp_path):
    """A real LocalBackend's lake writers and ready()/metrics; the served model and the batch dispatcher are
    stand-ins (ready() reads only the model's name and version, and whether the dispatcher is alive)."""
    from types import SimpleNamespace

    from coinyear.config import Settings
    from coinyear.serve.local import LocalBackend
    from coinyear.serve.metrics import Metrics

    made = []

    def make(home: Path, lake_uri: Path | None = None) -> LocalBackend:
        settings = Settings(home=home, lake_uri=str(lake_uri) if lake_uri else None, auth_disabled=True,
                            log_flush_seconds=0.05)
        gateway = LocalBackend(settings, Metrics())
        gateway.models.current = SimpleNamespace(name="coinyear", version="1")
        gateway.batcher = SimpleNamespace(alive=True, failure=None)
        for writer in (gateway.log_writer, gateway.feedback_writer):
            writer.start()
        made.append(gateway)
        return gateway

    yield make
    for gateway in made:
        for writer in (gateway.log_writer, gateway.feedback_writer):
            writer.close(timeout=5)


def wait_for(predicate, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_full_disk_on_tmpfs_under_the_spool_and_the_lake(tmp_path, gateway_factory):
    from coinyear.serve.errors import ApiError

    spool_disk, lake_disk = tmp_path / "home" / "spool", tmp_path / "lake"
    if not (mount_tmpfs(spool_disk) and mount_tmpfs(lake_disk)):
        subprocess.run(["umount", str(spool_disk)], check=False, capture_output=True)
        pytest.skip("not root or no mount(8) here: test_full_disk_by_file_size_limit injects the same fault")
    gateway = None
    try:
        gateway = gateway_factory(tmp_path / "home", lake_disk)
        spool, lake, acked = gateway.log_writer, gateway.lake, []
        # the lake's disk is full: writes are still acknowledged (they are in the spool), commits wait
        lake_filler = fill(lake_disk)
        for i in range(5):
            spool.write([log_row(f"l{i}")])
            acked.append(f"l{i}")
        wait_for(lambda: spool.health()["last_error"] is not None)
        health = gateway.ready()
        assert health["degraded"] and "no space left" in health["inference_log"]["last_error"].lower()
        assert health["inference_log"]["accepting"] and health["inference_log"]["pending_rows"] == 5
        # ...and then the spool's disk too: a write fails loudly and /ready answers 503
        spool_filler = fill(spool_disk)
        with pytest.raises(OSError) as refused:
            spool.write([log_row("refused")])
        assert refused.value.errno == errno.ENOSPC
        assert not spool.health()["accepting"]
        with pytest.raises(ApiError) as not_ready:
            gateway.ready()
        assert not_ready.value.status == 503 and "no space left" in str(not_ready.value).lower()
        # space is back: nothing acknowledged was lost
        spool_filler.unlink()
        lake_filler.unlink()
        assert gateway.ready()["inference_log"]["accepting"]
        spool.write([log_row("after")])
        acked.append("after")
        assert spool.flush(timeout=30)
        health = gateway.ready()
        assert not health["degraded"] and health["inference_log"]["last_commit_at"]
        assert_exactly_once(lake, acked)
        assert "refused" not in set(lake.read(INFERENCE_LOG)["request_id"])
    finally:
        for writer in (gateway.log_writer, gateway.feedback_writer) if gateway else ():
            writer.close(timeout=5)  # before the disks go
        for disk in (spool_disk, lake_disk):
            subprocess.run(["umount", "-l", str(disk)], check=False, capture_output=True)


def test_a_concurrent_writer_to_the_same_table(tmp_path):
    lake, spool_dir = DeltaLake(tmp_path / "lake"), tmp_path / "spool"
    lake.append(INFERENCE_LOG, [log_row("seed", 100)])  # both writers append to an existing table
    other = child("other", lake.uri(INFERENCE_LOG), "40")
    spool = SpooledAppender(lake, INFERENCE_LOG, spool_dir, flush_seconds=0.01).start()
    ours = []
    while other.poll() is None:
        spool.write([log_row(f"ours-{len(ours)}", 500)])
        ours.append(f"ours-{len(ours)}")
        time.sleep(0.005)
    out, err = other.communicate()
    assert other.returncode == 0, err[-2000:]
    assert spool.close(timeout=30)
    assert_exactly_once(lake, ["seed", *ours, *out.split()])
    assert lake.count(INFERENCE_LOG) == 1 + len(ours) + 40
    from deltalake import DeltaTable

    assert len(DeltaTable(lake.uri(INFERENCE_LOG)).history()) > 42  # the spool's commits among the other's 40


def test_a_changed_table_schema_degrades_ready_and_metrics_count_it(tmp_path, gateway_factory):
    import pyarrow as pa
    from deltalake import write_deltalake
    from prometheus_client import generate_latest

    from coinyear.serve.errors import ApiError

    gateway = gateway_factory(tmp_path / "home")
    spool = gateway.log_writer
    assert gateway.ready()["degraded"] is False and gateway.ready()["inference_log"]["ok"]
    # an upgrade changed the table: status_code is now a string, and our int32 rows no longer fit
    write_deltalake(gateway.lake.uri(INFERENCE_LOG), pa.table({"request_id": ["old"], "status_code": ["200"]}),
                    mode="append")
    spool.write([log_row("x")])
    # the segment is counted when its file moves and leaves the pending count just after: wait for both
    wait_for(lambda: spool.health()["quarantined_segments"] == 1 and spool.health()["pending_rows"] == 0)
    ready = gateway.ready()  # 200: the log still takes writes
    assert ready["degraded"] and ready["inference_log"]["accepting"] and not ready["inference_log"]["ok"]
    assert ready["inference_log"]["pending_rows"] == 0
    metrics = generate_latest(gateway.metrics.registry).decode()
    assert 'coinyear_spool_quarantined_segments{table="inference_log"} 1.0' in metrics
    assert 'coinyear_spool_ok{table="inference_log"} 0.0' in metrics
    assert 'coinyear_spool_accepting{table="feedback"} 1.0' in metrics
    quarantined = list((spool.dir / "quarantine").glob("*.seg"))
    assert len(quarantined) == 1 and (spool.dir / "quarantine" / f"{quarantined[0].name}.error").exists()
    spool.close(timeout=5)
    with pytest.raises(ApiError) as not_ready:
        gateway.ready()
    assert not_ready.value.status == 503
    assert 'coinyear_spool_accepting{table="inference_log"} 0.0' in generate_latest(gateway.metrics.registry).decode()


def test_a_restart_on_a_long_outages_backlog_stays_in_bounded_memory(tmp_path):
    """Before: start() loaded every leftover segment to count its rows, so a gateway restarted after a long lake
    outage held the whole backlog in memory (and, past the machine's memory, crashed at every restart). A real
    process restarted on 96 MB of segments must peak within 32 MB of one restarted on an empty spool."""
    from coinyear.lake.segments import encode_frame

    lake = DeltaLake(tmp_path / "lake")
    empty, backlog = tmp_path / "empty", tmp_path / "backlog"
    empty.mkdir()
    backlog.mkdir()
    for seq in range(1, 25):  # 24 segments of 4 rows of ~1 MB: what the outage left
        rows = [log_row(f"{seq}-{i}", photo=1_000_000) for i in range(4)]
        (backlog / f"{seq:012d}.seg").write_bytes(b"".join(encode_frame(lake.storable(INFERENCE_LOG, [row]))
                                                           for row in rows))
    left = sum(path.stat().st_size for path in backlog.glob("*.seg"))
    peaks = {}
    for name, folder in (("empty", empty), ("backlog", backlog)):
        done = child("backlog", str(lake.root), str(folder))
        out, err = done.communicate(timeout=300)
        assert done.returncode == 0, err[-3000:]
        peaks[name] = json.loads(out.strip().splitlines()[-1])
    assert peaks["empty"]["backlog"] == 0 and peaks["backlog"]["backlog"] == 96
    grew_mb = (peaks["backlog"]["peak_kb"] - peaks["empty"]["peak_kb"]) / 1024
    assert left > 90e6 and grew_mb < 32, f"{left / 1e6:.0f} MB left behind; the restart grew by {grew_mb:.0f} MB"
    assert all((backlog / f"{seq:012d}.seg").exists() for seq in range(1, 25))  # nothing consumed
