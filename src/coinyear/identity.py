"""Who a caller is: the `COINYEAR_API_TOKENS` credentials, matched in constant time, and the `anonymous` actor.

One place for what the gateway (coinyear.serve.auth), the UI's sign-in (coinyear.ui.access) and retraining's
ingestion (coinyear.jobs.ingest: an anonymous correction never trains) all need; nothing here imports a web
framework or the model, so the UI and the jobs take it without the gateway's packages.

An entry may be `name:token` (everything before the first ':' is the name, so a token that itself holds a ':'
needs a name in front), and its callers are `name`; a bare `token` entry's callers are
`token:<first 8 hex digits of the token's SHA-256>`. A name may be shared by several entries (the old and the new
token of one person during a rotation). Tokens are never logged.

Behind the Databricks Apps proxy (`COINYEAR_APPS_PROXY=true`) nobody holds one of our tokens: the proxy has
checked the caller's Databricks login and CAN_USE on the app, and says who they are in the headers it forwards
("Access HTTP headers passed to Databricks apps"); `forwarded_identity` reads them, most specific first. Trusting
a header holds only where nothing but the proxy reaches the app's port, as on Databricks Apps.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

ANONYMOUS = "anonymous"  # the actor of a caller without credentials (auth off)
# what the Databricks Apps proxy says about who called, most specific first
FORWARDED_IDENTITY = ("x-forwarded-email", "x-forwarded-preferred-username", "x-forwarded-user")


@dataclass(frozen=True)
class Credential:
    """One accepted token and who its holder is recorded as (never the token)."""

    token: str
    actor: str

    def __repr__(self) -> str:  # a credential in a log line or a traceback shows who, never the token
        return f"Credential(actor={self.actor!r})"


def token_actor(token: str, name: str | None = None) -> str:
    """How a token's holder is recorded: the entry's name, else a short SHA-256 fingerprint of the token."""
    return name or f"token:{hashlib.sha256(token.encode()).hexdigest()[:8]}"


def credentials(entries: Iterable[str]) -> list[Credential]:
    """The COINYEAR_API_TOKENS entries (`token` or `name:token`) as credentials; an entry without a token is
    none."""
    found = []
    for entry in entries:
        name, separator, token = entry.partition(":")
        name, token = (name.strip(), token.strip()) if separator else ("", entry.strip())
        if token:
            found.append(Credential(token, token_actor(token, name)))
    return found


def match(accepted: list[Credential], given: str) -> Credential | None:
    """The credential whose token is `given`, compared in constant time against every one of them; None if
    none is."""
    found = None
    for credential in accepted:  # no early exit: the time taken does not reveal which token nearly matched
        if hmac.compare_digest(given.encode(), credential.token.encode()):
            found = credential
    return found


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses: the only hosts a server may listen on without auth."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def forwarded_identity(headers: Mapping[str, str]) -> str | None:
    """Who the Databricks Apps proxy says called (its X-Forwarded-* headers, case-insensitive `headers`), or None
    when it says nothing."""
    for name in FORWARDED_IDENTITY:
        if forwarded := (headers.get(name) or "").strip():
            return forwarded
    return None
