"""Lake stage, the tables: every table's name and schema, once, and `Lake`, the API both backends keep.

The backends are `coinyear.lake.delta.DeltaLake` (delta-rs, the default) and `coinyear.lake.spark.SparkLake`
(catalog tables through Spark); `coinyear.lake.open_lake(settings)` gives the one the settings name. Each table
has one writer process (delta-rs appends from several concurrent writers can fail under contention):

    inference_log    the gateway (through its spool, `coinyear.lake.spool`); on Databricks `coinyear ingest-payloads`
    feedback         the gateway (through its spool); on Databricks `coinyear ingest-payloads`
    monitoring       the monitoring job (`coinyear monitor`)
    training_data    the retraining job
    model_decisions  the retraining job, `coinyear deploy` and the Models page (each appends whole rows; the table
                     is read as an append-only log)
    feedback_reviews the Review page (an expert's verdict on a correction nobody answers for)

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
                                  without auth; on Databricks what its feedback file says (databricks/payloads.py).
                                  Null in rows written before it existed. Retraining learns only from rows whose
                                  actor is neither null nor `anonymous` (coinyear.jobs.ingest)

A column added to a fixed schema (as `actor`) is added to a table written before it on the next append, and
reads as null in its older rows (and in spool records written before it).

model_decisions (one row per decision about the served model)
    the columns of `DECISIONS_SCHEMA`, written whole by the retraining job (kind `retrain`) and `coinyear deploy`
    (kind `deploy`); the Models page (kind `ui`) writes the person-facing ones plus `actor` (`DECISIONS_ACTOR`).
    Not a fixed schema in `SCHEMAS`: its columns are merged in as writers add them.

feedback_reviews (one row per verdict on a correction nobody answers for: the UI's Review page)
    feedback_key       string     the reviewed feedback row (`coinyear.jobs.ingest.feedback_key`: request id @ time)
    request_id         string     its request
    verdict            string     `accepted` (sent again as the reviewer's own correction) or `rejected`
    year_from, year_to int32      the reviewed correction's years
    reviewed_at        timestamp[us, UTC]
    actor              string     who gave the verdict (the signed-in name and a token fingerprint, never a token)

monitoring, training_data: schema on first write (new columns are merged in later).
"""

from __future__ import annotations

from typing import TypeAlias

import pandas as pd
import pyarrow as pa

INFERENCE_LOG = "inference_log"
FEEDBACK = "feedback"
MODEL_DECISIONS = "model_decisions"
MONITORING = "monitoring"
TRAINING_DATA = "training_data"
FEEDBACK_REVIEWS = "feedback_reviews"
TABLES = (INFERENCE_LOG, FEEDBACK, MODEL_DECISIONS, MONITORING, TRAINING_DATA, FEEDBACK_REVIEWS)

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
        pa.field("request_id", pa.string(), nullable=False), ("year_from", pa.int32()), ("year_to", pa.int32()),
        ("timestamp", UTC_TIMESTAMP), ("source", pa.string()), ("note", pa.string()), ("actor", pa.string()),
    ]),
    FEEDBACK_REVIEWS: pa.schema([
        pa.field("feedback_key", pa.string(), nullable=False), ("request_id", pa.string()), ("verdict", pa.string()),
        ("year_from", pa.int32()), ("year_to", pa.int32()), ("reviewed_at", UTC_TIMESTAMP), ("actor", pa.string()),
    ]),
}
# model_decisions: what the retraining job and `coinyear deploy` write (see the module docstring)
DECISIONS_SCHEMA = pa.schema([
    ("decided_at", UTC_TIMESTAMP), ("retrain_run_id", pa.string()), ("model_name", pa.string()),
    ("decision", pa.string()), ("reason", pa.string()),
    ("candidate_version", pa.string()), ("production_before", pa.string()), ("production_after", pa.string()),
    ("candidate_mae", pa.float64()), ("production_mae", pa.float64()),
    ("candidate_latency_ms", pa.float64()), ("production_latency_ms", pa.float64()),
    ("candidate_metrics", pa.string()), ("production_metrics", pa.string()),
    ("eval_rows", pa.int64()), ("new_feedback_rows", pa.int64()), ("ingested_rows", pa.int64()),
    ("dropped", pa.string()), ("training_data_version", pa.int64()), ("feedback_version", pa.int64()),
    # which job decided (retrain | deploy) and, for a deployment, the serving endpoint it changed
    ("kind", pa.string()), ("endpoint_name", pa.string()),
    # JSON list of the `feedback_key`s this decision settled (null for a failed run)
    ("consumed_feedback", pa.string()),
])
# who made a change by hand: the Models page's rows carry it (never a token), the jobs' rows do not
DECISIONS_ACTOR = pa.field("actor", pa.string())

PARTITIONS: dict[str, list[str]] = {INFERENCE_LOG: ["date"]}

Rows: TypeAlias = list[dict] | pd.DataFrame | pa.Table


class Lake:
    """The lake's tables behind one API, implemented by `DeltaLake` and `SparkLake`.

    `coinyear.lake.open_lake(settings)` gives the backend `settings.lake_backend` names: a
    `coinyear.lake.delta.DeltaLake` for `delta` (the default; `DeltaLake(root)` for any other root, a path or
    URI), a `coinyear.lake.spark.SparkLake` for `spark` (tables `<lake_schema>.<table>` written through the job's
    Spark session). Both keep the same contract, tested against both in tests/system/test_lake_spark.py:

    - `append(table, rows, transaction=(app_id, version))` appends rows in one write; a `transaction` whose
      version is not above `committed_version(table, app_id)` writes nothing and returns 0 (exactly once);
    - `version(table)` names the table's state after each append (-1: no table), and
      `read(table, version=v)` reads the rows of that state back (the tables are append-only);
    - `read` of a table that does not exist yet is an empty frame with the table's columns.
    """

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

    def as_read(self, table: str, data: pa.Table, columns: list[str] | None = None) -> pd.DataFrame:
        """Rows a backend read back (Arrow), as every backend answers them: each column of the table's schema in
        the schema's type, any other timestamp in UTC (as the tables are written), and a schema column the rows
        lack as nulls."""
        schema = SCHEMAS.get(table)
        for index, field in enumerate(data.schema):
            wanted = schema.field(field.name).type if schema is not None and field.name in schema.names else None
            if wanted is None and pa.types.is_timestamp(field.type):
                wanted = UTC_TIMESTAMP
            if wanted is not None and wanted != field.type:
                data = data.set_column(index, field.name, data[field.name].cast(wanted))
        return self.with_schema_columns(table, data.to_pandas(), columns)

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

