"""Bearer-token auth, as Databricks serving endpoints do it: `Authorization: Bearer <token>`.

Tokens come from `COINYEAR_API_TOKENS` (comma-separated, so tokens can be rotated without downtime: add the
new one, move clients, drop the old one). Every configured token is compared in constant time and tokens are
never logged. Local-dev mode (no auth) exists only on a loopback address: explicitly with
`COINYEAR_AUTH_DISABLED=true`, or implicitly when no token is configured; binding any other address without
tokens refuses to start.

Who a caller is (`actor`, recorded with each correction): an entry may be `name:token` (everything before the
first ':' is the name, so a token that itself holds a ':' needs a name in front), and its callers are `name`;
a bare `token` entry's callers are `token:<first 8 hex digits of the token's SHA-256>`. A name may be shared by
several entries (the old and the new token of one person during a rotation). Without auth every caller is
`anonymous`: nobody answers for what they send, so retraining never learns from it (coinyear.jobs.ingest).

Behind the Databricks Apps proxy (`COINYEAR_APPS_PROXY=true`, a Databricks App) tokens are the proxy's business:
it takes a caller's Databricks token only on `/api/` routes ("Connect to an API Databricks app using token
authentication"), checks it and the caller's CAN_USE on the app, and passes the request on without the caller's
`Authorization` header but with the identity it found ("Access HTTP headers passed to Databricks apps":
X-Forwarded-Email, X-Forwarded-Preferred-Username, X-Forwarded-User). So the routes are served under `/api/` too
(`AppsProxyRoutes`) and the caller is that forwarded identity; COINYEAR_API_TOKENS is not read. This trusts a
header, so it holds only where nothing but the proxy reaches the app's port, as on Databricks Apps.
"""

from __future__ import annotations

import logging

from fastapi import Request

from coinyear.config import Settings
from coinyear.identity import ANONYMOUS, credentials, forwarded_identity, is_loopback, match
from coinyear.serve.errors import PERMISSION_DENIED, UNAUTHENTICATED, ApiError

log = logging.getLogger(__name__)

API_PREFIX = "/api"  # the only routes the Apps proxy passes a token to


class AppsProxyRoutes:
    """ASGI wrapper: a request for `/api/<path>` is served as `/<path>` (every route is also under /api/, where
    the Databricks Apps proxy lets a token through); other paths are left as they are."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] in ("http", "websocket") and (path == API_PREFIX or path.startswith(API_PREFIX + "/")):
            raw = scope.get("raw_path") or path.encode()
            scope = {**scope, "path": path[len(API_PREFIX):] or "/",
                     "raw_path": raw[len(API_PREFIX):] or b"/"}
        await self.app(scope, receive, send)


class BearerAuth:
    def __init__(self, settings: Settings, host: str):
        self.apps_proxy = settings.apps_proxy
        self.credentials = [] if self.apps_proxy else credentials(settings.api_token_entries())
        self.enabled = self.apps_proxy or (not settings.auth_disabled and bool(self.credentials))
        if not self.enabled and not is_loopback(host):
            raise RuntimeError(f"refusing to serve on {host} without auth: set COINYEAR_API_TOKENS "
                               "(auth can be off only on a loopback address)")
        if not self.enabled:
            log.warning("auth is OFF (local-dev mode on %s): set COINYEAR_API_TOKENS to require tokens", host)

    def check(self, request: Request) -> str:
        """Who the caller is (its `actor`; `anonymous` with auth off), or raise a 401 (no credentials) or 403
        (wrong token) ApiError: the request may not go on."""
        if not self.enabled:
            return ANONYMOUS
        if self.apps_proxy:  # the proxy checked the token and kept it: who it found is the caller
            if forwarded := forwarded_identity(request.headers):
                return forwarded
            raise ApiError(401, UNAUTHENTICATED, "no caller identity from the Databricks Apps proxy "
                                                 "(X-Forwarded-Email): call the app on /api/ with a Databricks token")
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(401, UNAUTHENTICATED, "missing bearer token: send 'Authorization: Bearer <token>'",
                           {"WWW-Authenticate": "Bearer"})
        credential = match(self.credentials, given.strip())
        if credential is None:
            raise ApiError(403, PERMISSION_DENIED, "invalid bearer token")
        return credential.actor
