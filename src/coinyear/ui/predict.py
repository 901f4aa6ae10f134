"""Predict page: two photos (uploaded, or an example coin from the reference data) -> the API -> the year and
the most similar reference coins as evidence; then the expert's correction goes back to the API against the
request id, sent as the signed-in person (`access.correction_credential`: with tokens, only after a sign-in)."""

import base64
import hashlib
import io
from collections import Counter
from pathlib import Path

import pandas as pd
import streamlit as st
from PIL import Image

from coinyear.identity import ANONYMOUS
from coinyear.ui import access
from coinyear.ui.client import ApiError
from coinyear.ui.shared import api_client, correction_label, parse_year, settings
from coinyear.years import out_of_span_warning, year_label

IMAGE_TYPES = ["jpg", "jpeg", "png", "webp"]
EXAMPLE_COUNT = 12
NEIGHBOURS = 5  # reference coins shown under the prediction
PORTRAITS = 3  # likeliest portraits named beside it


@st.cache_data(show_spinner=False)
def example_coins(data_dir: str) -> pd.DataFrame:
    """A dozen coins spread over the reference data's years, so a user can try the system without photos."""
    from coinyear.data import read_manifest

    try:
        rows = read_manifest(data_dir, settings().min_year, settings().max_year, check_images=False).rows
    except (FileNotFoundError, ValueError):
        return pd.DataFrame()
    rows = rows[[Path(p).is_file() and Path(q).is_file() for p, q in zip(rows["obverse_path"], rows["reverse_path"])]]
    if rows.empty:
        return rows
    rows = rows.sort_values(["year", "coin_id"]).reset_index(drop=True)
    picks = sorted({round(i * (len(rows) - 1) / (EXAMPLE_COUNT - 1)) for i in range(EXAMPLE_COUNT)})
    return rows.iloc[picks].reset_index(drop=True)


def describe(coin) -> str:
    return f"#{coin.coin_id} · {coin.denomination} · {coin.mint}"


def chosen_photos():
    """(front bytes, back bytes, what they are, catalogue date or None); missing sides are None."""
    st.subheader("Photos of the two sides")
    upload_front, upload_back = st.columns(2)
    front = upload_front.file_uploader("Front (obverse)", type=IMAGE_TYPES, key="front_upload")
    back = upload_back.file_uploader("Back (reverse)", type=IMAGE_TYPES, key="back_upload")
    examples = example_coins(str(settings().data_dir))
    with st.expander("No photos at hand? Try a coin from the reference collection", expanded=not (front or back)):
        if examples.empty:
            st.info(f"The reference dataset was not found at `{settings().data_dir}` (COINYEAR_DATA_DIR).")
            example = None
        else:
            index = st.selectbox("Example coin", [None, *range(len(examples))], key="example",
                                 format_func=lambda i: "—" if i is None else describe(examples.iloc[i]))
            example = None if index is None else examples.iloc[index]
    if front or back or example is None:
        return (front.getvalue() if front else None, back.getvalue() if back else None,
                "your photos", None)
    return (Path(example.obverse_path).read_bytes(), Path(example.reverse_path).read_bytes(),
            f"example coin {describe(example)}", example.date_text)


def readable(photo: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(photo)) as image:
            image.verify()
        return True
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def show_previews(front: bytes | None, back: bytes | None) -> None:
    left, right = st.columns(2)
    for column, photo, side in ((left, front, "front"), (right, back, "back")):
        with column:
            if not photo:
                st.caption(f"no {side} photo yet")
            elif readable(photo):
                st.image(photo, caption=side, width=220)
            else:  # the API gives the authoritative answer on Predict; say now that it will likely refuse
                st.warning(f"The {side} file cannot be shown: it does not look like an image.",
                           icon=":material/broken_image:")


def predict(front: bytes, back: bytes, source: str, catalogue_date: str | None, fingerprint: str) -> None:
    interval = settings().ui_interval or None
    with st.spinner("Asking the model..."):
        try:
            answer = api_client().predict(settings().serving_endpoint_name, front, back, interval=interval,
                                          neighbours=NEIGHBOURS, portraits=PORTRAITS)
        except ApiError as error:
            st.session_state.pop("prediction", None)
            st.error(error.message, icon=":material/error:")
            return
    span = served_span() if answer.out_of_distribution else {}
    st.session_state["prediction"] = {"answer": answer, "fingerprint": fingerprint, "source": source,
                                      "catalogue_date": catalogue_date, "interval": interval, "span": span}
    st.session_state.pop("recorded_correction", None)


def served_span() -> dict:
    """What the served model was trained on (years, portraits), from the API's /version; {} when it does not
    say (a model logged before spans were recorded, or a serving endpoint that has no /version)."""
    try:
        return api_client().version().get("span") or {}
    except ApiError:
        return {}


def show_prediction(result: dict) -> None:
    answer = result["answer"]
    st.subheader("Predicted date")
    if answer.out_of_distribution:  # before the number, so nobody reads the date without it
        warning = out_of_span_warning(result.get("span"))
        st.warning(f"{warning[0].upper()}{warning[1:]}.", icon=":material/warning:")
    headline, details = st.columns([1, 2])
    headline.metric("Predicted year", year_label(answer.year))
    lines = [(f"Model **{answer.model_name or '?'}** version **{answer.model_version or '?'}** answered "
              f"in **{answer.latency_ms:.0f} ms**.")]
    if answer.low is not None and answer.high is not None:
        share = f"{100 * result['interval']:.0f}% " if result["interval"] else ""
        lines.append(f"{share}interval: **{year_label(answer.low)} – {year_label(answer.high)}**.")
    if result["catalogue_date"]:
        lines.append(f"Catalogue date of this {result['source']}: **{result['catalogue_date']}**.")
    if answer.portraits:
        lines.append(f"Portrait: {portraits_caption(answer.portraits)}.")
    lines.append(f"Request id `{answer.request_id or 'not returned'}`.")
    details.markdown("  \n".join(lines))
    if answer.neighbours:
        show_neighbours(answer.neighbours)


