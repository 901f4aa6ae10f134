"""Models page: the registered versions with aliases and metrics, the retraining decisions, and promote /
rollback, each behind a confirmation and only for a person `access` lets act (signed in with an API token, or on
this machine in local-dev mode), recorded with who did it. The running server follows the `production` alias on
its own. As a Databricks App the page moves nothing itself: a rollback is a run of the rollback job, and the
page lists that job's runs (coinyear.ui.jobs)."""

import datetime as dt

import pandas as pd
import streamlit as st

from coinyear import registry
from coinyear.lake import open_lake
from coinyear.lake.tables import MODEL_DECISIONS
from coinyear.ui import access, jobs
from coinyear.ui.shared import settings

# the columns of `model_decisions` a person reads first (the rest, JSON metrics and counts, stays in the table)
DECISION_COLUMNS = ["decided_at", "decision", "reason", "actor", "candidate_version", "production_before",
                    "production_after", "candidate_mae", "production_mae", "new_feedback_rows", "training_data_version"]


def versions_table(versions: list[registry.VersionInfo]) -> pd.DataFrame:
    return pd.DataFrame([{
        "version": int(v.version),
        "aliases": ", ".join(v.aliases),
        "registered": dt.datetime.fromtimestamp(v.created, dt.UTC).strftime("%Y-%m-%d %H:%M"),
        "test MAE (years)": v.metrics.get("test_mae"),  # the test coin types: no choice was made on them
        "test within ±10y": v.metrics.get("test_within_10y"),
        "val MAE (years)": v.metrics.get("val_mae"),
        "decision": v.tags.get("decision", ""),
        "reason": v.tags.get("decision_reason", ""),
        "replaced": v.tags.get(registry.PREVIOUS_TAG, ""),
        "moved by": v.tags.get(access.ACTOR_TAG, ""),
    } for v in versions])


def show_versions(versions: list[registry.VersionInfo]) -> None:
    table = versions_table(versions)
    st.dataframe(table, hide_index=True, column_config={
        "within ±10y": st.column_config.ProgressColumn(format="percent", min_value=0, max_value=1),
        "val MAE (years)": st.column_config.NumberColumn(format="%.2f"),
    })
    scored = table.dropna(subset=["val MAE (years)"])
    if len(scored) > 1:
        st.markdown("**Validation MAE by version**")
        st.line_chart(scored.set_index("version")[["val MAE (years)"]])


def show_decisions() -> None:
    st.subheader("Retraining decisions")
    decisions = open_lake(settings()).read(MODEL_DECISIONS)
    if decisions.empty:
        st.info("No retraining decisions yet: `coinyear retrain` records each promotion or rejection here.")
        return
    if "decided_at" in decisions.columns:
        decisions = decisions.sort_values("decided_at", ascending=False)
    shown = [c for c in DECISION_COLUMNS if c in decisions.columns]
    st.dataframe(decisions, hide_index=True, column_order=shown or None, column_config={
        "candidate_mae": st.column_config.NumberColumn("candidate MAE", format="%.2f"),
        "production_mae": st.column_config.NumberColumn("production MAE", format="%.2f"),
    })


def ask(action: dict) -> None:
    st.session_state["pending"] = action


