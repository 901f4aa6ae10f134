"""The embedded scheduler: `coinyear scheduler` runs the retraining job on a cron (APScheduler).

On Databricks the same job is a scheduled Job (deploy/databricks/databricks.yml); here APScheduler plays that
part. One run at a time: APScheduler never starts a second instance while one runs (`max_instances=1`, missed
runs coalesced), and the job's own file lock also keeps a manual `coinyear retrain` from overlapping it. A run
that fails is logged and counted; the scheduler keeps going and tries again at the next tick.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from apscheduler.schedulers.base import BaseScheduler
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.cron import CronTrigger

from coinyear.config import Settings

log = logging.getLogger(__name__)

JOB_ID = "coinyear-retrain"


def cron_trigger(expression: str) -> CronTrigger:
    """A crontab line (5 fields: minute hour day month weekday, UTC), or 6 fields with seconds first."""
    fields = expression.split()
    if len(fields) == 5:
        return CronTrigger.from_crontab(expression, timezone="UTC")
    if len(fields) == 6:
        second, minute, hour, day, month, day_of_week = fields
        return CronTrigger(second=second, minute=minute, hour=hour, day=day, month=month,
                           day_of_week=day_of_week, timezone="UTC")
    raise ValueError(f"cron expression {expression!r} needs 5 fields (or 6 with seconds first)")


@dataclass
class RunHistory:
    """What the scheduled runs did, for the log line of each tick and for tests."""

    succeeded: int = 0
    failed: int = 0
    outcomes: list[str] = field(default_factory=list)


def guarded(job: Callable[[], object], history: RunHistory) -> Callable[[], None]:
    """The job wrapped so that an exception is logged and counted instead of reaching the scheduler."""

    def run() -> None:
        try:
            outcome = job()
        except Exception as error:  # the next tick must still run
            history.failed += 1
            history.outcomes.append(f"failed: {type(error).__name__}: {error}")
            log.exception("scheduled retraining failed; next run at the next tick")
            return
        history.succeeded += 1
        history.outcomes.append(str(outcome))
        log.info("scheduled retraining finished: %s", outcome)

    return run


def schedule(scheduler: BaseScheduler, settings: Settings, job: Callable[[], object], history: RunHistory) -> None:
    scheduler.add_job(guarded(job, history), cron_trigger(settings.retrain_cron), id=JOB_ID,
                      name="coinyear retrain", max_instances=1, coalesce=True, misfire_grace_time=3600,
                      replace_existing=True)


def retrain_job(settings: Settings) -> Callable[[], str]:
    from coinyear.jobs.retrain import run_retrain

    def job() -> str:
        result = run_retrain(settings)
        print(result.report(), flush=True)
        if result.decision == "failed":  # recorded by the job; counted here as the failed run it is
            raise RuntimeError(result.reason)
        return f"{result.decision}: {result.reason}"

    return job


def run_scheduler(settings: Settings) -> None:
    """Block, running the retraining job on `settings.retrain_cron` until interrupted."""
    scheduler = BlockingScheduler(timezone="UTC")
    schedule(scheduler, settings, retrain_job(settings), RunHistory())
    first = cron_trigger(settings.retrain_cron).get_next_fire_time(None, datetime.now(UTC))
    print(f"retraining on cron {settings.retrain_cron!r} (UTC), next run {first:%Y-%m-%d %H:%M:%S %Z}; "
          f"Ctrl-C stops", flush=True)
    with contextlib.suppress(KeyboardInterrupt, SystemExit):
        scheduler.start()
