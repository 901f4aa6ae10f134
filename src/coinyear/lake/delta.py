"""Lake stage, delta-rs backend: the tables as Delta tables under one root, no Spark (the default).

Tables live under `settings.lake_root`: a local folder by default (COINYEAR_HOME/lake), or any delta-rs URI
(`s3://...`, `abfss://...`, `dbfs:/...` mounted) at scale; credentials come from the usual environment variables
delta-rs reads. delta-rs appends from several concurrent writers can fail under contention, so each table has one
writer process (see `coinyear.lake.tables`). The contract is `coinyear.lake.tables.Lake`'s.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

from coinyear.lake.tables import PARTITIONS, SCHEMAS, Lake, Rows

log = logging.getLogger(__name__)


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
        before the write assumes the table's one writer (see `coinyear.lake.tables`).
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

