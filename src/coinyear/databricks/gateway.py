"""The gateway's databricks backend: scoring forwarded to a Model Serving endpoint, feedback kept in a volume.

With `COINYEAR_SERVING_BACKEND=databricks` the gateway keeps its routes, wire format, bearer auth and JSON
errors, but holds no model: each scoring request is forwarded unchanged to
`POST <workspace>/serving-endpoints/<COINYEAR_ENDPOINT_NAME>/invocations`, with one addition, `client_request_id`
set to the gateway's request id (the `x-request-id` header; a client's own `client_request_id` is replaced),
and the endpoint's answer goes back as it came. `/feedback`, `/version` and `/ready` stay here: Model Serving has
none of them. It runs without Spark or a Delta writer (e.g. as a Databricks App), so nothing is logged locally:

- inference log: Model Serving logs the forwarded request in the endpoint's AI Gateway payload table;
  `coinyear ingest-payloads` (coinyear.databricks.payloads) maps it onto `inference_log`, deriving `request_id` from
  `client_request_id` exactly as this gateway numbers rows (`<id>`, or `<id>-<row>` for several rows).
- photos of big requests: Model Serving does not log a request over ~1 MB (its `request` is null). Before such a
  request is forwarded, both photos of every row go to the volume, `<COINYEAR_LOOP_VOLUME>/photos/<id>/<row>/front`
  and `.../back` (decoded image bytes); a request whose photos cannot be stored is answered 503, not forwarded.
- feedback: one JSON file per correction, `<COINYEAR_LOOP_VOLUME>/feedback/<UTC time>-<uuid>.json`, holding one
  `feedback` row (`request_id`, `year_from`, `year_to`, `timestamp` ISO 8601, `source`, `note`, `actor`: the
  caller's token's actor, as the local backend records it); the answer leaves after the file is stored.
  `coinyear ingest-payloads` appends it to `feedback` once its request is in `inference_log` (the payload table
  is up to an hour late, so the request id cannot be checked here).

Workspace calls, all with databricks-sdk's unified auth (DATABRICKS_HOST + DATABRICKS_TOKEN, or the service
principal a Databricks App gets): `POST /serving-endpoints/{name}/invocations`, `GET /api/2.0/serving-endpoints/
{name}` (what it serves, whether it is ready; polled every COINYEAR_ALIAS_POLL_SECONDS) and the Files API
`PUT /api/2.0/fs/files{path}`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from urllib.parse import quote

import httpx
from fastapi import Request

import coinyear
from coinyear.coin_input import InvalidCoinInput, decode_base64
from coinyear.config import Settings
from coinyear.databricks.volume import PAYLOAD_LOG_LIMIT, feedback_file, files_api_path, photo_path, served_model
from coinyear.serve.backend import Outcome
from coinyear.serve.errors import BAD_REQUEST, HTTP_CODES, INTERNAL_ERROR, TEMPORARILY_UNAVAILABLE, ApiError
from coinyear.serve.wire import InvalidRequest, PreparedRow, json_object, parse_body

if TYPE_CHECKING:  # the SDK is imported when the backend opens
    from databricks.sdk.core import Config

    from coinyear.serve.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteModel:
    """What the endpoint serves: a registered model name and version (the headers of an answer)."""

    name: str
    version: str


class Workspace:
    """The few Databricks REST calls the gateway makes, authenticated by databricks-sdk."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.config: Config | None = None
        self.http: httpx.AsyncClient | None = None

    async def open(self) -> None:
        from databricks.sdk.core import Config

        # Config() may probe the host for its metadata: off the event loop
        self.config = config = await asyncio.to_thread(Config)
        self.http = httpx.AsyncClient(base_url=config.host.rstrip("/"),
                                      timeout=httpx.Timeout(self.settings.api_timeout, connect=10.0))

    async def close(self) -> None:
        if self.http is not None:
            await self.http.aclose()

    def _opened(self) -> tuple[Config, httpx.AsyncClient]:
        if self.config is None or self.http is None:
            raise RuntimeError("the workspace client is not open (Workspace.open)")
        return self.config, self.http

    async def _headers(self) -> dict[str, str]:
        config, _ = self._opened()
        return await asyncio.to_thread(config.authenticate)  # refreshes an OAuth token when it expires

    async def invoke(self, endpoint: str, body: bytes) -> httpx.Response:
        _, http = self._opened()
        headers = {**await self._headers(), "Content-Type": "application/json"}
        return await http.post(f"/serving-endpoints/{quote(endpoint, safe='')}/invocations", content=body,
                               headers=headers)

    async def endpoint(self, endpoint: str) -> dict:
        _, http = self._opened()
        response = await http.get(f"/api/2.0/serving-endpoints/{quote(endpoint, safe='')}",
                                  headers=await self._headers())
        response.raise_for_status()
        return response.json()

    async def upload(self, path: str, data: bytes, overwrite: bool) -> None:
        """Files API: store `data` at `path` (a /Volumes/... path); raises unless the workspace stored it."""
        _, http = self._opened()
        headers = {**await self._headers(), "Content-Type": "application/octet-stream"}
        response = await http.put(files_api_path(path), content=data, headers=headers,
                                  params={"overwrite": "true" if overwrite else "false"})
        response.raise_for_status()


