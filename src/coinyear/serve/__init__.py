"""Serving stage: the REST gateway (`coinyear serve`).

app        routes: scoring, feedback, /health /ready /version /metrics, OpenAPI at /docs, over one backend
backend    the Backend protocol the routes call (score, log, feedback, ready, version) and a request's Outcome
local      the local backend: the model in this process, requests and feedback spooled to the lake
metrics    the Prometheus series
feedback   the /feedback body's rules and the request ids feedback is taken for
wire       the MLflow / Databricks scoring request formats, decoded into coin rows
request_id the rule a client_request_id must follow (a plain name)
auth       bearer tokens
batching   concurrent requests micro-batched into one forward pass
lifecycle  production alias watch, background load + smoke test + warm, atomic swap
errors     MLflow JSON error codes

`create_app` and `serve` are loaded on first use, so importing a light piece (auth, errors, wire) does not load
FastAPI's app, the model runtime or torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from coinyear.serve.app import create_app, serve

__all__ = ["create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from coinyear.serve import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
