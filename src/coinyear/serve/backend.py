"""What the gateway's routes need of whoever scores: the `Backend` protocol, and the `Outcome` of one request.

Two implementations, one chosen at start-up (COINYEAR_SERVING_BACKEND): `LocalBackend` (coinyear.serve.local:
the model in this process, requests and feedback spooled to the lake) and `RemoteBackend`
(coinyear.databricks.gateway: scoring forwarded to a Model Serving endpoint, feedback kept in a volume). The
routes (coinyear.serve.app) hold what is the same for both: auth, admission, request checks, metrics, errors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

import numpy as np

from coinyear.serve.errors import ApiError
from coinyear.serve.wire import ParsedRequest, PreparedRow

if TYPE_CHECKING:
    from fastapi import Request

    from coinyear.config import Settings
    from coinyear.serve.metrics import Metrics


class Served(Protocol):
    """The model version that answered: the `served-model-name` and `served-model-version` headers."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...


@dataclass
class Outcome:
    """What one scoring request did, for the answer, the log and the metrics."""

    http_id: str
    arrived: datetime
    started: float
    endpoint_name: str | None
    model: Served | None = None
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


class Backend(Protocol):
    """Who scores, logs and keeps feedback behind the gateway's routes. Every method but start and stop may raise
    ApiError: the answer the client gets."""

    async def start(self) -> None:
        """Open what the backend holds (the app's lifespan)."""

    async def stop(self) -> None:
        """Close it again."""

    async def score(self, body: bytes, outcome: Outcome) -> None:
        """Score a request's body (already within its size limit, its headers checked) into `outcome`: the
        model that answered, the rows and the answers."""

    async def log(self, outcome: Outcome, request: Request, elapsed: float) -> None:
        """Log an answered or refused request before its answer leaves (a failed log sets `outcome.error`)."""

    async def known(self, request_id: str) -> bool:
        """Whether feedback may be taken for `request_id`."""

    async def store_feedback(self, record: dict) -> None:
        """Keep one `feedback` row durably; the answer leaves after it is kept."""

    def ready(self) -> dict:
        """`GET /ready`'s answer: ApiError 503 while this backend cannot score."""

    def version(self) -> dict:
        """`GET /version`'s answer: what is served and how the backend stands."""


# How the routes make their backend, with their settings and metrics (LocalBackend and RemoteBackend are ones).
BackendFactory = Callable[["Settings", "Metrics"], Backend]
