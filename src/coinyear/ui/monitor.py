"""Monitor page: traffic, errors, latency, predictions and feedback error from the inference log, and the drift
indicators `coinyear monitor` writes to the monitoring table. Read from the configured lake: as a Databricks App,
the Unity Catalog tables through the app's SQL warehouse (`COINYEAR_LAKE_BACKEND=warehouse`)."""

import altair as alt
import pandas as pd
import streamlit as st

from coinyear.jobs.monitor import corrected_predictions, one_row_per_request
from coinyear.lake import open_lake
from coinyear.lake.tables import FEEDBACK, INFERENCE_LOG, MONITORING
from coinyear.ui.shared import settings

LOG_COLUMNS = ["request_id", "http_request_id", "timestamp", "date", "status_code", "execution_time_ms",
               "model_version", "prediction"]


@st.cache_data(ttl=10, show_spinner=False)
def load(where: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The log, feedback and monitoring tables of the configured lake (`where`, its log's location, is the cache's
    key)."""
    lake = open_lake(settings())
    return lake.read(INFERENCE_LOG, columns=LOG_COLUMNS), lake.read(FEEDBACK), lake.read(MONITORING)


def daily_traffic(log: pd.DataFrame) -> pd.DataFrame:
    by_day = log.assign(ok=log["status_code"] < 400).groupby("date")
    table = pd.DataFrame({"answered": by_day["ok"].sum(), "failed": by_day["ok"].size() - by_day["ok"].sum()})
    table["error rate"] = table["failed"] / (table["answered"] + table["failed"])
    latency = log[log["status_code"] < 400].groupby("date")["execution_time_ms"]
    for share in (50, 95, 99):
        table[f"p{share}"] = latency.quantile(share / 100)
    table.index = [str(day) for day in table.index]
    return table


def daily_chart(table: pd.DataFrame, columns: list[str], y_title: str, bars: bool = False, percent: bool = False):
    """One series per column against the day; days are categories, so a single day still draws a bar or a point."""
    long = table[columns].rename_axis("day").reset_index().melt("day", var_name="series", value_name="value")
    base = alt.Chart(long).encode(
        x=alt.X("day:O", title=None, axis=alt.Axis(labelAngle=0)),
        y=alt.Y("value:Q", title=y_title, axis=alt.Axis(format="%" if percent else "~s")),
        color=alt.Color("series:N", title=None, legend=alt.Legend(orient="bottom")),
        tooltip=["day", "series", alt.Tooltip("value:Q", format=".1%" if percent else ".1f")],
    )
    return base.mark_bar() if bars else base.mark_line(point=True)


def show_traffic(log: pd.DataFrame) -> None:
    """Requests (not coins: a request of several coins logs a row per coin), error rate, latency; the predicted
    years per coin."""
    answered = log[log["status_code"] < 400]
    calls = one_row_per_request(log)
    days = daily_traffic(calls)
    total, failed = len(calls), int((calls["status_code"] >= 400).sum())
    kpis = st.columns(4)
    kpis[0].metric("Requests", f"{total:,}")
    kpis[1].metric("Error rate", f"{100 * failed / total:.1f}%")
    answered_calls = calls[calls["status_code"] < 400]
    if len(answered_calls):
        kpis[2].metric("Latency p50", f"{answered_calls['execution_time_ms'].quantile(0.5):.0f} ms")
        kpis[3].metric("Latency p99", f"{answered_calls['execution_time_ms'].quantile(0.99):.0f} ms")
    left, right = st.columns(2)
    with left:
        st.markdown("**Requests per day**")
        st.altair_chart(daily_chart(days, ["answered", "failed"], "requests", bars=True), width="stretch")
        st.markdown("**Latency percentiles per day (ms)**")
        st.altair_chart(daily_chart(days, ["p50", "p95", "p99"], "ms"), width="stretch")
    with right:
        st.markdown("**Error rate per day**")
        st.altair_chart(daily_chart(days, ["error rate"], "failed requests", percent=True), width="stretch")
        st.markdown("**Predicted years**")
        if len(answered):
            histogram = alt.Chart(answered).mark_bar().encode(
                x=alt.X("prediction:Q", bin=alt.Bin(step=10), title="predicted year (negative = BC)"),
                y=alt.Y("count():Q", title="predictions"),
                color=alt.Color("model_version:N", title="model version"),
            )
            st.altair_chart(histogram, width="stretch")
        else:
            st.caption("No successful predictions yet.")


def show_feedback(log: pd.DataFrame, feedback: pd.DataFrame) -> None:
    st.subheader("Error on expert corrections")
    if feedback.empty:
        st.info("No corrections yet. Corrections entered on the Predict page (or sent to `POST /feedback`) "
                "measure the model on real coins.")
        return
    corrected = corrected_predictions(log, feedback)  # the error `coinyear monitor` writes as feedback_mae
    by_version = corrected.groupby("model_version")["error"].agg(mae="mean", corrections="size").reset_index()
    left, right = st.columns([2, 1])
    with left:
        chart = alt.Chart(by_version).mark_bar().encode(
            x=alt.X("model_version:N", title="model version"), y=alt.Y("mae:Q", title="MAE (years)"),
            tooltip=["model_version", "mae", "corrections"])
        st.altair_chart(chart, width="stretch")
    right.dataframe(by_version.rename(columns={"model_version": "version", "mae": "MAE (years)"}),
                    hide_index=True)


def show_drift(monitoring: pd.DataFrame) -> None:
    st.subheader("Drift")
    drift_columns = [c for c in monitoring.columns if "psi" in c.lower()]
    if monitoring.empty or not drift_columns or "date" not in monitoring.columns:
        st.info("No drift indicators yet: `coinyear monitor` (or the scheduler) computes them from the log.")
        return
    monitoring = monitoring.assign(date=monitoring["date"].astype(str).str[:10])
    if {"computed_at", "model_version"} <= set(monitoring.columns):  # each run appends: keep the latest one
        monitoring = monitoring.sort_values("computed_at").drop_duplicates(["date", "model_version"], keep="last")
    psi = monitoring.groupby("date")[drift_columns].max()
    alert = settings().monitor_psi_alert  # the threshold of the monitoring table's `drift_alerts`
    st.caption(f"Population stability index per day (worst model version): the predictions against the "
               f"version's own predictions on its reference coins, the photos against the training photos. "
               f"Above {alert} the inputs or predictions have shifted.")
    st.altair_chart(daily_chart(psi, drift_columns, "PSI"), width="stretch")
    latest = psi.iloc[-1]
    shifted = [name for name, value in latest.items() if value > alert]
    if shifted:
        st.warning(f"Drift on {latest.name}: {', '.join(shifted)} above {alert}.", icon=":material/warning:")


st.title("Monitor")
where = open_lake(settings()).uri(INFERENCE_LOG)
log, feedback, monitoring = load(where)
if log.empty:
    st.info(f"No requests logged yet in `{where}`. Predictions made through the API appear here.")
else:
    st.caption(f"{len(one_row_per_request(log)):,} logged requests ({len(log):,} coins) from {log['date'].min()} "
               f"to {log['date'].max()}.")
    show_traffic(log)
    show_feedback(log, feedback)
show_drift(monitoring)
