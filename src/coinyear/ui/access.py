"""Who may move production or correct a date from the UI: the gateway's rule (`coinyear.identity`, which
`coinyear.serve.auth` applies too).

With tokens in COINYEAR_API_TOKENS (and COINYEAR_AUTH_DISABLED off) a person signs in with one of those tokens
before any registry action (Models page) and before correcting a date (Predict page); without them the UI is
local-dev only: `coinyear ui` refuses a non-loopback address and the pages refuse both to a browser that is not
on this machine. Each registry action is recorded with who did it (`actor`): in the `model_decisions` table and
as a tag of the version.

A correction becomes training data, so it goes with the signed-in person's own token, never the UI's
COINYEAR_API_TOKEN: the gateway records who gave it from that token (as a Databricks App the UI writes the
token's actor into the feedback file itself, as the gateway would). An unsigned visitor is asked to sign in.
In local-dev mode a correction goes without any credential: an open gateway records it as `anonymous`; it
never trains on its own but waits on the Review page (`coinyear.ui.review`) for a signed-in expert to accept
it as theirs or reject it. A gateway that requires tokens refuses it.

The sign-in (the token, kept in the server-side session state, and the name given) is checked again on every
page run: once the token is no longer one of COINYEAR_API_TOKENS the session is signed out, saying so.

As a Databricks App (`COINYEAR_APPS_PROXY=true`) there is no sign-in form and no token: the Apps proxy has signed
the person in with their Databricks login and let them through only with CAN_USE on the app, and its forwarded
identity (X-Forwarded-Email, read on every page run) is who acts and who a correction or a verdict is recorded
as, the same rule as the gateway app's (`coinyear.identity.forwarded_identity`).
"""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib

import pyarrow as pa
import streamlit as st

from coinyear import registry
from coinyear.config import Settings
from coinyear.identity import Credential, credentials, forwarded_identity, is_loopback, match
from coinyear.lake import open_lake
from coinyear.lake.tables import DECISIONS_ACTOR, DECISIONS_SCHEMA, MODEL_DECISIONS

ACTOR_KEY = "actor"  # the signed-in person as registry actions record them (name and token fingerprint)
CREDENTIAL_KEY = "credential"  # their Credential: the token corrections go with, and what is checked each run
ACTOR_TAG = "moved_by"
# the columns of `model_decisions` a change by hand fills (the jobs' names and types), plus `actor`
DECISION_SCHEMA = pa.schema([
    *(DECISIONS_SCHEMA.field(name) for name in ("decided_at", "model_name", "decision", "reason", "candidate_version",
                                                "production_before", "production_after", "kind")),
    DECISIONS_ACTOR,
])


def auth_required(settings: Settings) -> bool:
    """True when registry actions and corrections need a signed-in person (tokens configured, as for the
    gateway, or the Databricks Apps proxy in front, which signs people in)."""
    return settings.apps_proxy or (not settings.auth_disabled and bool(credentials(settings.api_token_entries())))


def check_bind(settings: Settings, host: str) -> None:
    """Refuse to serve the UI on a non-loopback address without credentials (RuntimeError, said plainly)."""
    if not auth_required(settings) and not is_loopback(host):
        raise RuntimeError(f"refusing to serve the UI on {host} without auth: its Models page moves production. "
                           "Set COINYEAR_API_TOKENS (people sign in with one of them), or bind 127.0.0.1")


def actor_name(name: str, token: str) -> str:
    """How an action is recorded: the name the person gave and a short fingerprint of their token (never the
    token), so actions stay attributable to a credential when names are made up."""
    fingerprint = hashlib.sha256(token.encode()).hexdigest()[:8]
    return f"{name.strip()} (token {fingerprint})"


def signed_in(settings: Settings) -> Credential | None:
    """The signed-in person's credential, checked against COINYEAR_API_TOKENS as they are now: a session whose
    token is no longer one of them (or whose UI no longer asks for a sign-in) is signed out here, saying so.
    Every page run calls it (app.py), so a rotated-out token ends the session on whatever page it is on. Behind
    the Apps proxy: the person it forwards (no token), or None when it forwards nobody."""
    if settings.apps_proxy:
        return proxy_sign_in()
    credential = st.session_state.get(CREDENTIAL_KEY)
    if credential is None:
        st.session_state.pop(ACTOR_KEY, None)
        return None
    current = match(credentials(settings.api_token_entries()), credential.token) if auth_required(settings) else None
    if current is None:
        sign_out()
        st.warning("Your sign-in ended: its token is no longer accepted (COINYEAR_API_TOKENS changed). Sign in "
                   "again with a current token.", icon=":material/lock_reset:")
        return None
    st.session_state[CREDENTIAL_KEY] = current  # its name may have changed with the entry
    return current


