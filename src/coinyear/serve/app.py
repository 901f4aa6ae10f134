"""The gateway: FastAPI routes for scoring, feedback and operations.

Scoring (`POST /serving-endpoints/{name}/invocations`, `POST /invocations`) answers
`{"predictions": [year, ...]}` in input order with the headers `served-model-name`, `served-model-version` and
`x-request-id`. Every answered request is spooled durably (see coinyear.lake.spool.SpooledAppender) before the
answer leaves, so the inference log never misses an acknowledged request; rows that failed are logged too.
Every scoring request goes through the micro-batcher and has a deadline (`COINYEAR_REQUEST_TIMEOUT_SECONDS`):
past it the client gets a 504 `DEADLINE_EXCEEDED`, never a hang, and the request is not scored: its photos stop
decoding, it joins no forward pass, it is logged as the 504 it was and takes no feedback (only 200s do).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from mlflow.exceptions import MlflowException
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

import coinyear
from coinyear.config import Settings
from coinyear.lake import open_lake
from coinyear.lake.spool import SpoolClosedError, SpooledAppender
from coinyear.lake.tables import FEEDBACK, INFERENCE_LOG
from coinyear.params import unsupported
from coinyear.pyfunc import pair_tensors
from coinyear.serve.admission import Admission, AdmissionMiddleware
from coinyear.serve.auth import AppsProxyRoutes, BearerAuth
from coinyear.serve.batching import DispatcherDown, MicroBatcher
from coinyear.serve.errors import (
    BAD_REQUEST,
    DEADLINE_EXCEEDED,
    ENDPOINT_NOT_FOUND,
    INTERNAL_ERROR,
    INVALID_PARAMETER_VALUE,
    REQUEST_LIMIT_EXCEEDED,
    RESOURCE_DOES_NOT_EXIST,
    RESOURCE_LIMIT_EXCEEDED,
    TEMPORARILY_UNAVAILABLE,
    ApiError,
    install_handlers,
)
from coinyear.serve.lifecycle import ModelManager, ServedModel
from coinyear.serve.volume import SAFE_REQUEST_ID_RULE, safe_request_id
from coinyear.serve.wire import ParsedRequest, PreparedRow, parse_body, prepare_rows

if TYPE_CHECKING:  # forward imports this module
    from coinyear.serve.forward import RemoteModel

log = logging.getLogger(__name__)

# A body this many times over the limit is cut off instead of read to the end for a clean 413.
DRAIN_FACTOR = 4
RECENT_IDS = 200_000
# Feedback for an id that is not in memory costs a Delta scan and may wait for the spool's backlog to commit: that
# work runs on its own thread, never on the threads that decode photos for scoring, one lookup at a time, with
# at most FEEDBACK_LOOKUPS waiting or running (more are refused at once with a 429), and each miss is remembered
# for UNKNOWN_TTL_SECONDS, so a flood of bogus ids costs scoring nothing and the lake one scan per id at most.
FEEDBACK_LOOKUPS = 4
FEEDBACK_FLUSH_SECONDS = 2.0  # a lookup waits this long at most for the spool's backlog to reach Delta
UNKNOWN_IDS = 10_000
UNKNOWN_TTL_SECONDS = 10.0  # a missed id can turn up later only from an earlier process's spool, once committed


class Metrics:
    """Prometheus series of one app (own registry, so several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("coinyear_requests", "Scoring requests by HTTP status and error code",
                                ["status", "error_code"], registry=self.registry)
        self.rows = Counter("coinyear_rows", "Scored input rows", registry=self.registry)
        self.latency = Histogram("coinyear_request_latency_seconds", "Scoring request latency",
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10),
                                 registry=self.registry)
        self.batch_rows = Histogram("coinyear_batch_rows", "Rows per forward pass (micro-batch size)",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.model_version = Gauge("coinyear_model_version", "Registered version being served (0: none)",
                                   registry=self.registry)
        self.swaps = Counter("coinyear_model_swaps", "Model versions swapped in", registry=self.registry)
        self.load_failures = Counter("coinyear_model_load_failures", "Versions that failed to load or warm",
                                     registry=self.registry)
        self.inflight_requests = Gauge("coinyear_inflight_requests", "Scoring and feedback requests being handled",
                                       registry=self.registry)
        self.inflight_bytes = Gauge("coinyear_inflight_bytes", "Body bytes the requests being handled count for",
                                    registry=self.registry)
        self.log_backlog = Gauge("coinyear_inference_log_backlog", "Rows spooled but not yet in Delta",
                                 ["table"], registry=self.registry)
        self.spools: dict[str, SpooledAppender] = {}  # table -> its spool, whose health() is read at each scrape
        self.registry.register(self)

    SPOOL_GAUGES = (
        ("quarantined_segments", "Spool segments Delta refused for good, kept in quarantine/ for an operator"),
        ("pending_bytes", "Bytes spooled but not yet in Delta"),
        ("pending_rows", "Rows spooled but not yet in Delta"),
        ("accepting", "1 while the spool takes writes (0: closed, or its disk refuses them)"),
        ("ok", "1 while the spool takes writes, commits and has nothing quarantined"),
    )

    def watch_spool(self, table: str, spool: SpooledAppender) -> None:
        """Report `spool` under `table`: its backlog and its health() gauges (`coinyear_spool_*`)."""
        self.spools[table] = spool
        self.log_backlog.labels(table).set_function(lambda: spool.backlog)

    def collect(self):
        """The `coinyear_spool_*` gauges, from each spool's health() at scrape time (a prometheus collector)."""
        from prometheus_client.core import GaugeMetricFamily

        families = {key: GaugeMetricFamily(f"coinyear_spool_{key}", text, labels=["table"])
                    for key, text in self.SPOOL_GAUGES}
        for table, spool in self.spools.items():
            health = spool.health()
            for key, family in families.items():
                family.add_metric([table], float(health[key]))
        return list(families.values())


class FeedbackIn(BaseModel):
    """An expert's date for a logged request: `year`, or `year_from` + `year_to` (negative = BC)."""

    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(min_length=1, max_length=200)
    year: int | None = Field(default=None, strict=True)
    year_from: int | None = Field(default=None, strict=True)
    year_to: int | None = Field(default=None, strict=True)
    source: str | None = Field(default=None, max_length=100)
    note: str | None = Field(default=None, max_length=2000)


@dataclass
class Outcome:
    """What one scoring request did, for the answer, the log and the metrics."""

    http_id: str
    arrived: datetime
    started: float
    endpoint_name: str | None
    model: ServedModel | RemoteModel | None = None  # RemoteModel: the databricks backend's endpoint answered
    parsed: ParsedRequest | None = None
    rows: list[PreparedRow] = field(default_factory=list)
    years: np.ndarray | None = None
    answers: list | None = None  # what "predictions" holds: years, or dicts with an interval
    error: ApiError | None = None

    @property
    def status(self) -> int:
        return self.error.status if self.error else 200

    def row_ids(self) -> list[str]:
        count = max(len(self.rows), 1)
        return [self.http_id] if count == 1 else [f"{self.http_id}-{i}" for i in range(count)]


class Gateway:
    """Everything one serving process holds: model manager, batcher, lake writers, auth, metrics."""

    # None in the databricks backend (coinyear.serve.forward): the endpoint batches, the volume keeps feedback
    log_writer: SpooledAppender | None
    feedback_writer: SpooledAppender | None
    batcher: MicroBatcher | None

    def __init__(self, settings: Settings, host: str):
        self.settings = settings
        self.endpoint_name = settings.serving_endpoint_name
        self.auth = BearerAuth(settings, host)
        self.metrics = Metrics()
        self.admission = Admission(settings)
        self.metrics.inflight_requests.set_function(lambda: self.admission.requests)
        self.metrics.inflight_bytes.set_function(lambda: self.admission.bytes)
        self.recent_ids: OrderedDict[str, None] = OrderedDict()
        self.unknown_ids: OrderedDict[str, float] = OrderedDict()  # id -> when a lookup missed it (monotonic)
        self.feedback_lookups = 0  # waiting or running on feedback_executor
        self.feedback_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feedback")
        self._init_backend()

    def _init_backend(self) -> None:
        """The local backend: the model in this process, the lake writers (the databricks backend overrides)."""
        settings = self.settings
        self.lake = open_lake(settings)
        self.log_writer = SpooledAppender(self.lake, INFERENCE_LOG, settings.spool_dir / INFERENCE_LOG,
                                          settings.log_flush_seconds, settings.spool_max_commit_bytes
                                          ) if settings.inference_log else None
        self.feedback_writer = SpooledAppender(self.lake, FEEDBACK, settings.spool_dir / FEEDBACK,
                                               settings.log_flush_seconds, settings.spool_max_commit_bytes)
        self.models = ModelManager(settings, on_swap=self._swapped, on_failure=self._load_failed)
        self.batcher = MicroBatcher(lambda model, fronts, backs: model.score(fronts, backs),
                                    settings.batch_max_size, settings.batch_max_wait_ms,
                                    on_batch=self.metrics.batch_rows.observe, workers=settings.batch_workers)
        for table, writer in ((INFERENCE_LOG, self.log_writer), (FEEDBACK, self.feedback_writer)):
            if writer is not None:
                self.metrics.watch_spool(table, writer)

    def _swapped(self, model: ServedModel) -> None:
        self.metrics.swaps.inc()
        self.metrics.model_version.set(float(model.version) if model.version.isdigit() else -1)

    def _load_failed(self, version: str, reason: str) -> None:
        self.metrics.load_failures.inc()

    # ----------------------------------------------------------------------------------------- lifespan
    async def start(self) -> None:
        for writer in (self.log_writer, self.feedback_writer):
            if writer is not None:
                writer.start()
        if self.batcher is not None:
            self.batcher.start()
        self.models.start()

    async def stop(self) -> None:
        self.models.stop()
        if self.batcher is not None:
            await self.batcher.stop()
        self.feedback_executor.shutdown(wait=False, cancel_futures=True)
        for writer in (self.log_writer, self.feedback_writer):
            if writer is not None:
                await asyncio.to_thread(writer.close)

    # ------------------------------------------------------------------------------------------ scoring
    async def read_body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        too_big = ApiError(413, RESOURCE_LIMIT_EXCEEDED, f"request body larger than {limit} bytes")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit * DRAIN_FACTOR:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit * DRAIN_FACTOR:
                raise too_big
            if size <= limit:
                chunks.append(chunk)
        if size > limit:  # read to the end (bounded) so the client gets the 413 instead of a reset connection
            raise too_big
        return b"".join(chunks)

    async def score(self, request: Request, endpoint_name: str | None) -> Response:
        outcome = Outcome(uuid.uuid4().hex, datetime.now(UTC), time.perf_counter(), endpoint_name)
        timeout = self.settings.request_timeout_seconds
        try:
            async with asyncio.timeout(timeout) as deadline:
                self._refusal(request, endpoint_name)
                await self._score(request, outcome)
        except ApiError as error:
            outcome.error = error
        except TimeoutError as error:
            if not deadline.expired():
                outcome.error = self._internal_error(outcome, error)
            else:  # its batch may still run; its rows then go to nobody
                outcome.error = ApiError(504, DEADLINE_EXCEEDED, f"no answer within the {timeout:g} s deadline "
                                                                 f"(COINYEAR_REQUEST_TIMEOUT_SECONDS); not scored")
        except DispatcherDown as error:
            outcome.error = ApiError(503, TEMPORARILY_UNAVAILABLE, f"this gateway cannot score: {error}")
        except Exception as error:  # noqa: BLE001 - a bug must cost one answer, never the worker
            outcome.error = self._internal_error(outcome, error)
        elapsed = time.perf_counter() - outcome.started
        if await self._log(outcome, request, elapsed) and outcome.status == 200:
            self._remember(outcome.row_ids())  # feedback is taken only for answered requests the log holds
        self.metrics.requests.labels(str(outcome.status), outcome.error.error_code if outcome.error else "").inc()
        # what the client waits, the spool's fsync included (the logged execution_time_ms cannot hold its own fsync)
        self.metrics.latency.observe(time.perf_counter() - outcome.started)
        headers = {"x-request-id": outcome.http_id}
        if outcome.model is not None:
            headers.update({"served-model-name": outcome.model.name, "served-model-version": outcome.model.version})
        if outcome.error:
            return outcome.error.response(headers)
        self.metrics.rows.inc(len(outcome.rows))
        return JSONResponse({"predictions": outcome.answers}, headers=headers)

    def _refusal(self, request: Request, endpoint_name: str | None) -> None:
        """ApiError 401/403 (token), 404 (endpoint name) or 415 (Content-Type), from the headers alone: a refused
        request's body is never read, and it is logged and counted like any other answer (without photos)."""
        self.auth.check(request)
        if endpoint_name is not None and endpoint_name != self.endpoint_name:
            raise ApiError(404, ENDPOINT_NOT_FOUND, f"no serving endpoint named {endpoint_name!r}; "
                                                   f"this server serves {self.endpoint_name!r}")
        check_content_type(request)

    def _internal_error(self, outcome: Outcome, error: Exception) -> ApiError:
        log.error("scoring request %s failed", outcome.http_id, exc_info=error)
        return ApiError(500, INTERNAL_ERROR, f"internal error ({type(error).__name__})")

    async def _log(self, outcome: Outcome, request: Request, elapsed: float) -> bool:
        """Spool the request's rows (fsync'ed) before its answer leaves; True once they are durably logged.
        A failed or stuck write turns the answer into a 503: not logged means not answered, the client retries."""
        if self.log_writer is None:
            return False
        try:
            async with asyncio.timeout(self.settings.request_timeout_seconds):
                await asyncio.wrap_future(self.log_writer.submit(self._log_rows(outcome, request, elapsed)))
        except Exception as error:
            log.error("inference log spool write failed", exc_info=error)
            reason = "timed out" if isinstance(error, TimeoutError) else str(error)
            outcome.error = ApiError(503, TEMPORARILY_UNAVAILABLE, f"inference log unavailable ({reason})")
            return False
        return True

    async def _score(self, request: Request, outcome: Outcome) -> None:
        body = await self.read_body(request)
        batcher = self.batcher
        assert batcher is not None, "the local backend scores here (the databricks one overrides _score)"
        outcome.model = model = self.models.current  # this request finishes on this model, even across a swap
        abandoned = threading.Event()
        batcher.preparing += 1
        try:
            parsed, outcome.rows = await asyncio.to_thread(self._decode, body, model, abandoned.is_set)
        except asyncio.CancelledError:  # the deadline: the thread stops before its next photo, its rows go to nobody
            abandoned.set()
            raise
        finally:
            batcher.preparing -= 1
        outcome.parsed = parsed
        first_error = next((row.error for row in outcome.rows if row.error), None)
        if first_error:
            raise ApiError(400, INVALID_PARAMETER_VALUE, first_error)
        if model is None:
            raise ApiError(503, TEMPORARILY_UNAVAILABLE, "no production model is loaded yet; see GET /version")
        asked = parsed.asked
        why = unsupported(asked, intervals=model.has_intervals,
                          references=getattr(model.python_model, "references", None) is not None,
                          portraits=model.has_portraits)
        if why:  # the packaged model's own check (coinyear.params), before the photos reach the batcher
            raise ApiError(400, INVALID_PARAMETER_VALUE, f"model version {model.version} {why}")
        pairs = [row.arrays for row in outcome.rows if row.arrays is not None]
        if len(pairs) != len(outcome.rows):  # prepare_rows decodes every row it finds no error in
            raise RuntimeError("a row without an error has no decoded photos")
        fronts, backs = pair_tensors(pairs)
        scored = await batcher.submit(model, fronts, backs)  # plain and interval requests share batches
        outcome.years = scored["year"]
        if asked.interval or asked.neighbours or asked.portraits:  # only when asked: plain costs nothing more
            # off the event loop: the distance to every reference coin takes ~12 ms (see `_answers`)
            outcome.answers = await asyncio.to_thread(self._answers, model, scored, asked.interval, asked.neighbours,
                                                      asked.portraits)
        else:
            outcome.answers = [float(y) for y in outcome.years]

    def _decode(self, body: bytes, model: ServedModel | None,
                abandoned: Callable[[], bool]) -> tuple[ParsedRequest, list[PreparedRow]]:
        """JSON, base64 and photo decoding, off the event loop (one thread hop per request). It touches nothing of
        the request's Outcome: a request past its deadline is logged as it stood then, whatever this thread does."""
        parsed = parse_body(body, self.settings.max_rows)
        if parsed.client_request_id is not None and not safe_request_id(parsed.client_request_id):
            # a plain name wherever it goes: on Databricks a client_request_id names a folder of the loop volume
            raise ApiError(400, INVALID_PARAMETER_VALUE, f"client_request_id must be {SAFE_REQUEST_ID_RULE}")
        rows = prepare_rows(parsed.rows, model.image_size if model else None, model.grayscale if model else False,
                            abandoned)
        return parsed, rows

    @staticmethod
    def _answers(model: ServedModel, scored: dict, level: float, neighbours: int, portraits: int = 0) -> list[dict]:
        """Year, and the conformal range at this request's level with the out-of-distribution flag, and/or the
        request's nearest training coins, and/or its likeliest portraits, per row, from this request's slice of
        the batch's features and portrait probabilities: one
        product with every reference coin's features (memory-bound: ~12 ms for the ~2,900 OCRE coins on 2 cores,
        shared by the flag and the neighbours; 5 neighbours add ~0.6 ms more and ~21 kB of JSON)."""
        try:
            frame = model.python_model.answers(scored, level, neighbours, portraits)
        except MlflowException as error:
            raise ApiError(400, INVALID_PARAMETER_VALUE, error.message) from error
        answers: list[dict] = []
        for row in frame.to_dict(orient="records"):
            answer: dict = {"year": float(row["year"])}
            if level:
                answer.update(low=float(row["low"]), high=float(row["high"]),
                              out_of_distribution=bool(row["out_of_distribution"]))
            if neighbours:
                answer["neighbours"] = row["neighbours"]
            if portraits:
                answer["portraits"] = row["portraits"]
            answers.append(answer)
        return answers

    def _log_rows(self, outcome: Outcome, request: Request, elapsed: float) -> list[dict]:
        parsed, model, error = outcome.parsed, outcome.model, outcome.error
        metadata = json.dumps({
            "input_format": parsed.input_format if parsed else None,
            "params": parsed.params if parsed else None,
            "rows": len(outcome.rows),
            "user_agent": request.headers.get("user-agent"),
            "content_length": request.headers.get("content-length"),
        }, default=str)
        rows = outcome.rows or [PreparedRow()]
        records = []
        for index, (row_id, row) in enumerate(zip(outcome.row_ids(), rows)):
            records.append({
                "request_id": row_id,
                "http_request_id": outcome.http_id,
                "row_index": index,
                "client_request_id": parsed.client_request_id if parsed else None,
                "timestamp": outcome.arrived,
                "date": outcome.arrived.date(),
                "status_code": outcome.status,
                "error_code": error.error_code if error else None,
                "error_message": error.message if error else None,
                "execution_time_ms": elapsed * 1000,
                "endpoint_name": outcome.endpoint_name,
                "model_name": model.name if model else None,
                "model_version": model.version if model else None,
                # a pass may have scored a request whose deadline then passed: what it was not answered is not logged
                "prediction": float(outcome.years[index]) if outcome.years is not None and error is None else None,
                "front_image": row.front,
                "back_image": row.back,
                "front_image_bytes": row.front_size,
                "back_image_bytes": row.back_size,
                "request_metadata": metadata,
            })
        return records

    def _remember(self, ids: list[str]) -> None:
        for request_id in ids:
            self.recent_ids[request_id] = None
        while len(self.recent_ids) > RECENT_IDS:
            self.recent_ids.popitem(last=False)

    # ----------------------------------------------------------------------------------------- feedback
    def _logged(self, request_id: str) -> bool:
        """Whether the inference log's Delta table holds `request_id` answered with a 200 (a scan: on
        feedback_executor only); a request that was refused or timed out was never dated, so it takes no feedback."""
        found = self.lake.read(INFERENCE_LOG, columns=["request_id"],
                               filters=[("request_id", "=", request_id), ("status_code", "=", 200)])
        return len(found) > 0

    def _look_up(self, request_id: str) -> bool:
        """`_logged`, and again once the spool's backlog is in Delta (it may be on its way from an earlier process's
        spool); runs on feedback_executor."""
        known = self._logged(request_id)
        if not known and self.log_writer is not None and self.log_writer.backlog:
            self.log_writer.flush(FEEDBACK_FLUSH_SECONDS)
            known = self._logged(request_id)
        return known

    async def feedback(self, request: Request) -> dict:
        """Record an expert's date with who gave it (`actor`, from the token: coinyear.serve.auth); the token is
        checked before the body is read (an anonymous caller learns nothing about the schema)."""
        actor = self.auth.check(request)
        check_content_type(request)
        body = await self.read_body(request)
        try:
            feedback = FeedbackIn.model_validate_json(body)
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
                                 for e in error.errors())
            raise ApiError(400, INVALID_PARAMETER_VALUE, problems or "invalid feedback") from error
        low, high = self.settings.min_year, self.settings.max_year
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
        if not await self._known(feedback.request_id):
            raise ApiError(404, RESOURCE_DOES_NOT_EXIST, f"no logged request with id {feedback.request_id!r}")
        record = {"request_id": feedback.request_id, "year_from": year_from, "year_to": year_to,
                  "timestamp": datetime.now(UTC), "source": feedback.source, "note": feedback.note, "actor": actor}
        await self._store_feedback(record)
        return {"request_id": feedback.request_id, "year_from": year_from, "year_to": year_to, "recorded": True,
                "actor": actor}

    async def _known(self, request_id: str) -> bool:
        """Whether feedback may be taken for `request_id`: from memory (answered by this process, or missed by a
        recent lookup), else one lookup on feedback_executor (see FEEDBACK_LOOKUPS)."""
        if request_id in self.recent_ids:
            return True
        missed = self.unknown_ids.get(request_id)
        if missed is not None and time.monotonic() - missed < UNKNOWN_TTL_SECONDS:
            return False
        if self.feedback_lookups >= FEEDBACK_LOOKUPS:
            raise ApiError(429, REQUEST_LIMIT_EXCEEDED, f"{FEEDBACK_LOOKUPS} feedback lookups of request ids this "
                                                        "gateway did not answer recently are under way; nothing "
                                                        "was recorded, retry later", {"Retry-After": "1"})
        self.feedback_lookups += 1
        try:
            known = await asyncio.get_running_loop().run_in_executor(self.feedback_executor, self._look_up,
                                                                     request_id)
        except Exception as error:  # the lake is down or unreadable: the client may retry, nothing was recorded
            log.error("cannot check feedback's request id against %s", INFERENCE_LOG, exc_info=error)
            raise ApiError(503, TEMPORARILY_UNAVAILABLE, f"cannot check the request id against the inference log "
                                                         f"({type(error).__name__}: {error}); nothing was recorded"
                           ) from error
        finally:
            self.feedback_lookups -= 1
        if known:
            self._remember([request_id])
        else:
            self.unknown_ids[request_id] = time.monotonic()
            self.unknown_ids.move_to_end(request_id)
            while len(self.unknown_ids) > UNKNOWN_IDS:
                self.unknown_ids.popitem(last=False)
        return known

    async def _store_feedback(self, record: dict) -> None:
        assert self.feedback_writer is not None, "the local backend has one (the databricks one overrides this)"
        try:
            await asyncio.wrap_future(self.feedback_writer.submit([record]))
        except (OSError, SpoolClosedError) as error:  # a full disk, a closing gateway: retry, or try another one
            log.error("feedback spool write failed", exc_info=error)
            raise ApiError(503, TEMPORARILY_UNAVAILABLE, f"cannot store the feedback ({error}); nothing was "
                                                         f"recorded") from error

    # -------------------------------------------------------------------------------------------- ops
    def ready(self) -> dict:
        """Readiness: a production model is loaded and the inference log's spool takes writes (ApiError 503
        otherwise: no answer could be logged, so none may leave).

        Each spool's health() is reported under its table; `degraded` is true while one is not ok (a lake that
        is down, a quarantined segment, a failed spool write) but the inference log still takes writes.
        """
        model = self.models.current
        if model is None:
            raise ApiError(503, TEMPORARILY_UNAVAILABLE, "no production model is loaded yet")
        spools = {table: writer.health() for table, writer in ((INFERENCE_LOG, self.log_writer),
                                                               (FEEDBACK, self.feedback_writer)) if writer is not None}
        log_health = spools.get(INFERENCE_LOG)
        if log_health is not None and not log_health["accepting"]:
            raise ApiError(503, TEMPORARILY_UNAVAILABLE, "the inference log spool cannot take writes "
                                                         f"({log_health['last_error'] or 'closed'})")
        return {"ready": True, "model_name": model.name, "model_version": model.version,
                "degraded": not all(health["ok"] for health in spools.values()), **spools}

    def check_dispatcher(self) -> None:
        """ApiError 503 when the batch dispatcher has stopped: this process can no longer score anything."""
        if self.batcher is not None and not self.batcher.alive:
            raise ApiError(503, TEMPORARILY_UNAVAILABLE, f"cannot score: {self.batcher.failure or 'not started'}")

    def version(self) -> dict:
        writers = {INFERENCE_LOG: self.log_writer, FEEDBACK: self.feedback_writer}
        return {
            "service": "coinyear",
            "service_version": coinyear.__version__,
            "endpoint_name": self.endpoint_name,
            **self.models.status(),
            "dispatcher": None if self.batcher is None else {
                "alive": self.batcher.alive, "failure": self.batcher.failure,
                "failed_batches": self.batcher.failed_batches},
            "lake": {table: None if w is None else {"backlog": w.backlog, "committed_rows": w.committed_rows,
                                                     "last_error": w.last_error}
                     for table, w in writers.items()},
        }


