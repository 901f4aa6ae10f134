"""Lake stage: the Delta Lake tables every later stage reads and writes.

`Lake(settings)` is the one API; `settings.lake_backend` picks the engine behind it. `delta` (the default,
`DeltaLake`, this module) uses delta-rs, no Spark. `spark` (`coinyear.lake_spark.SparkLake`) writes catalog
tables `<lake_schema>.<table>` through the job's Spark session: Unity Catalog tables on Databricks, where
delta-rs cannot commit to a volume. The contract both keep is in `Lake`'s docstring.

With delta-rs, tables live under `settings.lake_root`: a local folder by default (COINYEAR_HOME/lake), or any delta-rs
URI (`s3://...`, `abfss://...`, `dbfs:/...` mounted) at scale; credentials come from the usual environment
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
    execution_time_ms  float64    time from request arrival until the answer was ready and this row went to the
                                  spool: not the spool's fsync that the answer then waits for (a row cannot hold
                                  its own fsync; the gateway's coinyear_request_latency_seconds includes it)
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
    source             string     what sent it (e.g. "ui", "api"), as the client says; nullable
    note               string     free text; nullable
    actor              string     who answers for it, never a token: the gateway's name for the caller's token
                                  (`name` of a `name:token` entry, else `token:<sha256 prefix>`), `anonymous`
                                  without auth; on Databricks what the feedback file says (coinyear.jobs.payloads).
                                  Null in rows written before it existed. Retraining learns only from rows whose
                                  actor is neither null nor `anonymous` (coinyear.jobs.ingest)

A column added to a fixed schema (as `actor`) is added to a table written before it on the next append, and
reads as null in its older rows (and in spool records written before it).

model_decisions, monitoring, training_data: schema on first write (new columns are merged in later).
"""

from __future__ import annotations

import fcntl
import logging
import os
import pickle
import re
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, TextIO, TypeAlias

import pandas as pd
import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, SchemaMismatchError

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
        pa.field("actor", pa.string()),
    ]),
}
PARTITIONS: dict[str, list[str]] = {INFERENCE_LOG: ["date"]}

Rows: TypeAlias = list[dict] | pd.DataFrame | pa.Table


class _PicksBackend(type):
    """`Lake(...)` builds the backend the settings name (a metaclass: SparkLake is built from settings even when
    `Lake` was given a root string, which `__new__` cannot do, as Python then calls `__init__` with the string)."""

    def __call__(cls, settings_or_root=None, *args, **kwargs):
        if cls is not Lake:
            return super().__call__(settings_or_root, *args, **kwargs)
        settings = _settings_of(settings_or_root)
        if getattr(settings, "lake_backend", "delta") == "spark":
            from coinyear.lake_spark import SparkLake

            return SparkLake(settings, *args, **kwargs)
        return DeltaLake(settings if settings is not None else settings_or_root)


def _settings_of(settings_or_root):
    """The settings `Lake(settings_or_root)` follows: the settings given; the process's settings for None or for
    their own `lake_root` as a string (the Monitor page passes that: a string is a cache key); None for any other
    root, which is a delta-rs root."""
    if settings_or_root is not None and not isinstance(settings_or_root, (str, Path)):
        return settings_or_root
    from coinyear.config import get_settings

    configured = get_settings()
    if settings_or_root is None or str(settings_or_root).rstrip("/") == str(configured.lake_root).rstrip("/"):
        return configured
    return None


