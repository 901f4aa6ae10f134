"""Lake stage, the spool: durable, batched appends to one table (`SpooledAppender`), the gateway's way to write
`inference_log` and `feedback`, and `replay_quarantine` for segments the table refused.

Written records are fsync'ed in local segment files (their format: `coinyear.lake.segments`) before their caller
hears back, then committed to the lake (either backend) by one committer thread, exactly once: see
`SpooledAppender`. This module is longer than most (about 500 lines) because `SpooledAppender` is one class of
about 380: its syncer and committer threads share two locks, the current segment and the backlog counters, and
split across modules that locking could no longer be read in one place.
"""

from __future__ import annotations

import fcntl
import logging
import os
import pickle
import re
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, TextIO

import pyarrow as pa
from deltalake.exceptions import CommitFailedError, DeltaError, SchemaMismatchError

from coinyear.lake.segments import append_synced, count_rows, encode_frame, fsync_dir, read_frames
from coinyear.lake.tables import Lake

log = logging.getLogger(__name__)

SCHEMA_MESSAGE = re.compile(r"cast error|cannot cast|schema", re.IGNORECASE)


class SpoolClosedError(RuntimeError):
    """The spool is closing or closed: it takes no more writes."""


class SpoolRecordError(ValueError):
    """Records that do not fit the table: refused at `submit`, nothing of them was spooled."""


def permanent_failure(error: BaseException) -> bool:
    """Whether writing the same rows again can never work: they do not convert to, or do not fit, the table.

    Everything else (I/O errors, a full disk, a lock, a commit conflict, a lake that is down) is transient.
    """
    if isinstance(error, (OSError, ConnectionError, TimeoutError, CommitFailedError)):
        return False
    if isinstance(error, (SchemaMismatchError, pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError,
                          TypeError, ValueError, KeyError, pickle.UnpicklingError)):
        return True
    sql_state = getattr(error, "getSqlState", None)
    state = sql_state() if callable(sql_state) else None
    if state:  # Spark's errors: SQLSTATE class 22 (data: a value that does not cast) or 42 (schema, analysis)
        return state[:2] in ("22", "42")
    if any(cls.__name__ == "AnalysisException" for cls in type(error).__mro__):
        return True  # Spark refused the write itself (schema, types); a lake that is down fails otherwise
    # delta-rs raises cast and schema-merge errors as plain exceptions, and I/O errors as DeltaError
    return type(error) in (Exception, DeltaError) and bool(SCHEMA_MESSAGE.search(str(error)))


@dataclass
class _Segment:
    seq: int
    path: Path
    frames: list
    rows: int
    size: int


