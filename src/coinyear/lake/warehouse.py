"""`WarehouseLake`: the lake's Unity Catalog tables read through a SQL warehouse, for a process with neither Spark
nor a Delta writer: the UI as a Databricks App, whose Monitor page and retraining decisions would otherwise read an
empty local lake. It writes one table, the UI's own: `feedback_reviews` (the Review page's verdicts), with one
parameterised `INSERT INTO ... VALUES`, creating the table first when nobody has (`CREATE TABLE IF NOT EXISTS`, so
the app's service principal needs CREATE TABLE on the schema and owns the table it creates). The other tables are
the jobs', written with exactly-once markers a plain INSERT does not have: they stay read-only here.

Each read is one statement, `SELECT <columns> FROM <lake_schema>.<table>`, run with the Statement Execution API
(`w.statement_execution.execute_statement`, docs "Statement Execution API": inline JSON_ARRAY results, every value
a string or null, polled with `get_statement` while PENDING/RUNNING) on the warehouse `COINYEAR_SQL_WAREHOUSE_ID`
(the app's `sql_warehouse` resource), as the app's service principal (SELECT on the schema). Values are typed
from the result's column types, then cast to the table's schema (`coinyear.lake.tables.SCHEMAS`) as `SparkLake`
does (`Lake.as_read`). A table that does not exist yet reads as an empty frame, as with the other backends.
Binary columns (the photos) are left out unless asked for: the page never shows them and inline results are
limited in size.
"""

from __future__ import annotations

import datetime as dt
import time

import pandas as pd
import pyarrow as pa

from coinyear.config import Settings
from coinyear.lake.tables import FEEDBACK_REVIEWS, SCHEMAS, UTC_TIMESTAMP, Lake, Rows

# Databricks SQL type names (the result manifest's `type_name`) -> how their JSON strings are read
SQL_TYPES = {"STRING": pa.string(), "LONG": pa.int64(), "INT": pa.int32(), "SHORT": pa.int16(), "BYTE": pa.int8(),
             "DOUBLE": pa.float64(), "FLOAT": pa.float32(), "DECIMAL": pa.float64(), "BOOLEAN": pa.bool_(),
             "TIMESTAMP": UTC_TIMESTAMP, "TIMESTAMP_NTZ": pa.timestamp("us"), "DATE": pa.date32()}
# Arrow types of the writable tables -> Databricks SQL column types (CREATE TABLE) and parameter types (INSERT)
DDL_TYPES = {pa.string(): "STRING", pa.int32(): "INT", pa.int64(): "BIGINT", pa.float64(): "DOUBLE",
             pa.bool_(): "BOOLEAN", UTC_TIMESTAMP: "TIMESTAMP"}
WRITABLE = (FEEDBACK_REVIEWS,)
POLL_SECONDS = 1.0
TIMEOUT_SECONDS = 120.0


