"""Client and service errors as MLflow scoring-server JSON: `{"error_code": "...", "message": "..."}`.

The codes are MLflow's (`mlflow.protos.databricks_pb2.ErrorCode`), so MLflow and Databricks clients read them
as they read errors from their own servers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # FastAPI is the gateway's ([serve]); the codes and ApiError are read by jobs without it
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

BAD_REQUEST = "BAD_REQUEST"
INVALID_PARAMETER_VALUE = "INVALID_PARAMETER_VALUE"
RESOURCE_LIMIT_EXCEEDED = "RESOURCE_LIMIT_EXCEEDED"
REQUEST_LIMIT_EXCEEDED = "REQUEST_LIMIT_EXCEEDED"  # MLflow answers it with 429: too many requests, retry later
UNAUTHENTICATED = "UNAUTHENTICATED"
PERMISSION_DENIED = "PERMISSION_DENIED"
ENDPOINT_NOT_FOUND = "ENDPOINT_NOT_FOUND"
RESOURCE_DOES_NOT_EXIST = "RESOURCE_DOES_NOT_EXIST"
NOT_FOUND = "NOT_FOUND"
TEMPORARILY_UNAVAILABLE = "TEMPORARILY_UNAVAILABLE"
DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
INTERNAL_ERROR = "INTERNAL_ERROR"

HTTP_CODES = {400: BAD_REQUEST, 401: UNAUTHENTICATED, 403: PERMISSION_DENIED, 404: NOT_FOUND,
              405: BAD_REQUEST, 413: RESOURCE_LIMIT_EXCEEDED, 415: BAD_REQUEST, 429: REQUEST_LIMIT_EXCEEDED,
              503: TEMPORARILY_UNAVAILABLE, 504: DEADLINE_EXCEEDED}


class ApiError(Exception):
    """An answer other than 200, with its MLflow error code."""

    def __init__(self, status: int, error_code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.error_code, self.message, self.headers = status, error_code, message, headers

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        """The error as the JSON answer the client gets."""
        from fastapi.responses import JSONResponse

        return JSONResponse({"error_code": self.error_code, "message": self.message}, status_code=self.status,
                            headers={**(self.headers or {}), **(headers or {})})


def install_handlers(app: FastAPI) -> None:
    """Every error leaves as MLflow JSON, framework ones (unknown route, bad /feedback body) included."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        code = HTTP_CODES.get(error.status_code, BAD_REQUEST if error.status_code < 500 else INTERNAL_ERROR)
        return ApiError(error.status_code, code, str(error.detail), dict(error.headers or {})).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}"
                             for e in error.errors())
        return ApiError(400, INVALID_PARAMETER_VALUE, problems or "invalid request").response()
