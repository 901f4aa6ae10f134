"""Admission control: bounds on the requests a gateway holds at once, and on their bodies.

A scoring request holds its body three to four times over while it is read, parsed and decoded, so without a
bound a burst of large requests grows the process until it is killed. Every POST (scoring and feedback: the
routes that read a body) is admitted only while fewer than `COINYEAR_MAX_INFLIGHT_REQUESTS` are in flight and
its body fits in what is left of `COINYEAR_MAX_INFLIGHT_BYTES` (the body counts as its declared Content-Length,
or as `COINYEAR_MAX_BODY_BYTES` when it declares none or more: no request holds more than that). Any other is
answered at once, from its headers, with `429 REQUEST_LIMIT_EXCEEDED` and `Retry-After`; its body is never read
(uvicorn discards it) and it is not logged. The ops routes (GET) are never refused: probes must see a busy
gateway as alive. The counters live on the event loop, the only place they are touched.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from coinyear.config import Settings
from coinyear.serve.errors import REQUEST_LIMIT_EXCEEDED, ApiError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

RETRY_AFTER_SECONDS = 1  # in-flight requests end within the request deadline, most within a fraction of a second


class Admission:
    """The in-flight counters and their bounds, from the settings."""

    def __init__(self, settings: Settings):
        self.max_requests, self.max_bytes = settings.max_inflight_requests, settings.max_inflight_bytes
        self.max_body_bytes = settings.max_body_bytes
        self.requests = 0  # admitted, not finished
        self.bytes = 0  # what they were counted as

    def cost(self, headers: list[tuple[bytes, bytes]]) -> int:
        """What a request's body counts for: its declared length, at most the largest body read."""
        for name, value in headers:
            if name.lower() == b"content-length" and value.isdigit():
                return min(int(value), self.max_body_bytes)
        return self.max_body_bytes  # chunked, or no length given: it may be that large

    def refusal(self, cost: int) -> ApiError | None:
        """Why a request of `cost` body bytes is not admitted now, or None when it is."""
        if self.requests >= self.max_requests:
            reason = f"{self.requests} requests are in flight (COINYEAR_MAX_INFLIGHT_REQUESTS={self.max_requests})"
        elif self.bytes + cost > self.max_bytes:
            reason = (f"its {cost} body bytes do not fit beside the {self.bytes} in flight "
                      f"(COINYEAR_MAX_INFLIGHT_BYTES={self.max_bytes})")
        else:
            return None
        return ApiError(429, REQUEST_LIMIT_EXCEEDED, f"the gateway is at capacity: {reason}; nothing was done, "
                                                     f"retry after {RETRY_AFTER_SECONDS} s",
                        {"Retry-After": str(RETRY_AFTER_SECONDS)})


class AdmissionMiddleware:
    """ASGI middleware applying `admission` to every POST; `on_refused(path)` hears of each refusal."""

    def __init__(self, app: ASGIApp, admission: Admission, on_refused: Callable[[str], None] | None = None):
        self.app, self.admission, self.on_refused = app, admission, on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        admission = self.admission
        cost = admission.cost(scope["headers"])
        refusal = admission.refusal(cost)
        if refusal is not None:
            if self.on_refused is not None:
                self.on_refused(scope["path"])
            await refusal.response()(scope, receive, send)
            return
        admission.requests += 1
        admission.bytes += cost
        try:
            await self.app(scope, receive, send)
        finally:
            admission.requests -= 1
            admission.bytes -= cost
