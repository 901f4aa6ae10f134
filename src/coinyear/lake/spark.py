"""Lake stage, Spark backend: the lake's tables as catalog tables written through the job's Spark session.

On Databricks (`COINYEAR_LAKE_BACKEND=spark`, `COINYEAR_LAKE_SCHEMA=catalog.schema`) the tables are Unity
Catalog Delta tables `<catalog>.<schema>.<table>`: delta-rs cannot commit to a Unity Catalog volume (its FUSE
mount has no rename/link; delta-rs #2540) and volumes cannot hold tables, so the jobs write through Spark, the
engine their cluster runs. Off Databricks the same code writes the session's default table format (Parquet in
local PySpark, whose session cannot load Delta's jars offline): that is what the tests run.

Same contract as `coinyear.lake.delta.DeltaLake` (see `coinyear.lake.tables.Lake`), kept with three reserved
columns that every append writes next to the rows, in the same write as the rows:

    _coinyear_commit       bigint   the table's logical version: 0 for the first append, +1 per append
    _coinyear_txn_app      string   `transaction` app id of the append (null without one)
    _coinyear_txn_version  bigint   `transaction` version of the append

- `committed_version(table, app)` is the largest `_coinyear_txn_version` of `app`'s rows, `version(table)`
  the largest `_coinyear_commit`, and `read(table, version=v)` the rows with `_coinyear_commit <= v`: the tables
  are append-only, so that is the table as it was after append v. It needs no Delta history, so it survives
  VACUUM and log retention (Delta time travel does not). `read` never returns the reserved columns.
- Exactly once: an append whose `transaction` version is not above the committed one writes nothing. The check
  reads the table before the write, so it assumes one writer per table (the lake's rule, see coinyear.lake.tables);
  on Delta the write also carries Delta's own idempotent-write options (`txnAppId`/`txnVersion`), which skip
  it atomically if another writer committed that version in between.
- Atomicity: the marker is in the rows, so marker and rows land together exactly when the rows land together.
  On Delta an append is one commit: all or nothing. On Parquet (local Spark) Spark's file committer moves the
  task files into place one by one at job commit: a crash in that window can leave part of an append, with its
  marker, so exactly-once holds only on Delta.
- New columns (of tables without a fixed schema: training_data, model_decisions, monitoring; or added to a fixed
  schema since the table was written, as feedback's `actor`) are added with `ALTER TABLE ... ADD COLUMNS` before
  the append; older rows read them as null, and a schema column the table does not have yet reads as null too.
- `metadata` goes to the Delta commit's `userMetadata` (DESCRIBE HISTORY); Parquet has no commit to hold it.

Rows written to these tables by anything but this class lack `_coinyear_commit`: they are read by `read()` but
not by `read(version=...)`, so the retraining job would never ingest such feedback: write through `open_lake(settings)`.
Nothing here caches or spills to a volume: Spark's own temporary files stay on the cluster's local disks.
Needs Spark 4 (Arrow tables in and out: `createDataFrame(pyarrow.Table)`, `DataFrame.toArrow()`): Databricks
Runtime 17.3 LTS, as deploy/databricks pins. Only local Spark with Parquet is tested here; the Delta-only parts
(idempotent-write options, `userMetadata`, one-commit atomicity) are Delta's documented behaviour, untested.
"""

from __future__ import annotations

import json
import logging
import re

import pandas as pd
import pyarrow as pa

from coinyear.lake.tables import SCHEMAS, Lake, Rows

log = logging.getLogger(__name__)

COMMIT, TXN_APP, TXN_VERSION = "_coinyear_commit", "_coinyear_txn_app", "_coinyear_txn_version"
RESERVED = (COMMIT, TXN_APP, TXN_VERSION)
NAME = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)?$")
UTC = pa.timestamp("us", tz="UTC")


def quote(name: str) -> str:
    """`a.b.c` as a quoted multi-part identifier."""
    return ".".join(f"`{part}`" for part in name.split("."))


def predicate(filters):
    """pyarrow-style `filters` (a list of (column, op, value) ANDed, or a list of such lists ORed) as a Spark
    Column."""
    from functools import reduce

    from pyspark.sql import functions as F

    ops = {"=": lambda c, v: c == v, "==": lambda c, v: c == v, "!=": lambda c, v: c != v,
           "<": lambda c, v: c < v, "<=": lambda c, v: c <= v, ">": lambda c, v: c > v, ">=": lambda c, v: c >= v,
           "in": lambda c, v: c.isin(list(v)), "not in": lambda c, v: ~c.isin(list(v))}

    def conjunction(terms):
        columns = []
        for name, op, value in terms:
            if op not in ops:
                raise ValueError(f"filter operator {op!r} is not supported (use one of {sorted(ops)})")
            columns.append(ops[op](F.col(name), value))
        return reduce(lambda a, b: a & b, columns)

    if filters and isinstance(filters[0], list):
        return reduce(lambda a, b: a | b, [conjunction(terms) for terms in filters])
    return conjunction(filters)


