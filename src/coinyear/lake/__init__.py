"""Lake stage: the Delta Lake tables every later stage reads and writes, behind one API.

`open_lake(settings)` gives the backend `settings.lake_backend` names; both keep the contract of
`coinyear.lake.tables.Lake`:

    tables.py  every table's name and schema (and who writes it), once; `Lake`, the API
    delta.py   `DeltaLake`: delta-rs tables under `settings.lake_root` (the default, no Spark)
    spark.py   `SparkLake`: catalog tables `<lake_schema>.<table>` through the job's Spark session (Unity Catalog
               tables on Databricks, where delta-rs cannot commit to a volume)
    warehouse.py `WarehouseLake`: those catalog tables read (only) through a SQL warehouse (the UI app)
    spool.py   `SpooledAppender`: appends made durable in a local spool before they reach the table (the gateway)
    segments.py  the spool's segment files: fsync'ed frames, read back and counted

`open_lake(settings).append(table, rows)` appends; `.read(table)` returns a pandas DataFrame (an empty one with the
right columns while a table does not exist yet). The table names and schemas are re-exported here, so
`from coinyear.lake import FEEDBACK` keeps working; new code imports them from `coinyear.lake.tables`. `Lake` is
not re-exported: a lake is opened with `open_lake`, and `coinyear.lake.tables.Lake` is only its type.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from coinyear import config
from coinyear.lake.delta import DeltaLake
from coinyear.lake.spark import SparkLake
from coinyear.lake.tables import (
    DECISIONS_ACTOR,
    DECISIONS_SCHEMA,
    FEEDBACK,
    INFERENCE_LOG,
    MODEL_DECISIONS,
    MONITORING,
    SCHEMAS,
    TABLES,
    TRAINING_DATA,
)

if TYPE_CHECKING:
    from coinyear.lake.tables import Lake

__all__ = ["DECISIONS_ACTOR", "DECISIONS_SCHEMA", "FEEDBACK", "INFERENCE_LOG", "MODEL_DECISIONS", "MONITORING",
           "SCHEMAS", "TABLES", "TRAINING_DATA", "open_lake"]


def open_lake(settings: config.Settings | None = None) -> Lake:
    """The lake `settings.lake_backend` names: a `SparkLake` for `spark`, a read-only `WarehouseLake` for
    `warehouse`, else a `DeltaLake` under `settings.lake_root`. None: the process's settings (COINYEAR_*
    variables, COINYEAR_LAKE_BACKEND included).

    A lake at any other root is `DeltaLake(root)`.
    """
    settings = config.get_settings() if settings is None else settings
    backend = getattr(settings, "lake_backend", "delta")
    if backend == "spark":
        return SparkLake(settings)
    if backend == "warehouse":
        from coinyear.lake.warehouse import WarehouseLake  # databricks-sdk, only where it is used

        return WarehouseLake(settings)
    return DeltaLake(settings)