ERROR_FIELDS = ("last_error", "failure", "rejected_versions")
HIDDEN = "hidden: send a valid bearer token to see it"


def redact_errors(status: Any) -> Any:
    """`status` (the /version answer) with every error text replaced by HIDDEN; an absent error (None, empty)
    stays as it is, so an unauthenticated probe still sees whether something is wrong."""
    if not isinstance(status, dict):
        return status
    redacted = {}
    for key, value in status.items():
        if key in ERROR_FIELDS and value:
            redacted[key] = {name: HIDDEN for name in value} if isinstance(value, dict) else HIDDEN
        else:
            redacted[key] = redact_errors(value)
    return redacted


def check_content_type(request: Request) -> None:
    """415 unless the body is declared JSON in UTF-8, as MLflow's scoring server and Databricks Model Serving
    answer; a request with no Content-Type at all is read as JSON."""
    declared = request.headers.get("content-type")
    if declared is None:
        return
    mime, *parameters = (part.strip() for part in declared.split(";"))
    options = {key.strip().lower(): value.strip().strip('"').lower()
               for key, _, value in (item.partition("=") for item in parameters if item)}
    if mime.lower() != "application/json" or options.get("charset", "utf-8") != "utf-8" \
            or set(options) - {"charset"}:
        raise ApiError(415, BAD_REQUEST, f"unsupported Content-Type {declared[:100]!r}: send application/json "
                                         "(UTF-8)")


