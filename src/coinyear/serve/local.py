"""The gateway's local backend: the production model scored in this process, every request and correction spooled
durably to the lake (coinyear.lake.spool.SpooledAppender) before its answer leaves.

Scoring goes through the micro-batcher (coinyear.serve.batching); the model is watched, loaded and swapped by
coinyear.serve.lifecycle. A request past its deadline is cancelled where it stands: its photos stop decoding and
it joins no forward pass. Feedback is taken for ids this process answered, else for ids the inference log holds
(coinyear.serve.feedback.KnownIds).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable

from fastapi import Request
from mlflow.exceptions import MlflowException

import coinyear
from coinyear.config import Settings, set_torch_threads
from coinyear.lake import open_lake
from coinyear.lake.spool import SpoolClosedError, SpooledAppender
from coinyear.lake.tables import FEEDBACK, INFERENCE_LOG
from coinyear.params import unsupported
from coinyear.pyfunc import pair_tensors
from coinyear.serve.backend import Outcome
from coinyear.serve.batching import DispatcherDown, MicroBatcher
from coinyear.serve.errors import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE, ApiError
from coinyear.serve.feedback import KnownIds
from coinyear.serve.lifecycle import ModelManager, ServedModel
from coinyear.serve.metrics import Metrics
from coinyear.serve.request_id import SAFE_REQUEST_ID_RULE, safe_request_id
from coinyear.serve.wire import InvalidRequest, ParsedRequest, PreparedRow, parse_body, prepare_rows

log = logging.getLogger(__name__)

FEEDBACK_FLUSH_SECONDS = 2.0  # a lookup waits this long at most for the spool's backlog to reach Delta


class LocalBackend:
    """The model manager, batcher and lake writers of one serving process (a coinyear.serve.backend.Backend)."""

    def __init__(self, settings: Settings, metrics: Metrics):
        set_torch_threads(settings)  # this process scores (a forwarding gateway never loads torch)
        self.settings = settings
        self.metrics = metrics
        self.lake = open_lake(settings)
        self.log_writer = SpooledAppender(self.lake, INFERENCE_LOG, settings.spool_dir / INFERENCE_LOG,
                                          settings.log_flush_seconds, settings.spool_max_commit_bytes
                                          ) if settings.inference_log else None
        self.feedback_writer = SpooledAppender(self.lake, FEEDBACK, settings.spool_dir / FEEDBACK,
                                               settings.log_flush_seconds, settings.spool_max_commit_bytes)
        self.models = ModelManager(settings, on_swap=self._swapped, on_failure=self._load_failed)
        self.batcher = MicroBatcher(lambda model, fronts, backs: model.score(fronts, backs),
                                    settings.batch_max_size, settings.batch_max_wait_ms,
                                    on_batch=metrics.batch_rows.observe, workers=settings.batch_workers)
        self.ids = KnownIds(self._look_up)
        for table, writer in self._writers().items():
            if writer is not None:
                metrics.watch_spool(table, writer)

    def _writers(self) -> dict[str, SpooledAppender | None]:
        return {INFERENCE_LOG: self.log_writer, FEEDBACK: self.feedback_writer}

    def _swapped(self, model: ServedModel) -> None:
        self.metrics.swaps.inc()
        self.metrics.model_version.set(float(model.version) if model.version.isdigit() else -1)

    def _load_failed(self, version: str, reason: str) -> None:
        self.metrics.load_failures.inc()

    # ----------------------------------------------------------------------------------------- lifespan
    async def start(self) -> None:
        for writer in self._writers().values():
            if writer is not None:
                writer.start()
        self.batcher.start()
        self.models.start()

    async def stop(self) -> None:
        self.models.stop()
        await self.batcher.stop()
        self.ids.close()
        for writer in self._writers().values():
            if writer is not None:
                await asyncio.to_thread(writer.close)

    # ------------------------------------------------------------------------------------------ scoring
    async def score(self, body: bytes, outcome: Outcome) -> None:
        try:
            await self._score(body, outcome)
        except InvalidRequest as error:
            raise ApiError(400, error.error_code, error.message) from error
        except DispatcherDown as error:
            raise ApiError(503, TEMPORARILY_UNAVAILABLE, f"this gateway cannot score: {error}") from error

    async def _score(self, body: bytes, outcome: Outcome) -> None:
        batcher = self.batcher
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

    # ------------------------------------------------------------------------------------------ logging
    async def log(self, outcome: Outcome, request: Request, elapsed: float) -> None:
        """Spool the request's rows (fsync'ed) before its answer leaves. A failed or stuck write turns the answer
        into a 503: not logged means not answered, the client retries. Feedback is taken only for answered
        requests the log holds."""
        if self.log_writer is None:
            return
        try:
            async with asyncio.timeout(self.settings.request_timeout_seconds):
                await asyncio.wrap_future(self.log_writer.submit(self._log_rows(outcome, request, elapsed)))
        except Exception as error:
            log.error("inference log spool write failed", exc_info=error)
            reason = "timed out" if isinstance(error, TimeoutError) else str(error)
            outcome.error = ApiError(503, TEMPORARILY_UNAVAILABLE, f"inference log unavailable ({reason})")
            return
        if outcome.status == 200:
            self.ids.remember(outcome.row_ids())

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

    # ----------------------------------------------------------------------------------------- feedback
    async def known(self, request_id: str) -> bool:
        return await self.ids.known(request_id)

    def _logged(self, request_id: str) -> bool:
        """Whether the inference log's Delta table holds `request_id` answered with a 200 (a scan: on the lookup
        thread only); a request that was refused or timed out was never dated, so it takes no feedback."""
        found = self.lake.read(INFERENCE_LOG, columns=["request_id"],
                               filters=[("request_id", "=", request_id), ("status_code", "=", 200)])
        return len(found) > 0

    def _look_up(self, request_id: str) -> bool:
        """`_logged`, and again once the spool's backlog is in Delta (it may be on its way from an earlier process's
        spool); runs on the lookup thread (KnownIds)."""
        known = self._logged(request_id)
        if not known and self.log_writer is not None and self.log_writer.backlog:
            self.log_writer.flush(FEEDBACK_FLUSH_SECONDS)
            known = self._logged(request_id)
        return known

    async def store_feedback(self, record: dict) -> None:
        try:
            await asyncio.wrap_future(self.feedback_writer.submit([record]))
        except (OSError, SpoolClosedError) as error:  # a full disk, a closing gateway: retry, or try another one
            log.error("feedback spool write failed", exc_info=error)
            raise ApiError(503, TEMPORARILY_UNAVAILABLE, f"cannot store the feedback ({error}); nothing was "
                                                         f"recorded") from error

    # -------------------------------------------------------------------------------------------- ops
    def ready(self) -> dict:
        """Readiness: the batch dispatcher runs, a production model is loaded and the inference log's spool takes
        writes (ApiError 503 otherwise: no answer could be scored or logged, so none may leave).

        Each spool's health() is reported under its table; `degraded` is true while one is not ok (a lake that
        is down, a quarantined segment, a failed spool write) but the inference log still takes writes.
        """
        if not self.batcher.alive:
            raise ApiError(503, TEMPORARILY_UNAVAILABLE, f"cannot score: {self.batcher.failure or 'not started'}")
        model = self.models.current
        if model is None:
            raise ApiError(503, TEMPORARILY_UNAVAILABLE, "no production model is loaded yet")
        spools = {table: writer.health() for table, writer in self._writers().items() if writer is not None}
        log_health = spools.get(INFERENCE_LOG)
        if log_health is not None and not log_health["accepting"]:
            raise ApiError(503, TEMPORARILY_UNAVAILABLE, "the inference log spool cannot take writes "
                                                         f"({log_health['last_error'] or 'closed'})")
        return {"ready": True, "model_name": model.name, "model_version": model.version,
                "degraded": not all(health["ok"] for health in spools.values()), **spools}

    def version(self) -> dict:
        return {
            "service": "coinyear",
            "service_version": coinyear.__version__,
            "endpoint_name": self.settings.serving_endpoint_name,
            **self.models.status(),
            "dispatcher": {"alive": self.batcher.alive, "failure": self.batcher.failure,
                           "failed_batches": self.batcher.failed_batches},
            "lake": {table: None if w is None else {"backlog": w.backlog, "committed_rows": w.committed_rows,
                                                     "last_error": w.last_error}
                     for table, w in self._writers().items()},
        }