def sign_out() -> None:
    """Forget this session's person and token."""
    for key in (ACTOR_KEY, CREDENTIAL_KEY):
        st.session_state.pop(key, None)


def proxy_sign_in() -> Credential | None:
    """The session as the person the Databricks Apps proxy forwards (kept as the actor), or None after saying
    that it forwarded nobody."""
    person = forwarded_identity(st.context.headers)
    if person is None:
        sign_out()
        st.error("The Databricks Apps proxy did not say who you are (no X-Forwarded-Email): registry actions, "
                 "corrections and reviews are refused.", icon=":material/lock:")
        return None
    credential = Credential("", person)  # no token: the proxy vouched for them
    st.session_state[ACTOR_KEY], st.session_state[CREDENTIAL_KEY] = person, credential
    return credential


def refused_remote(what: str) -> bool:
    """In local-dev mode, whether this browser is on another machine (then `what` is refused, said plainly)."""
    remote = st.context.ip_address  # a str, or None for a browser on this machine (a stand-in under AppTest)
    if isinstance(remote, str) and not is_loopback(remote):
        st.error(f"{what} are refused to {remote}: without COINYEAR_API_TOKENS the UI is for this machine only.",
                 icon=":material/lock:")
        return True
    return False


def current_actor(settings: Settings) -> str | None:
    """The person allowed to act in this session, or None after showing why not (the sign-in form, or the
    refusal of a remote browser in local-dev mode)."""
    if not auth_required(settings):
        return None if refused_remote("Registry actions") else f"{getpass.getuser()} (local, no auth)"
    if signed_in(settings) is not None and st.session_state.get(ACTOR_KEY):
        return st.session_state[ACTOR_KEY]
    if settings.apps_proxy:  # signed_in said why
        return None
    st.info("Sign in with an API token to promote or roll back.", icon=":material/lock:")
    sign_in_form(settings)
    return None


def correction_credential(settings: Settings) -> tuple[bool, Credential | None]:
    """(whether this session may send a correction, the credential it goes with): with tokens only a signed-in
    person, with their own (the sign-in form is shown otherwise); in local-dev mode a browser on this machine,
    with none (the gateway records it as anonymous). Never the UI's own token: see the module docstring."""
    if not auth_required(settings):
        return not refused_remote("Corrections"), None
    credential = signed_in(settings)
    if credential is not None or settings.apps_proxy:
        return credential is not None, credential
    st.info("Sign in with an API token to correct the date: corrections train the model, so each is recorded "
            "with who gave it.", icon=":material/lock:")
    sign_in_form(settings)
    return False, None


def sign_in_form(settings: Settings) -> None:
    """The sign-in form: a name and one of COINYEAR_API_TOKENS; on success the session is signed in (rerun)."""
    with st.form("sign_in"):
        name = st.text_input("Your name", key="sign_in_name")
        token = st.text_input("API token", type="password", key="sign_in_token")
        if st.form_submit_button("Sign in"):
            if not name.strip():
                st.error("Give your name: every promotion and rollback is recorded with it.")
            elif (credential := match(credentials(settings.api_token_entries()), token)) is None:
                st.error("That token is not accepted (one of COINYEAR_API_TOKENS is).")
            else:
                st.session_state[ACTOR_KEY] = actor_name(name, token)
                st.session_state[CREDENTIAL_KEY] = credential
                st.rerun()


def record(settings: Settings, actor: str, decision: str, version: str, before: str | None,
           after: str | None) -> None:
    """Record a registry action made from the UI: a tag on the version and a `model_decisions` row."""
    now = dt.datetime.now(dt.UTC)
    registry.tag_version(settings, version, {ACTOR_TAG: actor, f"{ACTOR_TAG}_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                                             f"{ACTOR_TAG}_action": decision})
    row = {"decided_at": now, "model_name": settings.model_name, "decision": decision,
           "reason": f"by hand in the UI by {actor}", "candidate_version": str(version),
           "production_before": before, "production_after": after, "kind": "ui", "actor": actor}
    open_lake(settings).append(MODEL_DECISIONS, pa.Table.from_pylist([row], schema=DECISION_SCHEMA))