def portraits_caption(portraits: list[dict]) -> str:
    """"**Vespasian** 71% (coins with this portrait: median AD 73) · Titus 12% · other 5%": whose head the model
    sees, likeliest first, the first with the median year of its training coins (the year the answer leans
    towards)."""
    first, *rest = portraits
    median = "" if first["portrait"] == "other" else f" (coins with this portrait: median {year_label(first['year'])})"
    parts = [f"**{first['portrait']}** {100 * first['probability']:.0f}%{median}"]
    parts += [f"{p['portrait']} {100 * p['probability']:.0f}%" for p in rest]
    return " · ".join(parts)


def year_span(first: int, last: int) -> str:
    """A span of years as numismatists write it (AD 69 to 79 with an en dash between the years), or one year."""
    if first == last:
        return year_label(first)
    if first > 0:
        return f"AD {first}–{last}"
    if last <= 0:
        return f"{max(-first, 1)}–{max(-last, 1)} BC"
    return f"{year_label(first)} – {year_label(last)}"


def neighbours_caption(neighbours: list[dict]) -> str:
    """"Looks like these coins of Vespasian, AD 69 to 79" (an en dash in the span): the most common portrait among
    them, and the span of their catalogue dates."""
    portraits = Counter(coin["portrait"] for coin in neighbours if coin.get("portrait"))
    whose = f" of {portraits.most_common(1)[0][0]}" if portraits else ""
    span = year_span(min(coin["year_from"] for coin in neighbours), max(coin["year_to"] for coin in neighbours))
    return f"Looks like these coins{whose}, {span}"


def thumbnail(data_url: str) -> bytes:
    return base64.b64decode(data_url.split(",", 1)[1])


def show_neighbours(neighbours: list[dict]) -> None:
    """The nearest reference coins as thumbnails (obverse), each with its catalogue date, denomination and mint."""
    st.markdown(f"**{neighbours_caption(neighbours)}**")
    for column, coin in zip(st.columns(len(neighbours)), neighbours):
        with column:
            st.image(thumbnail(coin["thumbnail"]), width=96)
            st.caption(f"{coin.get('date_text') or year_span(coin['year_from'], coin['year_to'])}  \n"
                       f"{coin.get('denomination') or '?'} · {coin.get('mint') or '?'}")


def correction_form(answer) -> None:
    st.subheader("Correct the date")
    if not answer.request_id:
        st.warning("The API returned no request id, so a correction cannot be linked to this prediction.")
        return
    allowed, credential = access.correction_credential(settings())
    if not allowed:
        return
    with st.form("correction"):
        st.caption("Know better? Give the true year, or a range. Write years as '27 BC', 'AD 73' or '-27'.")
        first, last = st.columns(2)
        year_from_text = first.text_input("True year (or first year of the range)", key="year_from")
        year_to_text = last.text_input("Last year of the range (optional)", key="year_to")
        submitted = st.form_submit_button("Submit correction")
    if submitted:
        try:
            year_from = parse_year(year_from_text)
            year_to = parse_year(year_to_text) if year_to_text.strip() else year_from
            if year_to < year_from:
                raise ValueError(f"the range ends ({year_label(year_to)}) before it starts ({year_label(year_from)})")
        except ValueError as error:
            st.error(f"Cannot read the date: {error}.", icon=":material/error:")
            return
        try:
            recorded = api_client().feedback(answer.request_id, year_from, year_to, credential)
        except ApiError as error:
            st.error(error.message, icon=":material/error:")
            return
        span = correction_label(year_from, year_to)
        st.session_state["recorded_correction"] = (span, recorded.get("actor"))
    if st.session_state.get("recorded_correction"):
        span, actor = st.session_state["recorded_correction"]
        if actor == ANONYMOUS:
            after = "It waits on the Review page: it trains the model only once a signed-in expert accepts it."
        elif actor:
            after = "It will be used when the model is next retrained."
        else:  # a gateway that does not say who it recorded
            after = ""
        who = f" as **{actor}**" if actor else ""
        st.success(f"Thank you: correction **{span}** recorded{who} for request `{answer.request_id}`. {after}",
                   icon=":material/task_alt:")


st.title("Date a coin")
st.caption("Upload photos of both sides of a coin; the model in production estimates the year it was struck.")
front, back, source, catalogue_date = chosen_photos()
show_previews(front, back)
fingerprint = hashlib.sha256((front or b"") + b"|" + (back or b"")).hexdigest()
if st.button("Predict", type="primary", disabled=not (front and back)):
    predict(front, back, source, catalogue_date, fingerprint)
result = st.session_state.get("prediction")
if result and result["fingerprint"] == fingerprint:
    show_prediction(result)
    correction_form(result["answer"])
elif not (front and back):
    st.info("Add a photo of each side (or pick an example coin) to get a date.")
