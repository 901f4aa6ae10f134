"""Bearer-token auth, as Databricks serving endpoints do it: `Authorization: Bearer <token>`.

Tokens come from `COINYEAR_API_TOKENS` (comma-separated, so tokens can be rotated without downtime: add the
new one, move clients, drop the old one). Every configured token is compared in constant time and tokens are
never logged. Local-dev mode (no auth) exists only on a loopback address: explicitly with
`COINYEAR_AUTH_DISABLED=true`, or implicitly when no token is configured; binding any other address without
tokens refuses to start.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging

from fastapi import Request

from coinyear.config import Settings
from coinyear.serve.errors import PERMISSION_DENIED, UNAUTHENTICATED, ApiError

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class BearerAuth:
    def __init__(self, settings: Settings, host: str):
        self.tokens = [token.encode() for token in settings.api_tokens if token]
        self.enabled = not settings.auth_disabled and bool(self.tokens)
        if not self.enabled and not is_loopback(host):
            raise RuntimeError(f"refusing to serve on {host} without auth: set COINYEAR_API_TOKENS "
                               "(auth can be off only on a loopback address)")
        if not self.enabled:
            log.warning("auth is OFF (local-dev mode on %s): set COINYEAR_API_TOKENS to require tokens", host)

    def check(self, request: Request) -> None:
        """Raise a 401 (no credentials) or 403 (wrong token) ApiError unless the request may go on."""
        if not self.enabled:
            return
        header = request.headers.get("authorization", "")
        scheme, _, credential = header.partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise ApiError(401, UNAUTHENTICATED, "missing bearer token: send 'Authorization: Bearer <token>'",
                           {"WWW-Authenticate": "Bearer"})
        given = credential.strip().encode()
        matched = False
        for token in self.tokens:  # no early exit: the time taken does not reveal which token nearly matched
            matched |= hmac.compare_digest(given, token)
        if not matched:
            raise ApiError(403, PERMISSION_DENIED, "invalid bearer token")
