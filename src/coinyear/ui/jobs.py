"""The Models page as a Databricks App: production is moved by the bundle's rollback job, never by the app.

The app's service principal holds EXECUTE on the registered model, and moving an alias needs its owner (or a
metastore admin); the serving endpoint would not follow an alias moved from here either (`coinyear deploy` moves
it). So with `COINYEAR_SERVING_BACKEND=databricks` the page starts a run of the job `COINYEAR_ROLLBACK_JOB_ID`
(`coinyear models rollback` then `coinyear deploy`, run as the job's owner) with `w.jobs.run_now`, and lists that
job's runs (`w.jobs.list_runs`); the bundle gives the app CAN_MANAGE_RUN on the job. A promotion is the retrain
job's decision: the page offers none on Databricks.
"""

from __future__ import annotations

import datetime as dt

import pandas as pd

from coinyear.config import Settings


def on_databricks(settings: Settings) -> bool:
    """True when the UI runs against a workspace (a Databricks App): production moves only through the jobs."""
    return settings.serving_backend == "databricks"


def _job_id(settings: Settings) -> int:
    if settings.rollback_job_id is None:
        raise RuntimeError("COINYEAR_ROLLBACK_JOB_ID is not set: the bundle sets it to the rollback job's id "
                           "(${resources.jobs.rollback.id})")
    return settings.rollback_job_id


def start_rollback(settings: Settings) -> int:
    """Start a run of the rollback job as the app's service principal (databricks-sdk's unified auth); its run
    id."""
    from databricks.sdk import WorkspaceClient

    return int(WorkspaceClient().jobs.run_now(_job_id(settings)).run_id)


def rollback_runs(settings: Settings, limit: int = 10) -> pd.DataFrame:
    """The rollback job's latest runs, newest first: run id, start (UTC), state, result, who started it, link."""
    from databricks.sdk import WorkspaceClient

    rows = []
    for run in WorkspaceClient().jobs.list_runs(job_id=_job_id(settings), limit=limit):
        state = run.state
        rows.append({
            "run": run.run_id,
            "started": dt.datetime.fromtimestamp((run.start_time or 0) / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M"),
            "state": state.life_cycle_state.value if state and state.life_cycle_state else "",
            "result": state.result_state.value if state and state.result_state else "",
            "started by": run.creator_user_name or "",
            "link": run.run_page_url or "",
        })
        if len(rows) >= limit:
            break
    return pd.DataFrame(rows, columns=["run", "started", "state", "result", "started by", "link"])
