"""Review page: corrections nobody answers for, waiting for an expert.

A correction sent without credentials (`anonymous`: an open gateway in local-dev mode) or before feedback named who
gave it never trains the model on its own (coinyear.jobs.ingest). Here a signed-in expert looks at the coin and
accepts one — it is sent again as their own correction, so the gateway records them as who gave it and the next
retraining learns from it — or rejects it. Either verdict goes to the `feedback_reviews` table with who gave it,
and the correction leaves the queue. Reviewing needs tokens (COINYEAR_API_TOKENS), or the Databricks Apps proxy
saying who the expert is: without either there is nobody to sign in, and an accepted correction would be
anonymous again.
"""

import datetime as dt

import pandas as pd
import streamlit as st

from coinyear.identity import Credential
from coinyear.jobs.ingest import review_queue
from coinyear.lake import open_lake
from coinyear.lake.tables import FEEDBACK, FEEDBACK_REVIEWS, INFERENCE_LOG
from coinyear.ui import access
from coinyear.ui.client import ApiError
from coinyear.ui.shared import api_client, correction_label, settings
from coinyear.years import year_label

SHOWN = 10  # the oldest first: a page of them at a time


def span(row) -> str:
    return correction_label(int(row["year_from"]), int(row["year_to"]))


def record(row, verdict: str, actor: str) -> str | None:
    """The verdict in `feedback_reviews` (the correction leaves the queue); why it could not be, or None (a lake
    that cannot write it refuses it). A Databricks App writes it through its SQL warehouse
    (coinyear.lake.warehouse)."""
    try:
        open_lake(settings()).append(FEEDBACK_REVIEWS, [{
            "feedback_key": row["feedback_key"], "request_id": row["request_id"], "verdict": verdict,
            "year_from": int(row["year_from"]), "year_to": int(row["year_to"]),
            "reviewed_at": dt.datetime.now(dt.UTC), "actor": actor}])
    except Exception as error:  # noqa: BLE001 - shown on the page, nothing else to undo
        return str(error)
    return None


def accept(row, credential: Credential, actor: str) -> None:
    """Send the correction again as the expert's own (the gateway records who from their token), then record it."""
    try:
        api_client().feedback(row["request_id"], int(row["year_from"]), int(row["year_to"]), credential,
                              source="review", note=f"accepts the correction {row['feedback_key']}")
    except ApiError as error:
        st.session_state["review_outcome"] = ("error", error.message)
        return
    unrecorded = record(row, "accepted", actor)
    # the correction is theirs now either way: their later, accountable correction settles the anonymous one
    note = f" (The verdict itself could not be recorded: {unrecorded}.)" if unrecorded else ""
    st.session_state["review_outcome"] = ("success", f"Accepted {span(row)} for request `{row['request_id']}`: "
                                                     f"recorded as your correction, used by the next retraining."
                                                     f"{note}")


def reject(row, actor: str) -> None:
    unrecorded = record(row, "rejected", actor)
    st.session_state["review_outcome"] = (
        ("error", f"The rejection could not be recorded, so the correction stays in the queue: {unrecorded}.")
        if unrecorded else ("success", f"Rejected {span(row)} for request `{row['request_id']}`."))


def show_coin(row, photos: pd.DataFrame) -> None:
    logged = photos[photos["request_id"] == row["request_id"]]
    left, right, about = st.columns([1, 1, 3])
    if len(logged):
        for column, side in ((left, "front_image"), (right, "back_image")):
            if isinstance(logged[side].iloc[0], bytes):
                column.image(logged[side].iloc[0], width=120)
        answered = logged["prediction"].iloc[0]
        model_said = f"; the model answered {year_label(round(answered))}" if pd.notna(answered) else ""
    else:
        model_said = "; its photos cannot be shown here"
    sent = pd.Timestamp(row["timestamp"]).strftime("%Y-%m-%d %H:%M UTC")
    about.markdown(f"**{span(row)}** for request `{row['request_id']}`, sent {sent} by "
                   f"*{row['actor'] if pd.notna(row['actor']) else 'unknown (before actors were recorded)'}*"
                   f"{model_said}.")


st.title("Review corrections")
outcome = st.session_state.pop("review_outcome", None)
if outcome:
    (st.success if outcome[0] == "success" else st.error)(outcome[1])
lake = open_lake(settings())
queue = review_queue(lake.read(FEEDBACK), lake.read(FEEDBACK_REVIEWS))
if queue.empty:
    st.info("No corrections waiting for review: every correction so far came from someone who answers for it.")
    st.stop()
st.caption(f"{len(queue)} correction(s) nobody answers for: they train the model only once an expert accepts them.")
credential = None
if not access.auth_required(settings()):
    st.info("Reviewing needs tokens: with COINYEAR_API_TOKENS set, a signed-in expert accepts or rejects each "
            "correction (without them an accepted one would be anonymous again).", icon=":material/lock:")
elif (credential := access.signed_in(settings())) is None and not settings().apps_proxy:  # the proxy: said why
    st.info("Sign in with an API token to accept or reject corrections: each verdict is recorded with who gave it.",
            icon=":material/lock:")
    access.sign_in_form(settings())
reviewer = st.session_state.get(access.ACTOR_KEY)
shown = queue.head(SHOWN)
try:
    photos = lake.read(INFERENCE_LOG, columns=["request_id", "front_image", "back_image", "prediction"],
                       filters=[("request_id", "in", sorted(set(shown["request_id"])))])
except NotImplementedError:  # a lake that reads whole tables only (the warehouse): not every photo ever logged
    photos = pd.DataFrame(columns=["request_id", "front_image", "back_image", "prediction"])
for _, row in shown.iterrows():
    with st.container(border=True):
        show_coin(row, photos)
        if credential is not None and reviewer:
            yes, no, _ = st.columns([1, 1, 4])
            if yes.button("Accept", key=f"accept-{row['feedback_key']}"):
                accept(row, credential, reviewer)
                st.rerun()
            if no.button("Reject", key=f"reject-{row['feedback_key']}"):
                reject(row, reviewer)
                st.rerun()
