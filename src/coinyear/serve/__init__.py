"""Serving stage: the REST gateway (`coinyear serve`).

app        routes: scoring, feedback, /health /ready /version /metrics, OpenAPI at /docs
wire       the MLflow / Databricks scoring request formats, decoded into coin rows
auth       bearer tokens
batching   concurrent requests micro-batched into one forward pass
lifecycle  production alias watch, background load + smoke test + warm, atomic swap
errors     MLflow JSON error codes
"""

from coinyear.serve.app import create_app, serve

__all__ = ["create_app", "serve"]
