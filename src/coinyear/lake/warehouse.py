"""`WarehouseLake`: the lake's Unity Catalog tables read through a SQL warehouse (read-only), for a process with
neither Spark nor a Delta writer: the UI as a Databricks App, whose Monitor page and retraining decisions would
otherwise read an empty local lake.

Each read is one statement, `SELECT <columns> FROM <lake_schema>.<table>`, run with the Statement Execution API
(`w.statement_execution.execute_statement`, docs "Statement Execution API": inline JSON_ARRAY results, every value
a string or null, polled with `get_statement` while PENDING/RUNNING) on the warehouse `COINYEAR_SQL_WAREHOUSE_ID`
(the app's `sql_warehouse` resource), as the app's service principal (SELECT on the schema). Values are typed
from the result's column types, then cast to the table's schema (`coinyear.lake.tables.SCHEMAS`) as `SparkLake`
does. A table that does not exist yet reads as an empty frame, as with the other backends. Binary columns (the
photos) are left out unless asked for: the page never shows them and inline results are limited in size.
"""

from __future__ import annotations

import time

import pandas as pd
import pyarrow as pa

from coinyear.config import Settings
from coinyear.lake.tables import SCHEMAS, UTC_TIMESTAMP, Lake

# Databricks SQL type names (the result manifest's `type_name`) -> how their JSON strings are read
SQL_TYPES = {"STRING": pa.string(), "LONG": pa.int64(), "INT": pa.int32(), "SHORT": pa.int16(), "BYTE": pa.int8(),
             "DOUBLE": pa.float64(), "FLOAT": pa.float32(), "DECIMAL": pa.float64(), "BOOLEAN": pa.bool_(),
             "TIMESTAMP": UTC_TIMESTAMP, "TIMESTAMP_NTZ": pa.timestamp("us"), "DATE": pa.date32()}
POLL_SECONDS = 1.0
TIMEOUT_SECONDS = 120.0


class WarehouseLake(Lake):
    """Read-only lake on a SQL warehouse (see the module docstring)."""

    def __init__(self, settings: Settings):
        if not settings.lake_schema or not settings.sql_warehouse_id:
            raise ValueError("the warehouse lake needs COINYEAR_LAKE_SCHEMA (catalog.schema) and "
                             "COINYEAR_SQL_WAREHOUSE_ID")
        from databricks.sdk import WorkspaceClient

        self.schema, self.warehouse_id = settings.lake_schema, settings.sql_warehouse_id
        self.workspace = WorkspaceClient()

    def uri(self, table: str) -> str:
        return f"{self.schema}.{table}"

    def append(self, table: str, rows, *, transaction=None, metadata=None) -> int:
        raise RuntimeError(f"the warehouse lake is read-only: {table} is written by the jobs")

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
        data = pa.table(arrays, names=[name for name, _ in fields])
        for index, field in enumerate(data.schema):
            wanted = schema.field(field.name).type if schema is not None and field.name in schema.names else None
            if wanted is not None and wanted != field.type:
                data = data.set_column(index, field.name, data[field.name].cast(wanted))
        return self.with_schema_columns(table, data.to_pandas(), columns)

    def _execute(self, statement: str) -> tuple[list[dict], list[list]] | None:
        """(the result's columns, its rows) of `statement`, or None when its table does not exist."""
        def do(method: str, path: str, body: dict | None = None) -> dict:
            answer = self.workspace.api_client.do(method, path, body=body)
            if not isinstance(answer, dict):
                raise RuntimeError(f"{method} {path}: not a JSON object")
            return answer

        answer = do("POST", "/api/2.0/sql/statements", body={
            "warehouse_id": self.warehouse_id, "statement": statement, "wait_timeout": "30s",
            "on_wait_timeout": "CONTINUE", "format": "JSON_ARRAY", "disposition": "INLINE"})
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
        columns = answer["manifest"]["schema"]["columns"]
        result = answer.get("result") or {}
        rows = list(result.get("data_array") or [])
        while result.get("next_chunk_internal_link"):  # a big result comes in chunks
            result = do("GET", result["next_chunk_internal_link"])
            rows += result.get("data_array") or []
        return columns, rows