def confirm_pending(actor: str) -> None:
    """The confirmation step of a promotion or rollback, then the change itself, recorded with `actor`."""
    action = st.session_state.get("pending")
    if not action:
        return
    st.warning(action["question"], icon=":material/help:")
    yes, no, _ = st.columns([1, 1, 4])
    if no.button("Cancel", key="cancel"):
        del st.session_state["pending"]
        st.rerun()
    if yes.button("Yes, do it", type="primary", key="confirm"):
        del st.session_state["pending"]
        change: tuple[str, str, str | None, str | None]  # (decision, version, production before, after)
        if action["kind"] == "rollback_job":
            try:
                run_id = jobs.start_rollback(settings())
            except Exception as error:  # noqa: BLE001 - the workspace's refusal, said on the page
                st.session_state["outcome"] = ("error", f"The rollback job could not be started: {error}")
            else:
                st.session_state["outcome"] = ("success", f"Started run {run_id} of the rollback job for {actor}: "
                                               "production and the endpoint move back when it succeeds.")
            st.rerun()
        try:
            if action["kind"] == "rollback":
                # only from the version the person was shown: a retraining may have promoted another since
                current, target = registry.rollback(settings(), expected_current=action["from"])
                done = f"Rolled production back from version {current} to version {target}."
                change = ("rolled_back", target, current, target)
            else:
                previous = registry.promote(settings(), action["version"], action["alias"])
                done = f"`{action['alias']}` now points to version {action['version']} (was {previous or 'none'})."
                change = (("promoted", str(action["version"]), previous, str(action["version"]))
                          if action["alias"] == registry.PRODUCTION else ("staged", str(action["version"]), None, None))
        except (registry.RegistryError, ValueError) as error:
            st.session_state["outcome"] = ("error", str(error))
        else:
            if action.get("alias", registry.PRODUCTION) == registry.PRODUCTION:
                done += " The server switches to it within a few seconds."
            try:
                access.record(settings(), actor, *change)
                st.session_state["outcome"] = ("success", done)
            except Exception as error:  # noqa: BLE001 - the move is done: say so, and that its record is missing
                st.session_state["outcome"] = ("error", f"{done} It could NOT be recorded with who did it: {error}")
        st.rerun()


def show_actions(versions: list[registry.VersionInfo]) -> None:
    st.subheader("Change what is served")
    actor = access.current_actor(settings())
    if actor is None:
        return
    production = registry.version_by_alias(settings(), registry.PRODUCTION)
    if jobs.on_databricks(settings()):
        show_job_actions(actor, production)
        return
    st.caption(f"Acting as **{actor}**: each change is recorded with this name.")
    promote, rollback = st.columns(2)
    with promote:
        version = st.selectbox("Version", [v.version for v in versions], key="promote_version")
        alias = st.radio("Alias", registry.ALIASES, index=1, horizontal=True, key="promote_alias")
        if st.button("Promote…", key="promote"):
            ask({"kind": "promote", "version": version, "alias": alias,
                 "question": f"Point `{alias}` at version {version}?"
                             + (" The API will serve it to every user." if alias == registry.PRODUCTION else "")})
    with rollback:
        st.caption(f"Production is version **{production or 'none'}**. Rollback returns it to the version it "
                   "replaced.")
        if st.button("Roll back production…", key="rollback", disabled=production is None):
            ask({"kind": "rollback", "from": production,
                 "question": f"Roll production back from version {production} to the version it replaced?"})
    confirm_pending(actor)


def show_job_actions(actor: str, production: str | None) -> None:
    """On Databricks: a rollback is a run of the rollback job (the app may not move an alias); its runs below."""
    st.caption(f"Production is version **{production or 'none'}**. On Databricks the rollback job moves it back "
               "to the version it replaced and makes the endpoint follow; promotions are the retrain job's.")
    if st.button("Run the rollback job…", key="rollback_job", disabled=production is None):
        ask({"kind": "rollback_job", "question": f"Start the rollback job? Production (version {production}) goes "
                                                 "back to the version it replaced."})
    confirm_pending(actor)
    st.markdown("**Runs of the rollback job**")
    try:
        runs = jobs.rollback_runs(settings())
    except Exception as error:  # noqa: BLE001 - the workspace's refusal, said on the page
        st.error(f"The rollback job's runs cannot be read: {error}")
        return
    if runs.empty:
        st.caption("No runs yet.")
    else:
        st.dataframe(runs, hide_index=True, column_config={"link": st.column_config.LinkColumn("link")})


st.title("Models")
outcome = st.session_state.pop("outcome", None)
if outcome:
    (st.success if outcome[0] == "success" else st.error)(outcome[1])
versions = registry.list_versions(settings())
if not versions:
    st.info(f"No versions of `{settings().model_name}` registered yet. `coinyear train --promote production` "
            "trains and registers the first one.")
else:
    st.caption(f"Registered model `{settings().model_name}` in `{settings().mlflow_registry_uri}`.")
    show_versions(versions)
    show_actions(versions)
show_decisions()