class Lake(metaclass=_PicksBackend):
    """The lake's tables behind one API; `Lake(settings)` gives the backend `settings.lake_backend` names.

    `Lake(settings)` with `lake_backend=delta` (the default) or `Lake(root)` (a path or URI) is a `DeltaLake`;
    `lake_backend=spark` gives a `coinyear.lake_spark.SparkLake` (tables `<lake_schema>.<table>` written through
    the job's Spark session). `Lake()`, and `Lake(root)` with the configured `lake_root` itself, follow the
    process's settings (COINYEAR_LAKE_BACKEND included). Both keep the same contract, tested against both in
    tests/system/test_lake_spark.py:

    - `append(table, rows, transaction=(app_id, version))` appends rows in one write; a `transaction` whose
      version is not above `committed_version(table, app_id)` writes nothing and returns 0 (exactly once);
    - `version(table)` names the table's state after each append (-1: no table), and
      `read(table, version=v)` reads the rows of that state back (the tables are append-only);
    - `read` of a table that does not exist yet is an empty frame with the table's columns.
    """

    def __init__(self, settings_or_root=None, *args, **kwargs) -> None:
        """What callers pass (settings, a root, or nothing); `_PicksBackend` builds the backend from it."""

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
            if schema is None:
                return rows
            for field in schema:  # a record spooled before a nullable column was added to the schema
                if field.nullable and field.name not in rows.column_names:
                    rows = rows.append_column(field.name, pa.nulls(rows.num_rows, field.type))
            return rows.select(schema.names).cast(schema)
        if isinstance(rows, pd.DataFrame):
            if schema is None:
                return pa.Table.from_pandas(rows, preserve_index=False)
            missing = {f.name: None for f in schema if f.nullable and f.name not in rows.columns}
            rows = rows.assign(**missing) if missing else rows
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

    @staticmethod
    def with_schema_columns(table: str, frame: pd.DataFrame, columns: list[str] | None = None) -> pd.DataFrame:
        """`frame` read from a table written before a column joined its fixed schema, with that column (of those
        in `columns`, or any) as nulls, in the order `columns` asks for."""
        schema = SCHEMAS.get(table)
        if schema is None:
            return frame
        missing = [name for name in (columns or schema.names) if name in schema.names and name not in frame.columns]
        if missing:
            frame = frame.assign(**{name: pd.Series([None] * len(frame), index=frame.index, dtype=object)
                                    for name in missing})
        return frame[columns] if columns else frame

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
        # merge: new columns join the table (a fixed schema's rows are cast to it first, so there only a column
        # added to the schema since the table was written can be new; a type conflict still fails)
        write_deltalake(self.uri(table), data, mode="append", partition_by=PARTITIONS.get(table),
                        schema_mode="merge", commit_properties=properties)
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
        delta = DeltaTable(self.uri(table), version=version)
        if columns and table in SCHEMAS:  # a schema column the table was written without reads as null
            present = {field.name for field in delta.schema().fields}
            frame = delta.to_pandas(columns=[c for c in columns if c in present], filters=filters)
        else:
            frame = delta.to_pandas(columns=columns, filters=filters)
        return self.with_schema_columns(table, frame, columns)

    def count(self, table: str) -> int:
        return DeltaTable(self.uri(table)).count() if self.exists(table) else 0


# ------------------------------------------------------------------------------------------------ spool
FRAME_HEADER = struct.Struct("<II")  # payload length, crc32 of the payload
PICKLED = b"\x80"  # first byte of a pickle: the frames of older versions (a list of dicts); Arrow IPC starts 0xFF
SCHEMA_MESSAGE = re.compile(r"cast error|cannot cast|schema", re.IGNORECASE)


class SpoolClosedError(RuntimeError):
    """The spool is closing or closed: it takes no more writes."""


class SpoolRecordError(ValueError):
    """Records that do not fit the table: refused at `submit`, nothing of them was spooled."""


def _frame(data: pa.Table | list[dict]) -> bytes:
    """One spool record: an Arrow IPC stream (a list of dicts is pickled, the format of older versions)."""
    if isinstance(data, pa.Table):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, data.schema) as writer:
            writer.write_table(data)
        payload = sink.getvalue().to_pybytes()
    else:
        payload = pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)
    return FRAME_HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _payloads(path: Path) -> Iterator[bytes]:
    """The payload of each complete frame of a spool segment, read one at a time; a torn tail (never
    acknowledged) is ignored."""
    with open(path, "rb") as file:
        offset = 0
        while len(header := file.read(FRAME_HEADER.size)) == FRAME_HEADER.size:
            length, crc = FRAME_HEADER.unpack(header)
            payload = file.read(length)
            if len(payload) < length or zlib.crc32(payload) != crc:
                log.warning("spool segment %s: torn record at byte %d ignored", path.name, offset)
                return
            yield payload
            offset += FRAME_HEADER.size + length


