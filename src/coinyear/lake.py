"""Lake stage: the Delta Lake tables every later stage reads and writes (delta-rs, no Spark).

Tables live under `settings.lake_root`: a local folder by default (COINYEAR_HOME/lake), or any delta-rs URI
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

import logging
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
    """The Delta tables under one root (`settings.lake_root`, or a root URI/path given directly)."""

    def __init__(self, settings_or_root):
        root = settings_or_root if isinstance(settings_or_root, (str, Path)) else settings_or_root.lake_root
        self.root = str(root).rstrip("/")

    def uri(self, table: str) -> str:
        return f"{self.root}/{table}"

    def exists(self, table: str) -> bool:
        return DeltaTable.is_deltatable(self.uri(table))

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

    def append(self, table: str, rows: Rows, *, transaction: tuple[str, int] | None = None,
               metadata: dict[str, str] | None = None) -> int:
        """Append rows in one Delta commit; returns how many.

        `transaction=(app_id, version)` records an idempotent-write marker in the same commit (Delta's
        `txn` action): `committed_version(table, app_id)` then tells which writes already landed.
        """
        data = self.to_arrow(table, rows)
        if data.num_rows == 0:
            return 0
        if table not in SCHEMAS:
            for name in data.column_names:  # delta-rs cannot store all-null columns of type null
                if pa.types.is_null(data.schema.field(name).type):
                    data = data.set_column(data.schema.get_field_index(name), name, data[name].cast(pa.string()))
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

    def read(self, table: str, columns: list[str] | None = None, filters=None) -> pd.DataFrame:
        """The whole table (or `columns`, rows matching pyarrow-style `filters`) as pandas.

        A table that does not exist yet reads as an empty frame with its schema's columns (no columns when the
        table has no fixed schema).
        """
        if not self.exists(table):
            schema = SCHEMAS.get(table)
            if schema is None:
                return pd.DataFrame(columns=columns or [])
            empty = schema.empty_table()
            return (empty.select(columns) if columns else empty).to_pandas()
        return DeltaTable(self.uri(table)).to_pandas(columns=columns, filters=filters)

    def count(self, table: str) -> int:
        return DeltaTable(self.uri(table)).count() if self.exists(table) else 0