def _upstream_error(response: httpx.Response) -> ApiError:
    """The endpoint's error as ours: its MLflow JSON when it sent one, else its status and text."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {}
    status = response.status_code
    code = body.get("error_code") or HTTP_CODES.get(status, BAD_REQUEST if status < 500 else INTERNAL_ERROR)
    return ApiError(status, str(code), str(body.get("message") or response.text[:500] or response.reason_phrase))


class RemoteBackend:
    """Scoring done by a Model Serving endpoint, feedback kept in the loop volume (a coinyear.serve.backend.Backend;
    see the module docstring)."""

    def __init__(self, settings: Settings, metrics: Metrics):
        if not settings.loop_volume:
            raise RuntimeError("the databricks serving backend needs COINYEAR_LOOP_VOLUME (/Volumes/<catalog>/"
                               "<schema>/<volume>): feedback and the photos of big requests are kept there")
        self.settings = settings
        self.metrics = metrics
        self.endpoint_name = settings.serving_endpoint_name
        self.volume = settings.loop_volume.rstrip("/")
        self.workspace = Workspace(settings)
        self.served: RemoteModel | None = None
        self.endpoint_state: dict = {}
        self.last_error: str | None = None
        self.last_check: datetime | None = None
        self._poller: asyncio.Task | None = None

    # ----------------------------------------------------------------------------------------- lifespan
    async def start(self) -> None:
        await self.workspace.open()
        await self._refresh()
        self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        await self.workspace.close()

    async def _refresh(self) -> None:
        try:
            endpoint = await self.workspace.endpoint(self.endpoint_name)
        except (httpx.HTTPError, ValueError) as error:  # keep serving: the endpoint may answer even so
            self.last_error = f"cannot read serving endpoint {self.endpoint_name!r}: {error}"
            log.warning(self.last_error)
            return
        self.last_check = datetime.now(UTC)
        self.endpoint_state = endpoint.get("state") or {}
        served = served_model(endpoint)
        self.served = RemoteModel(*served) if served else None
        if self.served is not None:
            self.metrics.model_version.set(float(self.served.version) if self.served.version.isdigit() else -1)
        self.last_error = None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.alias_poll_seconds)
            await self._refresh()

    # ------------------------------------------------------------------------------------------ scoring
    async def score(self, body: bytes, outcome: Outcome) -> None:
        try:
            payload = json_object(body)  # read as the local backend reads it: not JSON, or not an object, is a 400
        except InvalidRequest as error:
            raise ApiError(400, error.error_code, error.message) from error
        # anything else is for the endpoint to judge: it answers, and its payload table logs, even a bad request
        payload["client_request_id"] = outcome.http_id
        try:
            forwarded = json.dumps(payload).encode()
        except (ValueError, RecursionError) as error:  # read back to the limit of the stack, not written again
            raise ApiError(400, BAD_REQUEST, f"Invalid input: the JSON is nested too deeply ({error})") from error
        if len(forwarded) > PAYLOAD_LOG_LIMIT:
            await self._store_photos(forwarded, outcome.http_id)
        try:
            response = await self.workspace.invoke(self.endpoint_name, forwarded)
        except httpx.HTTPError as error:
            raise ApiError(503, TEMPORARILY_UNAVAILABLE, f"Model Serving endpoint {self.endpoint_name!r} did not "
                                                         f"answer ({type(error).__name__}: {error})") from error
        name, version = response.headers.get("served-model-name"), response.headers.get("served-model-version")
        outcome.model = RemoteModel(name, version) if name and version else self.served
        if response.status_code != 200:
            raise _upstream_error(response)
        try:
            outcome.answers = list(response.json()["predictions"])
        except (ValueError, KeyError, TypeError) as error:
            raise ApiError(502, INTERNAL_ERROR, f"the endpoint answered something that is not predictions: "
                                                f"{response.text[:200]}") from error
        outcome.rows = [PreparedRow() for _ in outcome.answers]

    async def _store_photos(self, body: bytes, request_id: str) -> None:
        """Both photos of every row into the volume, before the request that Model Serving will not log leaves."""
        try:
            rows = parse_body(body, self.settings.max_rows).rows
        except InvalidRequest:
            return  # the endpoint refuses it: there is no coin to keep
        uploads = []
        for index, values in enumerate(rows):
            for side, value in zip(("front", "back"), values):
                try:
                    data = decode_base64(value, index, side)
                except InvalidCoinInput:
                    continue
                uploads.append(self.workspace.upload(photo_path(self.volume, request_id, index, side), data, True))
        try:
            await asyncio.gather(*uploads)
        except httpx.HTTPError as error:  # not logged anywhere means not answered: the client retries
            raise ApiError(503, TEMPORARILY_UNAVAILABLE, f"cannot keep the photos of this request in "
                                                         f"{self.volume} ({error})") from error

    async def log(self, outcome: Outcome, request: Request, elapsed: float) -> None:
        """Nothing here: Model Serving logs the forwarded request in its payload table."""

    # ----------------------------------------------------------------------------------------- feedback
    async def known(self, request_id: str) -> bool:
        # The payload table is up to an hour late: `coinyear ingest-payloads` holds feedback until its request
        # is mapped, and rejects it (file kept) when it never is.
        return True

    async def store_feedback(self, record: dict) -> None:
        path, data = feedback_file(self.volume, record)
        try:
            await self.workspace.upload(path, data, False)
        except httpx.HTTPError as error:
            raise ApiError(503, TEMPORARILY_UNAVAILABLE, f"cannot store the feedback in {self.volume} "
                                                         f"({error}); nothing was recorded") from error

    # -------------------------------------------------------------------------------------------- ops
    def ready(self) -> dict:
        ready = self.endpoint_state.get("ready") == "READY"
        if not ready or self.served is None:
            raise ApiError(503, TEMPORARILY_UNAVAILABLE, f"serving endpoint {self.endpoint_name!r} is not ready "
                                                         f"({self.last_error or self.endpoint_state or 'unknown'})")
        return {"ready": True, "model_name": self.served.name, "model_version": self.served.version}

    def version(self) -> dict:
        return {
            "service": "coinyear",
            "service_version": coinyear.__version__,
            "serving_backend": "databricks",
            "endpoint_name": self.endpoint_name,
            "model_name": self.served.name if self.served else None,
            "model_version": self.served.version if self.served else None,
            "endpoint_state": self.endpoint_state,
            "last_check": self.last_check.isoformat() if self.last_check else None,
            "last_error": self.last_error,
            "loop_volume": self.volume,
        }