def _read_frames(path: Path) -> list[pa.Table | list[dict]]:
    """Every complete frame of a spool segment; a torn tail (never acknowledged) is ignored."""
    return [pickle.loads(payload) if payload[:1] == PICKLED else pa.ipc.open_stream(payload).read_all()
            for payload in _payloads(path)]


def _count_rows(path: Path) -> int:
    """The records in a spool segment, counted in the memory of one frame (an Arrow frame's batches are counted
    from their metadata, never copied)."""
    rows = 0
    for payload in _payloads(path):
        if payload[:1] == PICKLED:
            rows += len(pickle.loads(payload))
        else:
            rows += sum(batch.num_rows for batch in pa.ipc.open_stream(payload))
    return rows


def read_segment(path: Path) -> list[dict]:
    """Every complete record of a spool segment (or a quarantined one) as dicts; a torn tail is ignored."""
    records: list[dict] = []
    for frame in _read_frames(path):
        records.extend(frame.to_pylist() if isinstance(frame, pa.Table) else frame)
    return records


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


def _append(fd: int, data: bytes, good: int) -> None:
    """Append `data` to the segment open (O_APPEND, unbuffered) at `fd` and fsync it, or fail with the file cut
    back to its first `good` bytes.

    A user-space buffer would keep the unwritten part of a failed frame and write it with the next one: a record
    whose caller was told it failed would then land after all. A torn frame left behind would hide every frame
    written after it. So: plain os.write, and on failure the tail is cut off (and cut again before the next
    append when even that failed).
    """
    try:
        if os.fstat(fd).st_size != good:  # an earlier failed append whose tail could not be cut off then
            os.ftruncate(fd, good)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]  # a short write (a file-size limit, a nearly full disk) goes on here
        os.fsync(fd)
    except OSError:
        try:
            os.ftruncate(fd, good)
        except OSError as error:
            log.error("cannot cut a failed spool write back to %d bytes (retried before the next write): %s",
                      good, error)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        # unbuffered: nothing of a failed write may stay behind to be written later (see _append)
        new = open(self.dir / f"{seq:012d}{self.SUFFIX}", "ab", buffering=0)  # noqa: SIM115 - open for its life
        _fsync_dir(self.dir)
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
        frames = _read_frames(path)
        rows = sum(frame.num_rows if isinstance(frame, pa.Table) else len(frame) for frame in frames)
        return _Segment(seq, path, frames, rows, path.stat().st_size)

    @staticmethod
    def _counted(seq: int, path: Path) -> _Segment:
        """The segment's rows and size without its frames: what the backlog needs, in bounded memory."""
        return _Segment(seq, path, [], _count_rows(path), path.stat().st_size)

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
        frame = _frame(data)
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
                    _append(file.fileno(), data, self._segment_bytes)
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
        _fsync_dir(self.dir)
        log.error("spool segment %s (%d rows) cannot be committed to %s after %d attempts, moved to %s: %s",
                  segment.path.name, segment.rows, self.table, self.max_attempts, self.quarantine_dir, reason)
        self._failures.pop(segment.seq, None)
        self._forget(segment, delete=False)

    def _back_to_quarantine(self, segment: _Segment) -> None:
        """A quarantined segment moved back into the spool: its number is below the commit marker (later segments
        committed), so it would read as committed and be deleted. It goes back to quarantine/ (its note is still
        there), where `replay_quarantine` commits it."""
        self.last_quarantine_error = (f"{segment.path.name}: moved back into the spool from quarantine/, returned "
                                      f"there (replay it with coinyear.lake.replay_quarantine)")
        segment.path.replace(self.quarantine_dir / segment.path.name)
        _fsync_dir(self.dir)
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
                    frames = _read_frames(path)
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
            _fsync_dir(spool.quarantine_dir)
    finally:
        lock.close()
    return outcomes