class WarehouseLake(Lake):
    """The lake's tables on a SQL warehouse: read, and the UI's own table written (see the module docstring)."""

    def __init__(self, settings: Settings):
        if not settings.lake_schema or not settings.sql_warehouse_id:
            raise ValueError("the warehouse lake needs COINYEAR_LAKE_SCHEMA (catalog.schema) and "
                             "COINYEAR_SQL_WAREHOUSE_ID")
        from databricks.sdk import WorkspaceClient

        self.schema, self.warehouse_id = settings.lake_schema, settings.sql_warehouse_id
        self.workspace = WorkspaceClient()

    def uri(self, table: str) -> str:
        return f"{self.schema}.{table}"

    def append(self, table: str, rows: Rows, *, transaction=None, metadata=None) -> int:
        """Insert `rows` into one of the UI's own tables (`WRITABLE`) in one statement; the number inserted."""
        if table not in WRITABLE or transaction is not None:
            raise RuntimeError(f"the warehouse lake is read-only: {table} is written by the jobs")
        data = self.to_arrow(table, rows)
        if data.num_rows == 0:
            return 0
        schema = SCHEMAS[table]
        columns = ", ".join(f"`{field.name}` {DDL_TYPES[field.type]}" for field in schema)
        self._execute(f"CREATE TABLE IF NOT EXISTS {self.uri(table)} ({columns})")
        values, parameters = [], []
        for index, row in enumerate(data.to_pylist()):
            names = [f"r{index}_{field.name}" for field in schema]
            values.append("(" + ", ".join(f":{name}" for name in names) + ")")
            parameters += [{"name": name, "type": DDL_TYPES[field.type],
                            **({} if row[field.name] is None else {"value": _sql_text(row[field.name])})}
                           for name, field in zip(names, schema)]
        self._execute(f"INSERT INTO {self.uri(table)} ({', '.join(f'`{n}`' for n in schema.names)}) VALUES "
                      + ", ".join(values), parameters)
        return data.num_rows

    def read(self, table: str, columns: list[str] | None = None, filters=None,
             version: int | None = None) -> pd.DataFrame:
        """The table (or `columns`) as pandas; `filters` and `version` are not supported here."""
        if filters or version is not None:
            raise NotImplementedError("the warehouse lake reads whole tables")
        schema = SCHEMAS.get(table)
        names = columns or ([f.name for f in schema if not pa.types.is_binary(f.type)] if schema else None)
        selected = ", ".join(f"`{name}`" for name in names) if names else "*"
        result = self._execute(f"SELECT {selected} FROM {self.uri(table)}")
        if result is None:
            return self.empty(table, columns)
        manifest, rows = result
        fields = [(column["name"], SQL_TYPES.get(str(column.get("type_name", "STRING")).upper(), pa.string()))
                  for column in manifest]
        arrays = [pa.array([row[i] for row in rows], pa.string()).cast(kind) for i, (_, kind) in enumerate(fields)]
        return self.as_read(table, pa.table(arrays, names=[name for name, _ in fields]), columns)

    def _execute(self, statement: str, parameters: list[dict] | None = None) -> tuple[list[dict], list[list]] | None:
        """(the result's columns, its rows) of `statement` with its named `parameters` (":name" markers; a
        parameter without a value is NULL), or None when its table does not exist."""
        def do(method: str, path: str, body: dict | None = None) -> dict:
            answer = self.workspace.api_client.do(method, path, body=body)
            if not isinstance(answer, dict):
                raise RuntimeError(f"{method} {path}: not a JSON object")
            return answer

        answer = do("POST", "/api/2.0/sql/statements", body={
            "warehouse_id": self.warehouse_id, "statement": statement, "wait_timeout": "30s",
            "on_wait_timeout": "CONTINUE", "format": "JSON_ARRAY", "disposition": "INLINE",
            **({"parameters": parameters} if parameters else {})})
        deadline = time.monotonic() + TIMEOUT_SECONDS
        while answer["status"]["state"] in ("PENDING", "RUNNING") and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
            answer = do("GET", f"/api/2.0/sql/statements/{answer['statement_id']}")
        state = answer["status"]["state"]
        if state == "FAILED":
            error = answer["status"].get("error") or {}
            if "TABLE_OR_VIEW_NOT_FOUND" in str(error.get("message", "")):
                return None
            raise RuntimeError(f"{statement!r} failed on warehouse {self.warehouse_id}: {error.get('message')}")
        if state != "SUCCEEDED":
            raise RuntimeError(f"{statement!r} on warehouse {self.warehouse_id}: {state}")
        columns = (answer.get("manifest") or {}).get("schema", {}).get("columns", [])  # none for CREATE, INSERT
        result = answer.get("result") or {}
        rows = list(result.get("data_array") or [])
        while result.get("next_chunk_internal_link"):  # a big result comes in chunks
            result = do("GET", result["next_chunk_internal_link"])
            rows += result.get("data_array") or []
        return columns, rows


def _sql_text(value) -> str:
    """A parameter's value as the Statement Execution API takes it: a string (timestamps in ISO 8601, UTC)."""
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat()
    return str(value).lower() if isinstance(value, bool) else str(value)
