"""A small client for the coinyear serving API (the Databricks Model Serving wire contract).

Every failure becomes an `ApiError` with a message a person can act on: the pages show it, never a traceback.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field

import httpx

from coinyear.identity import ANONYMOUS, Credential

REQUEST_ID_HEADER = "x-request-id"
MODEL_NAME_HEADER = "served-model-name"
MODEL_VERSION_HEADER = "served-model-version"


class ApiError(RuntimeError):
    """The API could not answer: `status` is the HTTP status (None when it was never reached)."""

    def __init__(self, message: str, status: int | None = None, error_code: str | None = None, detail: str = ""):
        super().__init__(message)
        self.message, self.status, self.error_code, self.detail = message, status, error_code, detail


@dataclass
class Prediction:
    year: float
    request_id: str | None
    model_name: str | None
    model_version: str | None
    latency_ms: float
    low: float | None = None
    high: float | None = None
    out_of_distribution: bool = False
    neighbours: list[dict] = field(default_factory=list)  # the nearest reference coins, when asked and given
    portraits: list[dict] = field(default_factory=list)  # the likeliest portraits, when asked and given


def _explain(response: httpx.Response, url: str) -> ApiError:
    """Turn an error response (JSON `error_code` + `message`, or anything else) into an ApiError."""
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    code = body.get("error_code")
    detail = body.get("message") or response.text[:300] or response.reason_phrase
    status = response.status_code
    if status in (401, 403):
        message = (f"The API refused the request ({status} {code or 'unauthorized'}): {detail}. "
                   "Check the token (COINYEAR_API_TOKEN).")
    elif status == 404 and code == "ENDPOINT_NOT_FOUND":
        message = (f"The API has no serving endpoint of that name ({detail}). Set COINYEAR_ENDPOINT_NAME to the "
                   "endpoint's name (a Unity Catalog model name is not an endpoint name).")
    elif status == 413:
        message = f"The photos are too large for the API ({detail}). Try smaller images."
    elif status == 503:
        message = f"The API has no model ready to answer yet ({detail}). Try again in a moment."
    elif 400 <= status < 500:
        message = f"The API could not use this request ({code or status}): {detail}"
    else:
        message = f"The API failed ({status} {code or ''}): {detail}".replace("  ", " ")
    return ApiError(message, status, code, detail)


class ApiClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def _send(self, method: str, path: str, *, own_token: bool = True, token: str | None = None,
              **kwargs) -> httpx.Response:
        """The request, with this client's token; `own_token=False`: with `token` instead (None: with none)."""
        request = self.http.build_request(method, path, **kwargs)
        if not own_token:
            request.headers.pop("Authorization", None)
            if token:
                request.headers["Authorization"] = f"Bearer {token}"
        try:
            response = self.http.send(request)
        except httpx.TimeoutException as error:
            raise ApiError(f"The API at {self.url} did not answer within {self.http.timeout.read:.0f} s.") from error
        except httpx.TransportError as error:
            raise ApiError(f"Cannot reach the coinyear API at {self.url} ({error.__class__.__name__}). "
                           "Is `coinyear serve` running, and is COINYEAR_API_URL right?") from error
        if response.status_code >= 400:
            raise _explain(response, self.url)
        return response

    def predict(self, endpoint_name: str, front: bytes, back: bytes, interval: float | None = None,
                neighbours: int = 0, portraits: int = 0) -> Prediction:
        """Date one coin from its two photos (raw file bytes), sent as base64 JSON exactly as the API schema says,
        to `/serving-endpoints/{endpoint_name}/invocations` (the endpoint's name, not the model's); with the
        `interval` range, the `neighbours` nearest reference coins and the `portraits` likeliest portraits when
        asked for and the model can give them."""
        body: dict = {"inputs": [{"front_image_base64": base64.b64encode(front).decode("ascii"),
                                  "back_image_base64": base64.b64encode(back).decode("ascii")}]}
        path = f"/serving-endpoints/{endpoint_name}/invocations"
        params = {name: value for name, value in (("interval", interval), ("neighbours", neighbours),
                                                  ("portraits", portraits)) if value}
        while True:
            started = time.perf_counter()
            try:
                response, request_id = self._invoke(path, {**body, "params": params} if params else body)
                break
            except ApiError as error:
                # a model version logged without intervals, reference coins or a portrait head refuses that
                # parameter: the rest of the answer is still worth showing, so ask again without what it names
                refused = [name for name in params if name in error.detail] if error.status == 400 else []
                if not refused:
                    raise
                params = {name: value for name, value in params.items() if name not in refused}
        latency_ms = (time.perf_counter() - started) * 1000
        try:
            answer = response.json()["predictions"][0]
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise ApiError(f"The API answered with something that is not a prediction: {response.text[:200]}",
                           response.status_code) from error
        fields = answer if isinstance(answer, dict) else {"year": answer}
        model_name, model_version = self._served(response)
        return Prediction(
            year=float(fields["year"]),
            request_id=request_id,
            model_name=model_name,
            model_version=model_version,
            latency_ms=latency_ms,
            low=fields.get("low"),
            high=fields.get("high"),
            out_of_distribution=bool(fields.get("out_of_distribution", False)),
            neighbours=list(fields.get("neighbours") or []),
            portraits=list(fields.get("portraits") or []),
        )

    def _invoke(self, path: str, body: dict) -> tuple[httpx.Response, str | None]:
        """Send a scoring request; (the answer, the request id that feedback refers to)."""
        response = self._send("POST", path, json=body)
        return response, response.headers.get(REQUEST_ID_HEADER)

    def _served(self, response: httpx.Response) -> tuple[str | None, str | None]:
        return response.headers.get(MODEL_NAME_HEADER), response.headers.get(MODEL_VERSION_HEADER)

    def feedback(self, request_id: str, year_from: int, year_to: int, credential: Credential | None,
                 source: str = "ui", note: str | None = None) -> dict:
        """Record an expert's true date (a year or a range) against a logged request, sent with the person's own
        `credential`, never this client's token: the gateway records who gave it from the token it gets (None:
        sent with no token, which an open gateway records as anonymous)."""
        body = {"request_id": request_id, "year_from": year_from, "year_to": year_to, "source": source}
        if note:
            body["note"] = note
        return self._send("POST", "/feedback", json=body, own_token=False,
                          token=credential.token if credential else None).json()

    def version(self) -> dict:
        """What the API serves now: model name, version, alias, loaded-at."""
        return self._send("GET", "/version", timeout=5.0).json()


