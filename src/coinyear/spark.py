"""The Spark session every Spark-backed stage uses (batch scoring, distributed training, the Unity Catalog lake).

On Databricks the job cluster already runs a session: `spark_session()` returns it. Anywhere else it starts
local PySpark (`local[N]`, Java 17), with the workers running this very Python interpreter (PYSPARK_PYTHON),
or they would miss the packages of the virtual environment. Nothing in the embedded default calls this: Spark
starts only when a command asks for it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


def on_databricks() -> bool:
    """True inside a Databricks runtime (job cluster, notebook, app with a cluster)."""
    return "DATABRICKS_RUNTIME_VERSION" in os.environ


def spark_session(app_name: str = "coinyear", master: str | None = None,
                  warehouse_dir: str | Path | None = None) -> SparkSession:
    """The active session, or a new local one.

    `master` defaults to `local[N]` with N = the machine's cores; `warehouse_dir` is where `saveAsTable` puts
    managed tables of a local session (Databricks ignores it: tables go to Unity Catalog).
    """
    try:
        from pyspark.sql import SparkSession
    except ImportError as error:
        raise RuntimeError("this command needs Spark: pip install 'coinyear[spark]' (and Java 17)") from error

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    # Workers must import torch, mlflow and coinyear from the same environment as the driver.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = (SparkSession.builder.appName(app_name)
               .master(master or f"local[{os.cpu_count() or 1}]")
               .config("spark.ui.enabled", "false")
               .config("spark.sql.shuffle.partitions", str(max(2 * (os.cpu_count() or 1), 2)))
               .config("spark.sql.execution.arrow.pyspark.enabled", "true")
               .config("spark.driver.memory", "2g"))
    if warehouse_dir is not None:
        builder = builder.config("spark.sql.warehouse.dir", str(Path(warehouse_dir).resolve()))
    return builder.getOrCreate()
