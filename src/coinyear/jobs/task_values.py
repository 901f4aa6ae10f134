"""Task values of a Databricks job run: what the retraining task decided, on the run's page.

The retraining sets the value `decision`; no task of the bundle branches on it (its `deploy` task runs after every
retraining and does nothing when production is already served). On a Databricks cluster the value goes
through the runtime's `dbutils.jobs.taskValues.set`, which a wheel task reaches through `databricks.sdk.runtime`
(it hands out the driver REPL's own `dbutils`). Anywhere else there is no job run to attach a value to, and
setting one does nothing.
"""

from __future__ import annotations

import importlib
import json
import os

# Set by Databricks on every cluster node; the SDK itself uses it to tell a cluster from a laptop.
RUNTIME_ENV = "DATABRICKS_RUNTIME_VERSION"


def on_databricks() -> bool:
    """True inside a Databricks Runtime (a job or notebook on a cluster)."""
    return RUNTIME_ENV in os.environ


def set_task_value(key: str, value) -> bool:
    """Set the task value `key` for the later tasks of this job run: True once set, False outside Databricks.

    The value must be JSON (Databricks stores it so); on Databricks a failure raises, because a later task would
    otherwise branch on a missing value and report a confusing error far from its cause."""
    try:
        json.dumps(value)
    except TypeError as error:
        raise ValueError(f"task value {key!r} must be JSON-serialisable: {error}") from error
    if not on_databricks():
        return False
    try:
        runtime = importlib.import_module("databricks.sdk.runtime")
    except (ImportError, ValueError) as error:  # ValueError: the SDK found no runtime and no credentials either
        raise RuntimeError(f"cannot reach dbutils to set the task value {key!r}: {error}") from error
    if runtime.is_local_implementation:
        raise RuntimeError(f"{RUNTIME_ENV} is set but the Databricks runtime's dbutils is not available here: "
                           f"the task value {key!r} cannot be set")
    runtime.dbutils.jobs.taskValues.set(key=key, value=value)
    return True
