"""`POST /feedback`: an expert's date for a logged request, checked, and the ids the local backend takes it for.

The body's rules (`read_feedback`) are the same for both backends. Which request ids may take feedback is the
backend's: the local one answers from memory (`KnownIds`: ids it answered, and recent misses), else from one
lookup in the inference log, run off the scoring threads and bounded (see FEEDBACK_LOOKUPS).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from coinyear.config import Settings
from coinyear.lake.tables import INFERENCE_LOG
from coinyear.serve.errors import INVALID_PARAMETER_VALUE, REQUEST_LIMIT_EXCEEDED, TEMPORARILY_UNAVAILABLE, ApiError

log = logging.getLogger(__name__)

RECENT_IDS = 200_000
# Feedback for an id that is not in memory costs a Delta scan and may wait for the spool's backlog to commit: that
# work runs on its own thread, never on the threads that decode photos for scoring, one lookup at a time, with
# at most FEEDBACK_LOOKUPS waiting or running (more are refused at once with a 429), and each miss is remembered
# for UNKNOWN_TTL_SECONDS, so a flood of bogus ids costs scoring nothing and the lake one scan per id at most.
FEEDBACK_LOOKUPS = 4
UNKNOWN_IDS = 10_000
UNKNOWN_TTL_SECONDS = 10.0  # a missed id can turn up later only from an earlier process's spool, once committed


class FeedbackIn(BaseModel):
    """An expert's date for a logged request: `year`, or `year_from` + `year_to` (negative = BC)."""

    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(min_length=1, max_length=200)
    year: int | None = Field(default=None, strict=True)
    year_from: int | None = Field(default=None, strict=True)
    year_to: int | None = Field(default=None, strict=True)
    source: str | None = Field(default=None, max_length=100)
    note: str | None = Field(default=None, max_length=2000)


def read_feedback(body: bytes, settings: Settings) -> tuple[FeedbackIn, int, int]:
    """(the feedback, year_from, year_to) a request's body gives; ApiError 400 for a body that breaks a rule
    (schema, one year or a range, no year 0, within the settings' span, in order)."""
    try:
        feedback = FeedbackIn.model_validate_json(body)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
                             for e in error.errors())
        raise ApiError(400, INVALID_PARAMETER_VALUE, problems or "invalid feedback") from error
    low, high = settings.min_year, settings.max_year
    if feedback.year is not None:
        if feedback.year_from is not None or feedback.year_to is not None:
            raise ApiError(400, INVALID_PARAMETER_VALUE, "give either year or year_from + year_to, not both")
        year_from = year_to = feedback.year
    elif feedback.year_from is not None and feedback.year_to is not None:
        year_from, year_to = feedback.year_from, feedback.year_to
    else:
        raise ApiError(400, INVALID_PARAMETER_VALUE, "give year, or both year_from and year_to")
    for name, value in (("year_from", year_from), ("year_to", year_to)):
        if value == 0:
            raise ApiError(400, INVALID_PARAMETER_VALUE, f"{name}: there is no year 0 (1 BC is -1, AD 1 is 1)")
        if not low <= value <= high:
            raise ApiError(400, INVALID_PARAMETER_VALUE, f"{name}={value} is outside {low}..{high}")
    if year_from > year_to:
        raise ApiError(400, INVALID_PARAMETER_VALUE, f"year_from {year_from} is after year_to {year_to}")
    return feedback, year_from, year_to


class KnownIds:
    """The request ids feedback may be taken for: remembered when answered, else looked up by `look_up` (a
    blocking call, run on this object's own thread) with misses remembered for a while."""

    def __init__(self, look_up: Callable[[str], bool]):
        self.look_up = look_up
        self.recent_ids: OrderedDict[str, None] = OrderedDict()
        self.unknown_ids: OrderedDict[str, float] = OrderedDict()  # id -> when a lookup missed it (monotonic)
        self.lookups = 0  # waiting or running on executor
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feedback")

    def remember(self, ids: list[str]) -> None:
        """Take feedback for `ids` from now on (the most recent RECENT_IDS are kept)."""
        for request_id in ids:
            self.recent_ids[request_id] = None
        while len(self.recent_ids) > RECENT_IDS:
            self.recent_ids.popitem(last=False)

    async def known(self, request_id: str) -> bool:
        """From memory (answered by this process, or missed by a recent lookup), else one lookup (ApiError 429
        past FEEDBACK_LOOKUPS under way, 503 when the lookup fails)."""
        if request_id in self.recent_ids:
            return True
        missed = self.unknown_ids.get(request_id)
        if missed is not None and time.monotonic() - missed < UNKNOWN_TTL_SECONDS:
            return False
        if self.lookups >= FEEDBACK_LOOKUPS:
            raise ApiError(429, REQUEST_LIMIT_EXCEEDED, f"{FEEDBACK_LOOKUPS} feedback lookups of request ids this "
                                                        "gateway did not answer recently are under way; nothing "
                                                        "was recorded, retry later", {"Retry-After": "1"})
        self.lookups += 1
        try:
            known = await asyncio.get_running_loop().run_in_executor(self.executor, self.look_up, request_id)
        except Exception as error:  # the lake is down or unreadable: the client may retry, nothing was recorded
            log.error("cannot check feedback's request id against %s", INFERENCE_LOG, exc_info=error)
            raise ApiError(503, TEMPORARILY_UNAVAILABLE, f"cannot check the request id against the inference log "
                                                         f"({type(error).__name__}: {error}); nothing was recorded"
                           ) from error
        finally:
            self.lookups -= 1
        if known:
            self.remember([request_id])
        else:
            self.unknown_ids[request_id] = time.monotonic()
            self.unknown_ids.move_to_end(request_id)
            while len(self.unknown_ids) > UNKNOWN_IDS:
                self.unknown_ids.popitem(last=False)
        return known

    def close(self) -> None:
        """Stop the lookup thread; lookups waiting for it are cancelled."""
        self.executor.shutdown(wait=False, cancel_futures=True)
