"""Lake stage: the Delta Lake tables every later stage reads and writes.

`Lake(settings)` is the one API; `settings.lake_backend` picks the engine behind it. `delta` (the default,
`DeltaLake`, this module) uses delta-rs, no Spark. `spark` (`coinyear.lake_spark.SparkLake`) writes catalog
tables `<lake_schema>.<table>` through the job's Spark session: Unity Catalog tables on Databricks, where
delta-rs cannot commit to a volume. The contract both keep is in `Lake`'s docstring.

With delta-rs, tables live under `settings.lake_root`: a local folder by default (COINYEAR_HOME/lake), or any delta-rs URI
(`s3://...`, `abfss://...`, `dbfs:/...` mounted) at scale; credentials come from the usual environment
variables delta-rs reads. delta-rs appends from several concurrent writers can fail under contention, so each
table has one writer process: the gateway writes `inference_log` and `feedback`, the retraining job writes
`model_decisions` and `training_data`, monitoring writes `monitoring`.

`Lake(settings).append(table, rows)` appends; `Lake(settings).read(table)` returns a pandas DataFrame (an empty
one with the right columns while a table does not exist yet). `SpooledAppender` makes appends durable before
they reach Delta: see its docstring.

inference_log (one row per input row of a scoring request; partitioned by `date`)
    request_id         string     unique per row: "<uuid>" for a one-row request, "<uuid>-<i>" for row i of a
                                  several-row request (the uuid is the `x-request-id` response header)
    http_request_id    string     the uuid shared by all rows of one HTTP request
    row_index          int32      position of the row in its request (0-based)
    client_request_id  string     `client_request_id` from the request body, if the client sent one
    timestamp          timestamp[us, UTC]  when the request arrived
    date               date32     UTC date of `timestamp`
    status_code        int32      HTTP status answered (200, 400, 413, 503, ...)
    error_code         string     MLflow error code (BAD_REQUEST, INVALID_PARAMETER_VALUE, ...); null on 200
    error_message      string     the message answered; null on 200
    execution_time_ms  float64    time from request arrival to answer
    endpoint_name      string     `{name}` of /serving-endpoints/{name}/invocations, null for /invocations
    model_name         string     registered model that answered (null when none was loaded)
    model_version      string     its version
    prediction         float64    predicted year (negative = BC); null unless status 200
    front_image        binary     decoded front photo bytes; null when missing or not base64
    back_image         binary     decoded back photo bytes; null when missing or not base64
    front_image_bytes  int64      size of front_image (null when null)
    back_image_bytes   int64      size of back_image
    request_metadata   string     JSON: input format, params, row count, user agent

feedback (one row per expert correction)
    request_id         string     `request_id` of the inference_log row it corrects
    year_from          int32      earliest year the expert gives (negative = BC, never 0)
    year_to            int32      latest year (equal to year_from for an exact year)
    timestamp          timestamp[us, UTC]
    source             string     who or what gave it (e.g. "ui", "api"); nullable
    note               string     free text; nullable

model_decisions, monitoring, training_data: schema on first write (new columns are merged in later).
"""

from __future__ import annotations

import fcntl
import logging
import os
import pickle
import struct
import threading
import time
import uuid
import zlib
from concurrent.futures import Future
from pathlib import Path

import pandas as pd
import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

log = logging.getLogger(__name__)

INFERENCE_LOG = "inference_log"
FEEDBACK = "feedback"
MODEL_DECISIONS = "model_decisions"
MONITORING = "monitoring"
TRAINING_DATA = "training_data"
TABLES = (INFERENCE_LOG, FEEDBACK, MODEL_DECISIONS, MONITORING, TRAINING_DATA)

UTC_TIMESTAMP = pa.timestamp("us", tz="UTC")

