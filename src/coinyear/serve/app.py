"""The gateway's routes: scoring, feedback and operations, built once over the backend chosen at start-up.

Scoring (`POST /serving-endpoints/{name}/invocations`, `POST /invocations`) answers
`{"predictions": [year, ...]}` in input order with the headers `served-model-name`, `served-model-version` and
`x-request-id`. What is the same for every backend is here: bearer auth, admission, the body limit, request
checks, deadlines, metrics and MLflow JSON errors. Who scores, logs and keeps feedback is the backend's
(coinyear.serve.backend.Backend): the local one (coinyear.serve.local) spools every answered request durably
before the answer leaves, so the inference log never misses an acknowledged request; rows that failed are logged
too. Every scoring request has a deadline (`COINYEAR_REQUEST_TIMEOUT_SECONDS`): past it the client gets a 504
`DEADLINE_EXCEEDED`, never a hang, and the request is not scored; it is logged as the 504 it was and takes no
feedback (only 200s do).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import coinyear
from coinyear.config import Settings
from coinyear.serve.admission import Admission, AdmissionMiddleware
from coinyear.serve.auth import AppsProxyRoutes, BearerAuth
from coinyear.serve.backend import Backend, BackendFactory, Outcome
from coinyear.serve.errors import (
    BAD_REQUEST,
    DEADLINE_EXCEEDED,
    ENDPOINT_NOT_FOUND,
    INTERNAL_ERROR,
    REQUEST_LIMIT_EXCEEDED,
    RESOURCE_DOES_NOT_EXIST,
    RESOURCE_LIMIT_EXCEEDED,
    ApiError,
    install_handlers,
)
from coinyear.serve.feedback import FeedbackIn, read_feedback
from coinyear.serve.metrics import Metrics

log = logging.getLogger(__name__)

# A body this many times over the limit is cut off instead of read to the end for a clean 413.
DRAIN_FACTOR = 4


class Gateway:
    """What the routes hold: auth, admission, metrics and the backend (see coinyear.serve.backend)."""

    def __init__(self, settings: Settings, host: str, backend: BackendFactory):
        self.settings = settings
        self.endpoint_name = settings.serving_endpoint_name
        self.auth = BearerAuth(settings, host)
        self.metrics = Metrics()
        self.admission = Admission(settings)
        self.metrics.inflight_requests.set_function(lambda: self.admission.requests)
        self.metrics.inflight_bytes.set_function(lambda: self.admission.bytes)
        self.backend: Backend = backend(settings, self.metrics)

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
                await self.backend.score(await self.read_body(request), outcome)
        except ApiError as error:
            outcome.error = error
        except TimeoutError as error:
            if not deadline.expired():
                outcome.error = self._internal_error(outcome, error)
            else:  # its batch may still run; its rows then go to nobody
                outcome.error = ApiError(504, DEADLINE_EXCEEDED, f"no answer within the {timeout:g} s deadline "
                                                                 f"(COINYEAR_REQUEST_TIMEOUT_SECONDS); not scored")
        except Exception as error:  # noqa: BLE001 - a bug must cost one answer, never the worker
            outcome.error = self._internal_error(outcome, error)
        await self.backend.log(outcome, request, time.perf_counter() - outcome.started)
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

    # ----------------------------------------------------------------------------------------- feedback
    async def feedback(self, request: Request) -> dict:
        """Record an expert's date with who gave it (`actor`, from the token: coinyear.serve.auth); the token is
        checked before the body is read (an anonymous caller learns nothing about the schema)."""
        actor = self.auth.check(request)
        check_content_type(request)
        feedback, year_from, year_to = read_feedback(await self.read_body(request), self.settings)
        if not await self.backend.known(feedback.request_id):
            raise ApiError(404, RESOURCE_DOES_NOT_EXIST, f"no logged request with id {feedback.request_id!r}")
        record = {"request_id": feedback.request_id, "year_from": year_from, "year_to": year_to,
                  "timestamp": datetime.now(UTC), "source": feedback.source, "note": feedback.note, "actor": actor}
        await self.backend.store_feedback(record)
        return {"request_id": feedback.request_id, "year_from": year_from, "year_to": year_to, "recorded": True,
                "actor": actor}


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


def create_app(settings: Settings, host: str | None = None, backend: BackendFactory | None = None) -> FastAPI:
    """The ASGI app; `host` is where it will listen (auth may be off only on loopback).

    `backend` makes who scores (coinyear.targets.gateway_backend picks it from COINYEAR_SERVING_BACKEND); without
    one, this process scores (LocalBackend). The routes and the wire format are the same for every backend.
    """
    if backend is None and settings.serving_backend != "local":
        raise ValueError(f"COINYEAR_SERVING_BACKEND={settings.serving_backend}: pass its backend "
                         f"(coinyear.targets.gateway_backend)")
    if backend is None:
        from coinyear.serve.local import LocalBackend  # the model runtime and torch: only where this process scores

        backend = LocalBackend
    gateway = Gateway(settings, host or settings.host, backend)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await gateway.backend.start()
        try:
            yield
        finally:
            await gateway.backend.stop()

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
        return gateway.backend.ready()

    @app.get("/version", tags=["ops"])
    async def version(request: Request):
        """Served model name, version, alias, span, load time, last load error, lake backlog. With tokens
        configured, the error texts (they can name hosts, paths and versions) go only to a caller with a valid
        token; anyone else sees whether there is an error, not what it says."""
        answer = gateway.backend.version()
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


def serve(settings: Settings, host: str | None = None, port: int | None = None, access_log: bool = False,
          backend: BackendFactory | None = None) -> None:
    """Run the gateway with uvicorn in this process (one process: batching needs all requests in one place)."""
    import uvicorn

    host, port = host or settings.host, port or settings.port
    uvicorn.run(create_app(settings, host, backend), host=host, port=port, access_log=access_log, log_level="info")