class SpooledAppender:
    """Durable, batched appends to one Delta table: the table's single writer.

    `write(records)` converts the records to the table's schema (a record that does not fit fails its caller with
    `SpoolRecordError`, nothing spooled) and returns once they are fsync'ed in a local spool segment, so whatever
    a caller acknowledged after `write` survives `kill -9`; `submit(records)` does the same through a future (for
    event loops). Once `close()` has begun both raise `SpoolClosedError` at once. One syncer thread writes
    everything queued since its last fsync with one write + fsync (group commit) and starts a new segment past
    `max_commit_bytes`. One committer thread seals the current segment every `flush_seconds`, appends sealed
    segments to Delta in commits of at most `max_commit_bytes` (rows carry photos: a row count bounds nothing;
    only a single group write larger than that makes a larger commit) and then deletes them.

    A failed commit keeps the segments. A transient failure (I/O, full disk, lock, conflict, lake down) is
    retried with backoff, without limit. A permanent one (rows that do not convert to or fit the table, e.g. its
    schema changed) is retried segment by segment; a segment that failed alone `max_attempts` times is moved to
    `quarantine/` in the spool folder (kept, with a `.error` note) and the segments behind it commit;
    `replay_quarantine` commits it once the table takes its rows (then its file goes), and one moved back into
    the spool by hand returns to quarantine. `health()` reports all of it.

    Replay is idempotent: each commit carries a Delta transaction marker (app id of this spool folder, version =
    the last segment number in the commit), so after a crash between the commit and the deletion of the
    segment files, `start()` sees the segments as committed and only deletes them.
    """

    SUFFIX = ".seg"

    def __init__(self, lake: Lake, table: str, spool_dir: str | Path, flush_seconds: float = 1.0,
                 max_commit_bytes: int = 64 * 1024 * 1024, max_attempts: int = 3):
        self.lake, self.table = lake, table
        self.dir = Path(spool_dir)
        self.quarantine_dir = self.dir / "quarantine"
        self.flush_seconds, self.max_commit_bytes, self.max_attempts = flush_seconds, max_commit_bytes, max_attempts
        self.dir.mkdir(parents=True, exist_ok=True)
        id_file = self.dir / "spool_id"
        if not id_file.exists():
            id_file.write_text(uuid.uuid4().hex)
        self.app_id = f"coinyear-spool:{table}:{id_file.read_text().strip()}"
        self.backlog = 0  # records spooled, not yet in Delta
        self.backlog_bytes = 0  # their size in the spool
        self.committed_rows = 0
        self.last_error: str | None = None  # of the last commit round; None once one succeeds
        self.write_error: str | None = None  # of the last spool write; None once one succeeds
        self.last_quarantine_error: str | None = None
        self.last_commit_at: datetime | None = None
        self._lock = threading.Lock()  # guards the pending queue and counters
        self._file_lock = threading.Lock()  # the syncer's writes vs the committer's sealing
        self._pending: list[tuple[bytes, int, Future]] = []
        self._has_pending = threading.Condition(self._lock)
        self._closing = False
        self._syncer: threading.Thread | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._file: BinaryIO | None = None
        self._segment_seq = 0
        self._segment_rows = 0
        self._segment_bytes = 0  # what the current segment holds of acknowledged frames (the file may hold less)
        self._lock_file: TextIO | None = None
        self._committed: int | None = None  # last segment known committed (the committer is the only writer)
        self._failures: dict[int, int] = {}  # segment -> permanent failures so far

    # ---------------------------------------------------------------------------------------- segments
    def _segments(self) -> list[tuple[int, Path]]:
        found = []
        for path in self.dir.glob(f"*{self.SUFFIX}"):
            try:
                found.append((int(path.stem), path))
            except ValueError:
                continue
        return sorted(found)

    def _open_segment(self, seq: int) -> None:
        """Continue in segment `seq` (file lock held, or no threads yet); on failure the current one stays open."""
        # segment numbers never repeat, even after the folder was emptied: a reused number would look committed
        high_water = self.dir / "last_segment"
        high_water.with_suffix(".tmp").write_text(str(seq))
        high_water.with_suffix(".tmp").replace(high_water)
        # unbuffered: nothing of a failed write may stay behind to be written later (see append_synced)
        new = open(self.dir / f"{seq:012d}{self.SUFFIX}", "ab", buffering=0)  # noqa: SIM115 - open for its life
        fsync_dir(self.dir)
        old, self._file = self._file, new
        self._segment_seq, self._segment_rows, self._segment_bytes = seq, 0, os.fstat(new.fileno()).st_size
        if old is not None:
            old.close()

    def _next_seq(self) -> int:
        candidates = [seq for seq, _ in self._segments()]
        high_water = self.dir / "last_segment"
        if high_water.exists():
            candidates.append(int(high_water.read_text().strip() or 0))
        try:
            candidates.append(self.lake.committed_version(self.table, self.app_id) or 0)
        except Exception as error:  # noqa: BLE001 - an unreachable lake must not stop the spool from taking writes
            log.warning("cannot read %s's commit markers at start: %s", self.table, error)
        return max(candidates, default=0) + 1

    def _seal(self) -> bool:
        """Close the current segment (if it holds anything) and open the next one."""
        with self._file_lock:
            if self._file is None or self._segment_rows == 0:
                return False
            self._open_segment(self._segment_seq + 1)
            return True

    def _load(self, seq: int, path: Path) -> _Segment:
        frames = read_frames(path)
        rows = sum(frame.num_rows if isinstance(frame, pa.Table) else len(frame) for frame in frames)
        return _Segment(seq, path, frames, rows, path.stat().st_size)

    @staticmethod
    def _counted(seq: int, path: Path) -> _Segment:
        """The segment's rows and size without its frames: what the backlog needs, in bounded memory."""
        return _Segment(seq, path, [], count_rows(path), path.stat().st_size)

    # -------------------------------------------------------------------------------------- lifecycle
    def start(self) -> SpooledAppender:
        """Count what an earlier process left in the spool, open a fresh segment and start committing.

        The spool folder is locked for the life of this appender (released by the OS even on kill -9): a second
        process on the same folder would commit and delete segments the first one is still writing.
        """
        self._lock_file = self._take_lock()
        # counted, not loaded: after a long lake outage they may not fit in memory all at once
        left = [self._counted(seq, path) for seq, path in self._segments()]
        self.backlog, self.backlog_bytes = sum(s.rows for s in left), sum(s.size for s in left)
        self._open_segment(self._next_seq())
        self._syncer = threading.Thread(target=self._sync, name=f"spool-sync-{self.table}", daemon=True)
        self._syncer.start()
        self._thread = threading.Thread(target=self._run, name=f"lake-committer-{self.table}", daemon=True)
        self._thread.start()
        return self

    def _take_lock(self) -> TextIO:
        """The spool folder's lock (flock), held until the returned file is closed; RuntimeError when another
        process holds it."""
        lock_file = open(self.dir / "lock", "a")  # noqa: SIM115 - held (flock) until the caller closes it
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            lock_file.close()
            raise RuntimeError(f"spool {self.dir} is in use by another process (one writer per table)") from error
        return lock_file

    def close(self, timeout: float = 30.0) -> bool:
        """Refuse new writes, commit everything spooled (waiting up to `timeout`) and stop; True when nothing is
        left behind (what is left stays in the spool for the next start)."""
        with self._has_pending:
            self._closing = True
            self._has_pending.notify()
        if self._syncer is not None:
            self._syncer.join(timeout=timeout)
        done = self.flush(timeout)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._file_lock:
            if self._file is not None:
                self._file.close()
                self._file = None
                if self._segment_rows == 0:
                    (self.dir / f"{self._segment_seq:012d}{self.SUFFIX}").unlink(missing_ok=True)
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None
        return done

    def flush(self, timeout: float = 30.0) -> bool:
        """Seal and commit everything written so far; True when the backlog reached zero in time.

        It wakes the committer once (cutting a retry's backoff short once): waiting callers never hammer a lake
        that is down.
        """
        deadline = time.monotonic() + timeout
        self._wake.set()
        while self.backlog and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.backlog == 0

    def health(self) -> dict:
        """The spool's state for /ready and /metrics.

        `accepting`: writes can be spooled (started, not closing, the spool's disk takes a write); `ok`: accepting,
        nothing quarantined and no error in the last commit round or spool write. `pending_rows`/`pending_bytes`:
        spooled, not yet in Delta (quarantined segments not counted); `last_commit_at`: ISO time or None.
        """
        accepting = self._accepting()
        with self._lock:
            rows, size = self.backlog, self.backlog_bytes
        quarantined = len(list(self.quarantine_dir.glob(f"*{self.SUFFIX}")))
        last_error = self.write_error or self.last_error
        return {"ok": accepting and not quarantined and last_error is None, "accepting": accepting,
                "quarantined_segments": quarantined, "pending_rows": rows, "pending_bytes": size,
                "last_error": last_error, "last_quarantine_error": self.last_quarantine_error,
                "last_commit_at": self.last_commit_at.isoformat() if self.last_commit_at else None}

    def _accepting(self) -> bool:
        if self._file is None or self._closing or self._syncer is None or not self._syncer.is_alive():
            return False
        if self.write_error is None:
            return True
        try:  # the last write failed (e.g. a full disk): whether a write works now
            probe = self.dir / "probe"
            with open(probe, "wb") as file:
                file.write(bytes(4096))
                file.flush()
                os.fsync(file.fileno())
            probe.unlink()
        except OSError:
            return False
        self.write_error = None
        return True

    # ------------------------------------------------------------------------------------------ write
    def submit(self, records: list[dict]) -> Future:
        """Queue records for the spool; the future completes once they are fsync'ed (or fails).

        Raises `SpoolRecordError` at once for records that do not fit the table, `SpoolClosedError` once
        `close()` has begun.
        """
        future: Future = Future()
        if not records:
            future.set_result(None)
            return future
        try:
            data = self.lake.storable(self.table, records)
        except (pa.ArrowException, TypeError, ValueError, KeyError) as error:
            raise SpoolRecordError(f"records do not fit {self.table}: {error}") from error
        frame = encode_frame(data)
        with self._has_pending:
            if self._closing or self._file is None:
                raise SpoolClosedError(f"spool for {self.table} is {'closing' if self._file else 'not open'}: "
                                       "it takes no more writes")
            self._pending.append((frame, data.num_rows, future))
            self._has_pending.notify()
        return future

    def write(self, records: list[dict]) -> None:
        """Append records to the spool; returns when they are on disk (fsync'ed)."""
        self.submit(records).result()

    def _sync(self) -> None:
        """The syncer thread: everything queued since the last fsync goes to disk in one write + fsync."""
        while True:
            with self._has_pending:
                while not self._pending and not self._closing:
                    self._has_pending.wait()
                if not self._pending:
                    return
                batch, self._pending = self._pending, []
            rows, data = sum(count for _, count, _ in batch), b"".join(frame for frame, _, _ in batch)
            try:
                with self._file_lock:
                    file = self._file
                    assert file is not None, "start() opens a segment before the syncer runs"
                    append_synced(file.fileno(), data, self._segment_bytes)
                    self._segment_rows += rows
                    self._segment_bytes += len(data)
                    with self._lock:
                        self.backlog += rows
                        self.backlog_bytes += len(data)
                    self.write_error = None
                    if self._segment_bytes >= self.max_commit_bytes:
                        self._roll()
            except Exception as error:  # noqa: BLE001 - whatever it is, each waiting writer must hear of it
                self.write_error = f"{type(error).__name__}: {error}"
                log.error("spool write to %s failed: %s", self.dir, self.write_error)
                for _, _, future in batch:
                    future.set_exception(error)
                continue
            for _, _, future in batch:
                future.set_result(None)

    def _roll(self) -> None:
        """A full segment is sealed here, so that one segment fits one commit (file lock held)."""
        try:
            self._open_segment(self._segment_seq + 1)
        except OSError as error:  # the records are safe in the current segment, which simply grows on
            log.warning("spool %s: cannot start a new segment (%s)", self.dir, error)

    # ----------------------------------------------------------------------------------------- commit
    def _run(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            self._wake.wait(timeout=backoff or self.flush_seconds)
            self._wake.clear()
            try:
                self._seal()
                self._commit_sealed()
                backoff, self.last_error = 0.0, None
            except Exception as error:  # noqa: BLE001 - kept in the spool, retried: see the class docstring
                self._committed = None  # the failed commit may have landed: read the markers again
                self.last_error = f"{type(error).__name__}: {error}"
                backoff = min(max(backoff * 2, self.flush_seconds), 30.0)
                log.warning("commit to %s failed (retrying in %.1fs): %s", self.table, backoff, self.last_error)

    def _commit_sealed(self) -> None:
        """Commit the sealed segments, oldest first, in commits of at most `max_commit_bytes` (one segment per
        commit while one of them is suspected of a permanent failure)."""
        with self._file_lock:  # no segment the syncer may still write to
            current = self._segment_seq
        sealed = [(seq, path) for seq, path in self._segments() if seq < current]
        while sealed:
            if self._committed is None:  # at start, and after a failure whose outcome is unknown
                self._committed = self.lake.committed_version(self.table, self.app_id) or 0
            batch: list[_Segment] = []
            size = 0
            while sealed:
                if sealed[0][0] <= self._committed:  # landed before a crash: only its file is left...
                    segment = self._counted(*sealed.pop(0))
                    if (self.quarantine_dir / f"{segment.path.name}.error").exists():
                        self._back_to_quarantine(segment)  # ...unless it was quarantined: never committed
                    else:
                        self._forget(segment)
                    continue
                if batch and (size + sealed[0][1].stat().st_size > self.max_commit_bytes or self._failures):
                    break  # the batch is full: loaded only once it is its turn (memory: one commit's worth)
                segment = self._load(*sealed.pop(0))
                if not segment.rows:
                    self._forget(segment)
                    continue
                batch.append(segment)
                size += segment.size
            if batch:
                self._commit(batch)

    def _commit(self, batch: list[_Segment]) -> None:
        try:
            data = pa.concat_tables([self.lake.storable(self.table, frame) for s in batch for frame in s.frames],
                                    promote_options="default")
            last = batch[-1].seq
            self.lake.append(self.table, data, transaction=(self.app_id, last),
                             metadata={"spool_segments": f"{batch[0].seq}-{last}", "spool_id": self.app_id})
        except Exception as error:
            self._committed = None
            if not permanent_failure(error):
                raise
            for segment in batch:
                self._failures[segment.seq] = self._failures.get(segment.seq, 0) + 1
            if len(batch) > 1 or self._failures[batch[0].seq] < self.max_attempts:
                raise
            self._quarantine(batch[0], error)
            return
        self._committed = last
        self.last_commit_at = datetime.now(UTC)
        for segment in batch:
            self._forget(segment)
            self.committed_rows += segment.rows

    def _quarantine(self, segment: _Segment, error: Exception) -> None:
        reason = f"{type(error).__name__}: {error}"
        # the reason first: health() counts quarantined files, and a reader must never see the count without it
        self.last_quarantine_error = f"{segment.path.name}: {reason}"
        self.quarantine_dir.mkdir(exist_ok=True)
        (self.quarantine_dir / f"{segment.path.name}.error").write_text(reason + "\n")
        segment.path.replace(self.quarantine_dir / segment.path.name)
        fsync_dir(self.dir)
        log.error("spool segment %s (%d rows) cannot be committed to %s after %d attempts, moved to %s: %s",
                  segment.path.name, segment.rows, self.table, self.max_attempts, self.quarantine_dir, reason)
        self._failures.pop(segment.seq, None)
        self._forget(segment, delete=False)

    def _back_to_quarantine(self, segment: _Segment) -> None:
        """A quarantined segment moved back into the spool: its number is below the commit marker (later segments
        committed), so it would read as committed and be deleted. It goes back to quarantine/ (its note is still
        there), where `replay_quarantine` commits it."""
        self.last_quarantine_error = (f"{segment.path.name}: moved back into the spool from quarantine/, returned "
                                      f"there (replay it with coinyear.lake.spool.replay_quarantine)")
        segment.path.replace(self.quarantine_dir / segment.path.name)
        fsync_dir(self.dir)
        log.error("spool segment %s (%d rows) was quarantined and moved back into %s; it is returned to %s: "
                  "replay_quarantine commits it", segment.path.name, segment.rows, self.dir, self.quarantine_dir)
        self._forget(segment, delete=False)

    def _forget(self, segment: _Segment, delete: bool = True) -> None:
        """The segment is in Delta (or quarantined): off the spool and the backlog."""
        if delete:
            segment.path.unlink()
        self._failures.pop(segment.seq, None)
        with self._lock:
            self.backlog -= segment.rows
            self.backlog_bytes -= segment.size


def replay_quarantine(lake: Lake, table: str, spool_dir: str | Path) -> dict[str, str]:
    """Commit the rows of a spool's quarantined segments that are not in `table` yet; returns what became of each
    segment, by file name: "committed", "already committed", "empty", or "not committed: <why>".

    For an operator, once the table takes the rows again (e.g. its schema was put right). Each segment is one
    commit carrying its own transaction marker (app id `<spool app id>:quarantine:<segment number>`, version 1),
    so a replay run twice, or stopped between a commit and the deletion of the file, commits nothing twice. A
    committed segment's file and note are deleted; one that still fails stays in quarantine/ with its note. It
    takes the spool folder's lock (the table has one writer): run it while the spool's process is stopped.
    """
    spool = SpooledAppender(lake, table, spool_dir)
    lock = spool._take_lock()
    outcomes: dict[str, str] = {}
    try:
        for path in sorted(spool.quarantine_dir.glob(f"*{SpooledAppender.SUFFIX}")):
            try:
                app_id = f"{spool.app_id}:quarantine:{int(path.stem)}"
            except ValueError:
                continue
            try:
                if lake.committed_version(table, app_id) is not None:
                    outcomes[path.name] = "already committed"
                else:
                    frames = read_frames(path)
                    if not frames:
                        outcomes[path.name] = "empty"
                    else:
                        data = pa.concat_tables([lake.storable(table, frame) for frame in frames],
                                                promote_options="default")
                        lake.append(table, data, transaction=(app_id, 1),
                                    metadata={"spool_segments": path.stem, "spool_id": spool.app_id,
                                              "replayed": "quarantine"})
                        outcomes[path.name] = "committed"
            except Exception as error:  # noqa: BLE001 - reported per segment; the others are still replayed
                outcomes[path.name] = f"not committed: {type(error).__name__}: {error}"
                log.warning("quarantined segment %s of %s not replayed: %s", path.name, table, error)
                continue
            path.unlink()
            path.with_name(f"{path.name}.error").unlink(missing_ok=True)
            fsync_dir(spool.quarantine_dir)
    finally:
        lock.close()
    return outcomes

