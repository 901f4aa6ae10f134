"""A small client for the coinyear serving API (the Databricks Model Serving wire contract).

Every failure becomes an `ApiError` with a message a person can act on: the pages show it, never a traceback.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass

import httpx

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

    def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TimeoutException as error:
            raise ApiError(f"The API at {self.url} did not answer within {self.http.timeout.read:.0f} s.") from error
        except httpx.TransportError as error:
            raise ApiError(f"Cannot reach the coinyear API at {self.url} ({error.__class__.__name__}). "
                           "Is `coinyear serve` running, and is COINYEAR_API_URL right?") from error
        if response.status_code >= 400:
            raise _explain(response, self.url)
        return response

    def predict(self, endpoint_name: str, front: bytes, back: bytes, interval: float | None = None) -> Prediction:
        """Date one coin from its two photos (raw file bytes), sent as base64 JSON exactly as the API schema says,
        to `/serving-endpoints/{endpoint_name}/invocations` (the endpoint's name, not the model's)."""
        body: dict = {"inputs": [{"front_image_base64": base64.b64encode(front).decode("ascii"),
                                  "back_image_base64": base64.b64encode(back).decode("ascii")}]}
        path = f"/serving-endpoints/{endpoint_name}/invocations"
        started = time.perf_counter()
        try:
            response = self._send("POST", path, json={**body, "params": {"interval": interval}} if interval else body)
        except ApiError as error:
            # a model version without intervals refuses the parameter: the year alone is still worth showing
            if not (interval and error.status == 400 and "interval" in error.detail):
                raise
            started = time.perf_counter()
            response = self._send("POST", path, json=body)
        latency_ms = (time.perf_counter() - started) * 1000
        try:
            answer = response.json()["predictions"][0]
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise ApiError(f"The API answered with something that is not a prediction: {response.text[:200]}",
                           response.status_code) from error
        fields = answer if isinstance(answer, dict) else {"year": answer}
        return Prediction(
            year=float(fields["year"]),
            request_id=response.headers.get(REQUEST_ID_HEADER),
            model_name=response.headers.get(MODEL_NAME_HEADER),
            model_version=response.headers.get(MODEL_VERSION_HEADER),
            latency_ms=latency_ms,
            low=fields.get("low"),
            high=fields.get("high"),
            out_of_distribution=bool(fields.get("out_of_distribution", False)),
        )

    def feedback(self, request_id: str, year_from: int, year_to: int) -> dict:
        """Record an expert's true date (a year or a range) against a logged request."""
        body = {"request_id": request_id, "year_from": year_from, "year_to": year_to, "source": "ui"}
        return self._send("POST", "/feedback", json=body).json()

    def version(self) -> dict:
        """What the API serves now: model name, version, alias, loaded-at."""
        return self._send("GET", "/version", timeout=5.0).json()