class SparkLake(Lake):
    """The lake's tables as `<settings.lake_schema>.<table>` catalog tables, written through Spark."""

    def __init__(self, settings, spark=None):
        schema = settings.lake_schema
        if not schema or not NAME.match(schema):
            raise ValueError(f"COINYEAR_LAKE_SCHEMA must name the tables' schema as `catalog.schema` or `schema` "
                             f"when COINYEAR_LAKE_BACKEND=spark (got {schema!r})")
        if spark is None:
            from coinyear.spark import spark_session

            spark = spark_session()
        # kept: the spool's committer thread has no active session of its own
        self.spark, self.schema = spark, schema
        self.delta = spark.conf.get("spark.sql.sources.default", "parquet").lower() == "delta"

    def uri(self, table: str) -> str:
        return f"{self.schema}.{table}"

    def _name(self, table: str) -> str:
        return quote(self.uri(table))

    def exists(self, table: str) -> bool:
        return self.spark.catalog.tableExists(self._name(table))

    def _state(self, table: str, app_id: str | None) -> tuple[int, int | None]:
        """(the table's logical version, the last committed transaction version of `app_id`) in one query."""
        from pyspark.sql import functions as F

        if not self.exists(table):
            return -1, None
        marker = F.when(F.col(TXN_APP) == F.lit(app_id), F.col(TXN_VERSION)) if app_id else F.lit(None)
        row = self.spark.table(self._name(table)).agg(F.max(COMMIT), F.max(marker)).first()
        return (-1 if row[0] is None else int(row[0])), (None if row[1] is None else int(row[1]))

    def append(self, table: str, rows: Rows, *, transaction: tuple[str, int] | None = None,
               metadata: dict[str, str] | None = None) -> int:
        """Append rows in one Spark write with the reserved columns; returns how many (0 when `transaction` was
        already committed). Creates the table on first write; adds new columns to tables without a fixed schema.
        """
        data = self.storable(table, rows)
        if data.num_rows == 0:
            return 0
        version, done = self._state(table, transaction[0] if transaction else None)
        if self.already_committed(done, transaction):
            log.info("%s: transaction %s already committed, nothing appended", self.uri(table), transaction)
            return 0
        for index, field in enumerate(data.schema):
            if pa.types.is_timestamp(field.type):  # Spark timestamps are microseconds; naive ones are taken as UTC
                data = data.set_column(index, field.name, data[field.name].cast(UTC, safe=False))
        n = data.num_rows
        data = (data.append_column(COMMIT, pa.array([version + 1] * n, pa.int64()))
                .append_column(TXN_APP, pa.array([transaction[0] if transaction else None] * n, pa.string()))
                .append_column(TXN_VERSION, pa.array([transaction[1] if transaction else None] * n, pa.int64())))
        frame = self.spark.createDataFrame(data)
        if version >= 0 or self.exists(table):
            frame = self._fit(table, frame)
        writer = frame.write.mode("append")
        if self.delta:
            if transaction:
                writer = writer.option("txnAppId", transaction[0]).option("txnVersion", str(transaction[1]))
            if metadata:
                writer = writer.option("userMetadata", json.dumps(metadata, sort_keys=True))
        writer.saveAsTable(self._name(table))
        return n

    def _fit(self, table: str, frame):
        """`frame` in the existing table's column order and types; its new columns added to the table first."""
        from pyspark.sql import functions as F

        current = self.spark.table(self._name(table)).schema
        new = [field for field in frame.schema if field.name not in current.names]
        if new:
            columns = ", ".join(f"`{f.name.replace('`', '``')}` {f.dataType.simpleString()}" for f in new)
            self.spark.sql(f"ALTER TABLE {self._name(table)} ADD COLUMNS ({columns})")
            log.info("%s: new columns %s", self.uri(table), [f.name for f in new])
            current = self.spark.table(self._name(table)).schema
        return frame.select([(F.col(f"`{f.name}`") if f.name in frame.columns else F.lit(None))
                             .cast(f.dataType).alias(f.name) for f in current])

    def committed_version(self, table: str, app_id: str) -> int | None:
        """The last `transaction` version committed for `app_id`, None when none (or no table yet)."""
        return self._state(table, app_id)[1]

    def version(self, table: str) -> int:
        """The table's logical version (its number of appends - 1), -1 while it does not exist."""
        return self._state(table, None)[0]

    def read(self, table: str, columns: list[str] | None = None, filters=None,
             version: int | None = None) -> pd.DataFrame:
        """The table (or `columns`, rows matching pyarrow-style `filters`) as pandas, at its latest version or as
        it was after append `version`; timestamps in UTC, the reserved columns left out."""
        from pyspark.sql import functions as F

        if not self.exists(table):
            return self.empty(table, columns)
        frame = self.spark.table(self._name(table))
        if version is not None:
            frame = frame.where(F.col(COMMIT) <= version)
        if filters:
            frame = frame.where(predicate(filters))
        names = columns or [c for c in frame.columns if c not in RESERVED]
        if table in SCHEMAS:  # a schema column the table was written without is added below, as nulls
            names = [c for c in names if c in frame.columns]
        return self.as_read(table, frame.select([F.col(f"`{c}`") for c in names]).toArrow(), columns)

    def count(self, table: str) -> int:
        return self.spark.table(self._name(table)).count() if self.exists(table) else 0
