"""Who may move production from the UI: the gateway's rule (`coinyear.serve.auth`), applied to the Models page.

With tokens in COINYEAR_API_TOKENS (and COINYEAR_AUTH_DISABLED off) a person signs in with one of those tokens
before any registry action; without them the UI is local-dev only: `coinyear ui` refuses a non-loopback address
and the page refuses registry actions to a browser that is not on this machine. Each action is recorded with who
did it (`actor`): in the `model_decisions` table and as a tag of the version.
"""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import hmac

import pyarrow as pa
import streamlit as st

from coinyear import registry
from coinyear.config import Settings
from coinyear.lake import MODEL_DECISIONS, Lake
from coinyear.serve.auth import is_loopback

ACTOR_KEY = "actor"
ACTOR_TAG = "moved_by"
# the columns the retraining job writes too (same names and types), plus `actor`
DECISION_SCHEMA = pa.schema([
    ("decided_at", pa.timestamp("us", tz="UTC")), ("model_name", pa.string()), ("decision", pa.string()),
    ("reason", pa.string()), ("candidate_version", pa.string()), ("production_before", pa.string()),
    ("production_after", pa.string()), ("kind", pa.string()), ("actor", pa.string()),
])


def auth_required(settings: Settings) -> bool:
    """True when registry actions need a signed-in person (tokens configured, as for the gateway)."""
    return not settings.auth_disabled and any(settings.api_tokens)


def check_bind(settings: Settings, host: str) -> None:
    """Refuse to serve the UI on a non-loopback address without credentials (RuntimeError, said plainly)."""
    if not auth_required(settings) and not is_loopback(host):
        raise RuntimeError(f"refusing to serve the UI on {host} without auth: its Models page moves production. "
                           "Set COINYEAR_API_TOKENS (people sign in with one of them), or bind 127.0.0.1")


def token_matches(settings: Settings, given: str) -> bool:
    """Whether `given` is one of the configured tokens, compared in constant time against every one of them."""
    matched = False
    for token in settings.api_tokens:  # no early exit: the time taken does not reveal which token nearly matched
        matched |= bool(token) and hmac.compare_digest(given.encode(), token.encode())
    return matched


def actor_name(name: str, token: str) -> str:
    """How an action is recorded: the name the person gave and a short fingerprint of their token (never the
    token), so actions stay attributable to a credential when names are made up."""
    fingerprint = hashlib.sha256(token.encode()).hexdigest()[:8]
    return f"{name.strip()} (token {fingerprint})"


def current_actor(settings: Settings) -> str | None:
    """The person allowed to act in this session, or None after showing why not (the sign-in form, or the
    refusal of a remote browser in local-dev mode)."""
    if not auth_required(settings):
        remote = st.context.ip_address  # a str, or None for a browser on this machine (a stand-in under AppTest)
        if isinstance(remote, str) and not is_loopback(remote):
            st.error(f"Registry actions are refused to {remote}: without COINYEAR_API_TOKENS the UI is for this "
                     "machine only.", icon=":material/lock:")
            return None
        return f"{getpass.getuser()} (local, no auth)"
    if st.session_state.get(ACTOR_KEY):
        return st.session_state[ACTOR_KEY]
    st.info("Sign in with an API token to promote or roll back.", icon=":material/lock:")
    with st.form("sign_in"):
        name = st.text_input("Your name", key="sign_in_name")
        token = st.text_input("API token", type="password", key="sign_in_token")
        if st.form_submit_button("Sign in"):
            if not name.strip():
                st.error("Give your name: every promotion and rollback is recorded with it.")
            elif not token_matches(settings, token):
                st.error("That token is not accepted (one of COINYEAR_API_TOKENS is).")
            else:
                st.session_state[ACTOR_KEY] = actor_name(name, token)
                st.rerun()
    return None


def record(settings: Settings, actor: str, decision: str, version: str, before: str | None,
           after: str | None) -> None:
    """Record a registry action made from the UI: a tag on the version and a `model_decisions` row."""
    now = dt.datetime.now(dt.UTC)
    registry.tag_version(settings, version, {ACTOR_TAG: actor, f"{ACTOR_TAG}_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                                             f"{ACTOR_TAG}_action": decision})
    row = {"decided_at": now, "model_name": settings.model_name, "decision": decision,
           "reason": f"by hand in the UI by {actor}", "candidate_version": str(version),
           "production_before": before, "production_after": after, "kind": "ui", "actor": actor}
    Lake(settings).append(MODEL_DECISIONS, pa.Table.from_pylist([row], schema=DECISION_SCHEMA))