def create_app(settings: Settings, host: str | None = None) -> FastAPI:
    """The ASGI app; `host` is where it will listen (auth may be off only on loopback).

    COINYEAR_SERVING_BACKEND picks who scores: this process (`local`) or the Model Serving endpoint it forwards to
    (`databricks`, coinyear.serve.forward); the routes and the wire format are the same.
    """
    if settings.serving_backend == "databricks":
        from coinyear.serve.forward import DatabricksGateway

        gateway: Gateway = DatabricksGateway(settings, host or settings.host)
    else:
        gateway = Gateway(settings, host or settings.host)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(title="coinyear serving gateway", version=coinyear.__version__, lifespan=lifespan,
                  description="Dates a coin from its two photos. Wire-compatible with Databricks Model Serving "
                              "and the MLflow scoring server.")
    app.state.gateway = gateway
    install_handlers(app)

    def refused(path: str) -> None:
        """A scoring request refused for capacity counts among the scoring requests (feedback has no series)."""
        if path.endswith("/invocations"):
            gateway.metrics.requests.labels("429", REQUEST_LIMIT_EXCEEDED).inc()

    app.add_middleware(AdmissionMiddleware, admission=gateway.admission, on_refused=refused)
    if settings.apps_proxy:  # a Databricks App: reachable with a token only under /api/ (coinyear.serve.auth)
        app.add_middleware(AppsProxyRoutes)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        """A bug outside scoring (which catches its own) still answers MLflow JSON, not a plain-text 500."""
        log.error("%s %s failed", request.method, request.url.path, exc_info=error)
        return ApiError(500, INTERNAL_ERROR, f"internal error ({type(error).__name__})").response()

    @app.post("/serving-endpoints/{name}/invocations", tags=["scoring"])
    async def endpoint_invocations(name: str, request: Request):
        """Score rows of {front_image_base64, back_image_base64} (inputs / dataframe_records / dataframe_split)."""
        return await gateway.score(request, name)

    @app.post("/invocations", tags=["scoring"])
    async def invocations(request: Request):
        """Same as /serving-endpoints/{name}/invocations (the MLflow scoring server's path)."""
        return await gateway.score(request, None)

    # the handler reads the raw body itself (after the token check), so the schema is declared here
    feedback_body = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/FeedbackIn"}}}}}

    @app.post("/feedback", tags=["feedback"], openapi_extra=feedback_body)
    async def feedback(request: Request):
        """Record an expert's date for a logged request (`x-request-id`, or `<id>-<row>` for several rows)."""
        return await gateway.feedback(request)

    @app.get("/health", tags=["ops"])
    async def health():
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"])
    async def ready():
        """Readiness: a production model is loaded and the batch dispatcher runs (503 otherwise)."""
        gateway.check_dispatcher()
        return gateway.ready()

    @app.get("/version", tags=["ops"])
    async def version(request: Request):
        """Served model name, version, alias, span, load time, last load error, lake backlog. With tokens
        configured, the error texts (they can name hosts, paths and versions) go only to a caller with a valid
        token; anyone else sees whether there is an error, not what it says."""
        answer = gateway.version()
        try:
            gateway.auth.check(request)
        except ApiError:
            return redact_errors(answer)
        return answer

    @app.get("/metrics", tags=["ops"])
    async def metrics():
        """Prometheus metrics."""
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    generated_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generated_openapi()  # FastAPI keeps it as app.openapi_schema
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas["FeedbackIn"] = FeedbackIn.model_json_schema(ref_template="#/components/schemas/{model}")
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the schema
    return app


def serve(settings: Settings, host: str | None = None, port: int | None = None, access_log: bool = False) -> None:
    """Run the gateway with uvicorn in this process (one process: batching needs all requests in one place)."""
    import uvicorn

    from coinyear.config import set_torch_threads

    set_torch_threads(settings)
    host, port = host or settings.host, port or settings.port
    uvicorn.run(create_app(settings, host), host=host, port=port, access_log=access_log, log_level="info")