SCHEMAS: dict[str, pa.Schema] = {
    INFERENCE_LOG: pa.schema([
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("http_request_id", pa.string()),
        pa.field("row_index", pa.int32()),
        pa.field("client_request_id", pa.string()),
        pa.field("timestamp", UTC_TIMESTAMP),
        pa.field("date", pa.date32()),
        pa.field("status_code", pa.int32()),
        pa.field("error_code", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("execution_time_ms", pa.float64()),
        pa.field("endpoint_name", pa.string()),
        pa.field("model_name", pa.string()),
        pa.field("model_version", pa.string()),
        pa.field("prediction", pa.float64()),
        pa.field("front_image", pa.binary()),
        pa.field("back_image", pa.binary()),
        pa.field("front_image_bytes", pa.int64()),
        pa.field("back_image_bytes", pa.int64()),
        pa.field("request_metadata", pa.string()),
    ]),
    FEEDBACK: pa.schema([
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("year_from", pa.int32()),
        pa.field("year_to", pa.int32()),
        pa.field("timestamp", UTC_TIMESTAMP),
        pa.field("source", pa.string()),
        pa.field("note", pa.string()),
    ]),
}
PARTITIONS: dict[str, list[str]] = {INFERENCE_LOG: ["date"]}

Rows = list[dict] | pd.DataFrame | pa.Table


class Lake:
    """The lake's tables behind one API; `Lake(settings)` gives the backend `settings.lake_backend` names.

    `Lake(settings)` with `lake_backend=delta` (the default) or `Lake(root)` (a path or URI) is a `DeltaLake`;
    `lake_backend=spark` gives a `coinyear.lake_spark.SparkLake` (tables `<lake_schema>.<table>` written through
    the job's Spark session). Both keep the same contract, tested against both in tests/system/test_lake_spark.py:

    - `append(table, rows, transaction=(app_id, version))` appends rows in one write; a `transaction` whose
      version is not above `committed_version(table, app_id)` writes nothing and returns 0 (exactly once);
    - `version(table)` names the table's state after each append (-1: no table), and
      `read(table, version=v)` reads the rows of that state back (the tables are append-only);
    - `read` of a table that does not exist yet is an empty frame with the table's columns.
    """

    def __new__(cls, settings_or_root=None, *args, **kwargs):
        backend = cls
        if cls is Lake:
            if getattr(settings_or_root, "lake_backend", "delta") == "spark":
                from coinyear.lake_spark import SparkLake

                backend = SparkLake
            else:
                backend = DeltaLake
        return super().__new__(backend)

    def uri(self, table: str) -> str:
        """Where the table lives: a Delta table URI, or a Spark table name."""
        raise NotImplementedError

    def exists(self, table: str) -> bool:
        raise NotImplementedError

    def append(self, table: str, rows: Rows, *, transaction: tuple[str, int] | None = None,
               metadata: dict[str, str] | None = None) -> int:
        raise NotImplementedError

    def committed_version(self, table: str, app_id: str) -> int | None:
        raise NotImplementedError

    def version(self, table: str) -> int:
        raise NotImplementedError

    def read(self, table: str, columns: list[str] | None = None, filters=None,
             version: int | None = None) -> pd.DataFrame:
        raise NotImplementedError

    def count(self, table: str) -> int:
        raise NotImplementedError

    def to_arrow(self, table: str, rows: Rows) -> pa.Table:
        """Rows as an Arrow table, cast to the table's schema when it has one."""
        schema = SCHEMAS.get(table)
        if isinstance(rows, pa.Table):
            return rows.select(schema.names).cast(schema) if schema is not None else rows
        if isinstance(rows, pd.DataFrame):
            if schema is None:
                return pa.Table.from_pandas(rows, preserve_index=False)
            return pa.Table.from_pandas(rows[schema.names], schema=schema, preserve_index=False)
        rows = list(rows)
        if schema is None:
            return pa.Table.from_pylist(rows)
        return pa.Table.from_pylist(rows, schema=schema)

    def storable(self, table: str, rows: Rows) -> pa.Table:
        """`to_arrow`, with all-null columns of a table without a fixed schema typed as strings (neither Delta nor
        Parquet can store Arrow's null type)."""
        data = self.to_arrow(table, rows)
        if table not in SCHEMAS:
            for name in data.column_names:
                if pa.types.is_null(data.schema.field(name).type):
                    data = data.set_column(data.schema.get_field_index(name), name, data[name].cast(pa.string()))
        return data

    @staticmethod
    def already_committed(done: int | None, transaction: tuple[str, int] | None) -> bool:
        return transaction is not None and done is not None and transaction[1] <= done

    def empty(self, table: str, columns: list[str] | None = None) -> pd.DataFrame:
        """What reading a table that does not exist yet gives: no rows, the schema's columns (none when the
        table has no fixed schema)."""
        schema = SCHEMAS.get(table)
        if schema is None:
            return pd.DataFrame(columns=columns or [])
        empty = schema.empty_table()
        return (empty.select(columns) if columns else empty).to_pandas()


class DeltaLake(Lake):
    """The Delta tables under one root (`settings.lake_root`, or a root URI/path given directly), via delta-rs."""

    def __init__(self, settings_or_root):
        root = settings_or_root if isinstance(settings_or_root, (str, Path)) else settings_or_root.lake_root
        self.root = str(root).rstrip("/")

    def uri(self, table: str) -> str:
        return f"{self.root}/{table}"

    def exists(self, table: str) -> bool:
        return DeltaTable.is_deltatable(self.uri(table))

    def append(self, table: str, rows: Rows, *, transaction: tuple[str, int] | None = None,
               metadata: dict[str, str] | None = None) -> int:
        """Append rows in one Delta commit; returns how many (0 when `transaction` was already committed).

        `transaction=(app_id, version)` records an idempotent-write marker in the same commit (Delta's
        `txn` action): `committed_version(table, app_id)` then tells which writes already landed. The check
        before the write assumes the table's one writer (see the module docstring).
        """
        data = self.storable(table, rows)
        if data.num_rows == 0:
            return 0
        if transaction is not None and self.already_committed(self.committed_version(table, transaction[0]),
                                                              transaction):
            log.info("%s: transaction %s already committed, nothing appended", table, transaction)
            return 0
        properties = CommitProperties(
            custom_metadata=metadata,
            app_transactions=[Transaction(*transaction)] if transaction else None,
        )
        write_deltalake(self.uri(table), data, mode="append", partition_by=PARTITIONS.get(table),
                        schema_mode=None if table in SCHEMAS else "merge", commit_properties=properties)
        return data.num_rows

    def committed_version(self, table: str, app_id: str) -> int | None:
        """The last `transaction` version committed for `app_id`, None when none (or no table yet)."""
        if not self.exists(table):
            return None
        return DeltaTable(self.uri(table)).transaction_version(app_id)

    def version(self, table: str) -> int:
        """The table's current Delta version, -1 while it does not exist."""
        return DeltaTable(self.uri(table)).version() if self.exists(table) else -1

    def read(self, table: str, columns: list[str] | None = None, filters=None,
             version: int | None = None) -> pd.DataFrame:
        """The whole table (or `columns`, rows matching pyarrow-style `filters`) as pandas, at its latest
        version or at Delta version `version` (time travel).

        A table that does not exist yet reads as an empty frame with its schema's columns (no columns when the
        table has no fixed schema).
        """
        if not self.exists(table):
            return self.empty(table, columns)
        return DeltaTable(self.uri(table), version=version).to_pandas(columns=columns, filters=filters)

    def count(self, table: str) -> int:
        return DeltaTable(self.uri(table)).count() if self.exists(table) else 0


# ------------------------------------------------------------------------------------------------ spool
FRAME_HEADER = struct.Struct("<II")  # payload length, crc32 of the payload


def _frame(records: list[dict]) -> bytes:
    payload = pickle.dumps(records, protocol=pickle.HIGHEST_PROTOCOL)
    return FRAME_HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def read_segment(path: Path) -> list[dict]:
    """Every complete record of a spool segment; a torn tail (never acknowledged) is ignored."""
    data, records, offset = path.read_bytes(), [], 0
    while offset + FRAME_HEADER.size <= len(data):
        length, crc = FRAME_HEADER.unpack_from(data, offset)
        payload = data[offset + FRAME_HEADER.size:offset + FRAME_HEADER.size + length]
        if len(payload) < length or zlib.crc32(payload) != crc:
            log.warning("spool segment %s: torn record at byte %d ignored", path.name, offset)
            break
        records.extend(pickle.loads(payload))
        offset += FRAME_HEADER.size + length
    return records


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SpooledAppender:
    """Durable, batched appends to one Delta table: the table's single writer.

    `write(records)` returns once the records are fsync'ed in a local spool segment, so whatever a caller
    acknowledged after `write` survives `kill -9`; `submit(records)` does the same through a future (for event
    loops). One syncer thread writes everything queued since its last fsync with one write + fsync (group
    commit). One committer thread seals the current segment every `flush_seconds`, appends the sealed segments
    to Delta in one commit and then deletes them; a failed commit is retried with backoff and nothing is dropped.

    Replay is idempotent: each commit carries a Delta transaction marker (app id of this spool folder, version =
    the last segment number in the commit), so after a crash between the commit and the deletion of the
    segment files, `start()` sees the segments as committed and only deletes them.
    """

    SUFFIX = ".seg"

    def __init__(self, lake: Lake, table: str, spool_dir: str | Path, flush_seconds: float = 1.0,
                 max_commit_rows: int = 5000):
        self.lake, self.table = lake, table
        self.dir = Path(spool_dir)
        self.flush_seconds, self.max_commit_rows = flush_seconds, max_commit_rows
        self.dir.mkdir(parents=True, exist_ok=True)
        id_file = self.dir / "spool_id"
        if not id_file.exists():
            id_file.write_text(uuid.uuid4().hex)
        self.app_id = f"coinyear-spool:{table}:{id_file.read_text().strip()}"
        self.backlog = 0  # records spooled, not yet in Delta
        self.committed_rows = 0
        self.last_error: str | None = None
        self._lock = threading.Lock()  # guards the pending queue and counters
        self._file_lock = threading.Lock()  # the syncer's writes vs the committer's sealing
        self._pending: list[tuple[bytes, int, Future]] = []
        self._has_pending = threading.Condition(self._lock)
        self._closing = False
        self._syncer: threading.Thread | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._file = None
        self._segment_seq = 0
        self._segment_rows = 0
        self._lock_file = None
        self._committed: int | None = None  # last segment known committed (the committer is the only writer)

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
        # segment numbers never repeat, even after the folder was emptied: a reused number would look committed
        high_water = self.dir / "last_segment"
        high_water.with_suffix(".tmp").write_text(str(seq))
        high_water.with_suffix(".tmp").replace(high_water)
        self._segment_seq, self._segment_rows = seq, 0
        self._file = open(self.dir / f"{seq:012d}{self.SUFFIX}", "ab")
        _fsync_dir(self.dir)

    def _next_seq(self) -> int:
        candidates = [seq for seq, _ in self._segments()]
        high_water = self.dir / "last_segment"
        if high_water.exists():
            candidates.append(int(high_water.read_text().strip() or 0))
        try:
            candidates.append(self.lake.committed_version(self.table, self.app_id) or 0)
        except Exception as error:  # an unreachable lake must not stop the spool from taking writes
            log.warning("cannot read %s's commit markers at start: %s", self.table, error)
        return max(candidates, default=0) + 1

    def _seal(self) -> bool:
        """Close the current segment (if it holds anything) and open the next one."""
        with self._file_lock:
            if self._file is None or self._segment_rows == 0:
                return False
            self._file.close()
            self._open_segment(self._segment_seq + 1)
            return True

    # -------------------------------------------------------------------------------------- lifecycle
    def start(self) -> SpooledAppender:
        """Count what an earlier process left in the spool, open a fresh segment and start committing.

        The spool folder is locked for the life of this appender (released by the OS even on kill -9): a second
        process on the same folder would commit and delete segments the first one is still writing.
        """
        self._lock_file = open(self.dir / "lock", "a")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            self._lock_file.close()
            raise RuntimeError(f"spool {self.dir} is in use by another process (one writer per table)") from error
        segments = self._segments()
        self.backlog = sum(len(read_segment(path)) for _, path in segments)
        self._open_segment(self._next_seq())
        self._syncer = threading.Thread(target=self._sync, name=f"spool-sync-{self.table}", daemon=True)
        self._syncer.start()
        self._thread = threading.Thread(target=self._run, name=f"lake-committer-{self.table}", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> bool:
        """Commit everything spooled (waiting up to `timeout`) and stop; True when nothing is left behind."""
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
        """Seal and commit everything written so far; True when the backlog reached zero in time."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        while time.monotonic() < deadline:
            if self.backlog == 0:
                return True
            self._wake.set()
            time.sleep(0.02)
        return self.backlog == 0

    # ------------------------------------------------------------------------------------------ write
    def submit(self, records: list[dict]) -> Future:
        """Queue records for the spool; the future completes once they are fsync'ed (or fails)."""
        future: Future = Future()
        if not records:
            future.set_result(None)
            return future
        frame = _frame(records)
        with self._has_pending:
            if self._file is None:
                raise RuntimeError(f"spool for {self.table} is not open")
            self._pending.append((frame, len(records), future))
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
            rows = sum(count for _, count, _ in batch)
            try:
                with self._file_lock:
                    good = self._file.tell()
                    try:
                        self._file.write(b"".join(frame for frame, _, _ in batch))
                        self._file.flush()
                        os.fsync(self._file.fileno())
                    except OSError:
                        self._file.truncate(good)  # no torn frame may hide the records written after it
                        raise
                    self._segment_rows += rows
                with self._lock:
                    self.backlog += rows
            except Exception as error:
                for _, _, future in batch:
                    future.set_exception(error)
                continue
            for _, _, future in batch:
                future.set_result(None)

    # ----------------------------------------------------------------------------------------- commit
    def _run(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            self._wake.wait(timeout=backoff or self.flush_seconds)
            self._wake.clear()
            self._seal()
            try:
                self._commit_sealed()
                backoff, self.last_error = 0.0, None
            except Exception as error:  # the lake may be briefly unavailable: keep the spool, retry later
                self._committed = None  # the failed commit may have landed: read the markers again
                self.last_error = f"{type(error).__name__}: {error}"
                backoff = min(max(backoff * 2, 0.5), 30.0)
                log.warning("commit to %s failed (retrying in %.1fs): %s", self.table, backoff, self.last_error)

    def _commit_sealed(self) -> None:
        sealed = [(seq, path) for seq, path in self._segments() if seq != self._segment_seq]
        if not sealed:
            return
        if self._committed is None:  # at start, and after a failure whose outcome is unknown
            self._committed = self.lake.committed_version(self.table, self.app_id) or 0
        committed = self._committed
        while sealed:
            batch, parts, rows = [], [], 0
            while sealed and rows < self.max_commit_rows:
                seq, path = sealed.pop(0)
                segment_records = read_segment(path)
                if seq <= committed:  # landed before a crash; only the deletion was lost
                    self._forget(path, len(segment_records))
                    continue
                try:
                    parts.append(self.lake.to_arrow(self.table, segment_records))
                except (pa.ArrowException, TypeError, ValueError, KeyError) as error:
                    # a segment that can never fit the table must not block the ones behind it
                    rejected = self.dir / "rejected"
                    rejected.mkdir(exist_ok=True)
                    path.replace(rejected / path.name)
                    self._forget(None, len(segment_records))
                    log.error("spool segment %s does not fit %s, moved to %s: %s", path.name, self.table,
                              rejected, error)
                    continue
                batch.append((seq, path, len(segment_records)))
                rows += len(segment_records)
            if not batch:
                continue
            last_seq = batch[-1][0]
            self.lake.append(self.table, pa.concat_tables(parts, promote_options="default"),
                             transaction=(self.app_id, last_seq),
                             metadata={"spool_segments": f"{batch[0][0]}-{last_seq}", "spool_id": self.app_id})
            committed = self._committed = last_seq
            for _, path, count in batch:
                self._forget(path, count)
                self.committed_rows += count

    def _forget(self, path: Path | None, rows: int) -> None:
        if path is not None:
            path.unlink()
        with self._lock:
            self.backlog -= rows