class _DatabricksAuth(httpx.Auth):
    """databricks-sdk's unified auth on every request (a PAT, or the OAuth token of a Databricks App's principal,
    refreshed when it expires)."""

    def __init__(self, config):
        self.config = config

    def auth_flow(self, request):
        request.headers.update(self.config.authenticate())
        yield request


class WorkspaceClient(ApiClient):
    """The UI talking to Databricks itself (`COINYEAR_SERVING_BACKEND=databricks`, e.g. as a Databricks App): scoring
    by the Model Serving endpoint, feedback as a file in the volume, with the contracts of the gateway's databricks
    backend (coinyear.databricks.volume): a `client_request_id` per request (the request id feedback refers to), the
    photos of a request over the payload table's limit stored in the volume first. The workspace comes from
    DATABRICKS_HOST and databricks-sdk's auth."""

    def __init__(self, endpoint_name: str, volume: str | None, timeout: float = 30.0):
        from databricks.sdk.core import Config

        if not volume:
            raise ApiError("COINYEAR_LOOP_VOLUME is not set: with COINYEAR_SERVING_BACKEND=databricks the UI keeps "
                           "corrections in that Unity Catalog volume (/Volumes/<catalog>/<schema>/<volume>).")
        try:
            config = Config()
        except ValueError as error:
            raise ApiError(f"No Databricks workspace configured for the UI ({error}).") from error
        super().__init__(config.host, None, timeout)
        self.http.auth = _DatabricksAuth(config)
        self.endpoint_name, self.volume = endpoint_name, volume.rstrip("/")

    def _invoke(self, path: str, body: dict) -> tuple[httpx.Response, str | None]:
        import json
        import uuid

        from coinyear.databricks.volume import PAYLOAD_LOG_LIMIT, photo_path

        request_id = uuid.uuid4().hex
        body = {**body, "client_request_id": request_id}
        if len(json.dumps(body)) > PAYLOAD_LOG_LIMIT:  # Model Serving will not log it: keep the photos first
            for row, record in enumerate(body["inputs"]):
                for side, column in (("front", "front_image_base64"), ("back", "back_image_base64")):
                    self._upload(photo_path(self.volume, request_id, row, side), base64.b64decode(record[column]))
        return self._send("POST", path, json=body), request_id

    def _served(self, response: httpx.Response) -> tuple[str | None, str | None]:
        name, version = super()._served(response)
        if name and version:
            return name, version
        served = self.version()
        return served.get("model_name"), served.get("model_version")

    def _upload(self, path: str, data: bytes, overwrite: bool = True) -> None:
        from coinyear.databricks.volume import files_api_path

        self._send("PUT", files_api_path(path), content=data, params={"overwrite": str(overwrite).lower()},
                   headers={"Content-Type": "application/octet-stream"})

    def feedback(self, request_id: str, year_from: int, year_to: int, credential: Credential | None,
                 source: str = "ui", note: str | None = None) -> dict:
        """The correction as a file in the volume; `coinyear ingest-payloads` appends it to `feedback`. There is
        no gateway to derive who gave it, so the file names the actor of the person's `credential` itself (as
        the gateway would), or `anonymous` without one; never the token."""
        from datetime import UTC, datetime

        from coinyear.databricks.volume import feedback_file

        actor = credential.actor if credential else ANONYMOUS
        record = {"request_id": request_id, "year_from": year_from, "year_to": year_to,
                  "timestamp": datetime.now(UTC), "source": source, "note": note, "actor": actor}
        path, data = feedback_file(self.volume, record)
        self._upload(path, data, overwrite=False)
        return {"request_id": request_id, "year_from": year_from, "year_to": year_to, "recorded": True,
                "actor": actor}

    def version(self) -> dict:
        """What the endpoint serves (the entity with the most traffic) and whether it is ready."""
        from coinyear.databricks.volume import served_model

        endpoint = self._send("GET", f"/api/2.0/serving-endpoints/{self.endpoint_name}", timeout=5.0).json()
        served = served_model(endpoint) or (None, None)
        state = endpoint.get("state") or {}
        ready = state.get("ready") == "READY"
        return {"model_name": served[0], "model_version": served[1] if ready else None,
                "last_error": None if ready else f"endpoint {self.endpoint_name} is {state.get('ready', 'not ready')}"}
