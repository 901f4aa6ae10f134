"""The Streamlit pages, run by Streamlit's AppTest.

The Predict page talks HTTP to a small contract server on loopback that answers what each test needs (a year,
an interval, 400, 401, a slow answer) and records what the page sent; the real gateway is driven by the browser
test. Monitor and Models read a real Delta lake and a real MLflow registry in a temporary home.
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from coinyear import registry
from coinyear.config import ensure_experiment, get_settings
from coinyear.lake import open_lake
from coinyear.lake.tables import FEEDBACK, FEEDBACK_REVIEWS, INFERENCE_LOG, MODEL_DECISIONS, MONITORING
from coinyear.ui.shared import parse_year
from tests.conftest import coin_image, send_json

APP = Path(__file__).resolve().parents[2] / "src" / "coinyear" / "ui" / "app.py"
TOKEN = "ui-test-token"


class ContractServer(ThreadingHTTPServer):
    """Answers `routes[(method, path)] = (status, json body, headers[, delay s])` (or a function of the request
    body giving that) and records each request."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.routes: dict[tuple[str, str], tuple] = {}
        self.received: list[dict] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def calls(self, path: str) -> list[dict]:
        return [r for r in self.received if r["path"] == path]


class Handler(BaseHTTPRequestHandler):
    def _answer(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        try:
            decoded = json.loads(body) if body else None
        except ValueError:  # a photo uploaded to the Files API
            decoded = None
        self.server.received.append({"method": method, "path": self.path, "headers": dict(self.headers),
                                     "json": decoded, "body": body})
        not_found = (404, {"error_code": "ENDPOINT_NOT_FOUND", "message": "no such route"}, {})
        route = self.server.routes.get((method, self.path)) or next(  # a key ending in * matches a path prefix
            (r for (m, p), r in self.server.routes.items() if m == method and p.endswith("*")
             and self.path.startswith(p[:-1])), not_found)
        if callable(route):
            route = route(self.server.received[-1]["json"])
        status, payload, headers, *delay = route
        time.sleep(delay[0] if delay else 0)
        with contextlib.suppress(BrokenPipeError):  # the client gave up first (the timeout test)
            send_json(self, status, payload, headers)

    def do_GET(self):
        self._answer("GET")

    def do_POST(self):
        self._answer("POST")

    def do_PUT(self):
        self._answer("PUT")

    def log_message(self, *args):
        pass


INVOCATIONS = ("POST", "/serving-endpoints/coinyear/invocations")
ANSWER_HEADERS = {"served-model-name": "coinyear", "served-model-version": "3", "x-request-id": "req-123"}


@pytest.fixture
def api(monkeypatch, tmp_path, ocre_dir):
    server = ContractServer()
    server.routes[("GET", "/version")] = (200, {"model_name": "coinyear", "model_version": "3"}, {})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    home = tmp_path / "home"
    for key, value in {"API_URL": server.url, "API_TOKEN": TOKEN, "HOME": str(home), "DATA_DIR": str(ocre_dir),
                       "API_TIMEOUT": "2"}.items():
        monkeypatch.setenv(f"COINYEAR_{key}", value)
    # mlflow.set_tracking_uri / set_registry_uri export MLFLOW_*_URI, which Settings reads first: pin them too
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{home / 'mlflow.db'}")
    get_settings.cache_clear()
    yield server
    server.shutdown()
    server.server_close()
    get_settings.cache_clear()


def app(page: str | None = None) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    if page:
        at.switch_page(page).run()
    assert not at.exception, at.exception
    return at


def upload_pair(at: AppTest, front: bytes, back: bytes) -> AppTest:
    at.file_uploader(key="front_upload").set_value(("front.jpg", front, "image/jpeg"))
    at.file_uploader(key="back_upload").set_value(("back.jpg", back, "image/jpeg"))
    return at.run()


def press(at: AppTest, label: str) -> AppTest:
    next(b for b in at.button if b.label == label).click()
    return at.run()


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


# ------------------------------------------------------------------------------------------------ predict
def test_predict_sends_both_photos_as_base64_and_shows_the_year_in_numismatic_form(api):
    api.routes[INVOCATIONS] = (200, {"predictions": [-27.4]}, ANSWER_HEADERS)
    front, back = coin_image(1), coin_image(2)
    at = upload_pair(app(), front, back)
    assert not texts(at.info).count("Add a photo")
    at = press(at, "Predict")

    (call,) = api.calls(INVOCATIONS[1])
    row = call["json"]["inputs"][0]
    assert base64.b64decode(row["front_image_base64"]) == front
    assert base64.b64decode(row["back_image_base64"]) == back
    assert call["json"]["params"] == {"interval": 0.9, "neighbours": 5, "portraits": 3}
    assert call["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert at.metric[0].value == "27 BC"
    details = texts(at.markdown)
    assert "version **3**" in details and "req-123" in details and " ms**" in details
    assert not at.error and not at.warning


def test_predict_shows_the_interval_and_warns_when_out_of_distribution(api):
    answer = {"year": 73.2, "low": 60.0, "high": 88.6, "out_of_distribution": True}
    api.routes[INVOCATIONS] = (200, {"predictions": [answer]}, ANSWER_HEADERS)
    span = {"year_from": -31, "year_to": 138, "coins": 2400, "portraits": ["Augustus", "Nero", "Hadrian"]}
    api.routes[("GET", "/version")] = (200, {"model_name": "coinyear", "model_version": "3", "span": span}, {})
    at = press(upload_pair(app(), coin_image(1), coin_image(2)), "Predict")
    assert at.metric[0].value == "AD 73"
    assert "90% interval: **AD 60 – AD 89**" in texts(at.markdown)
    # the words name what the model knows, from the served model's span (/version)
    assert ("This coin does not look like the coins the model knows: 31 BC – AD 138, 3 portraits from Augustus "
            "to Hadrian; the date may be wrong.") in texts(at.warning)


def test_a_model_without_intervals_still_gives_its_year(api):
    def no_intervals(body):  # refuses each parameter it cannot answer, one at a time, as the gateway does
        for name in ("interval", "neighbours", "portraits"):
            if name in body.get("params", {}):
                return 400, {"error_code": "INVALID_PARAMETER_VALUE",
                             "message": f"model version 1 was logged without ...; call it without `{name}`"}, {}
        return 200, {"predictions": [12.0]}, ANSWER_HEADERS

    api.routes[INVOCATIONS] = no_intervals
    at = press(upload_pair(app(), coin_image(1), coin_image(2)), "Predict")
    assert at.metric[0].value == "AD 12" and not at.error
    assert "interval" not in texts(at.markdown) and "Looks like" not in texts(at.markdown)
    assert "Portrait" not in texts(at.markdown)
    assert [sorted(call["json"].get("params", {})) for call in api.calls(INVOCATIONS[1])] == [
        ["interval", "neighbours", "portraits"], ["neighbours", "portraits"], ["portraits"], []]


def test_predict_shows_the_nearest_reference_coins_with_their_dates(api):
    thumbnail = "data:image/jpeg;base64," + base64.b64encode(coin_image(5, (64, 64))).decode("ascii")
    coins = [{"coin_id": str(i), "year_from": 69 + i, "year_to": 79, "date_text": f"AD {69 + i} - AD 79",
              "denomination": "Denarius", "mint": "Rome", "portrait": "Vespasian" if i < 3 else "Titus",
              "distance": 0.1 * i, "thumbnail": thumbnail, "thumbnail_back": thumbnail} for i in range(5)]

    def with_neighbours(body):  # a model without interval calibration or portrait head but with reference coins
        for name in ("interval", "portraits"):
            if name in body.get("params", {}):
                return 400, {"error_code": "INVALID_PARAMETER_VALUE", "message": f"call it without `{name}`"}, {}
        return 200, {"predictions": [{"year": 74.0, "neighbours": coins[:body["params"]["neighbours"]]}]}, \
            ANSWER_HEADERS

    api.routes[INVOCATIONS] = with_neighbours
    at = press(upload_pair(app(), coin_image(1), coin_image(2)), "Predict")
    assert at.metric[0].value == "AD 74" and not at.error
    assert "**Looks like these coins of Vespasian, AD 69–79**" in texts(at.markdown)
    assert sum("Denarius · Rome" in text for text in texts(at.caption).split("\n")) == 5
    assert len(at.get("image")) == 7  # the two photos, then the five reference coins
    assert api.calls(INVOCATIONS[1])[-1]["json"]["params"] == {"neighbours": 5}


def test_predict_names_the_likeliest_portraits(api):
    portraits = [{"portrait": "Vespasian", "probability": 0.714, "year": 73.0},
                 {"portrait": "Titus", "probability": 0.12, "year": 79.5},
                 {"portrait": "other", "probability": 0.05, "year": 90.0}]
    api.routes[INVOCATIONS] = (200, {"predictions": [{"year": 74.0, "portraits": portraits}]}, ANSWER_HEADERS)
    at = press(upload_pair(app(), coin_image(1), coin_image(2)), "Predict")
    assert at.metric[0].value == "AD 74" and not at.error
    assert ("Portrait: **Vespasian** 71% (coins with this portrait: median AD 73) · Titus 12% · other 5%."
            in texts(at.markdown))


def test_predict_button_waits_for_both_sides(api):
    at = app()
    at.file_uploader(key="front_upload").set_value(("front.jpg", coin_image(1), "image/jpeg"))
    at.run()
    assert next(b for b in at.button if b.label == "Predict").disabled
    assert "no back photo yet" in texts(at.caption)


def test_an_example_coin_from_the_reference_data_can_be_dated_without_photos(api, ocre_dir):
    api.routes[INVOCATIONS] = (200, {"predictions": [101.0]}, ANSWER_HEADERS)
    at = app()
    examples = at.selectbox(key="example")
    assert len(examples.options) == 13  # "—" and a dozen coins
    examples.set_value(3).run()
    at = press(at, "Predict")
    sent = api.calls(INVOCATIONS[1])[0]["json"]["inputs"][0]
    manifest = pd.read_csv(ocre_dir / "manifest.csv")
    coin_id = int(examples.format_func(3).split("·")[0].strip(" #"))
    coin = manifest[manifest["coin_id"] == coin_id].iloc[0]
    assert base64.b64decode(sent["front_image_base64"]) == (ocre_dir / coin["obverse"]).read_bytes()
    assert base64.b64decode(sent["back_image_base64"]) == (ocre_dir / coin["reverse"]).read_bytes()
    assert f"Catalogue date of this example coin #{coin_id}" in texts(at.markdown)
    assert at.metric[0].value == "AD 101"


def test_without_the_reference_data_the_examples_say_where_they_looked(api, monkeypatch, tmp_path):
    monkeypatch.setenv("COINYEAR_DATA_DIR", str(tmp_path / "nowhere"))
    get_settings.cache_clear()
    at = app()
    assert f"reference dataset was not found at `{tmp_path / 'nowhere'}`" in texts(at.info)
    assert not at.selectbox


@pytest.mark.parametrize("status, body, expected", [
    (400, {"error_code": "INVALID_PARAMETER_VALUE", "message": "row 0: front image: not an image"},
     "could not use this request (INVALID_PARAMETER_VALUE): row 0: front image: not an image"),
    (401, {"error_code": "UNAUTHENTICATED", "message": "missing or invalid bearer token"},
     "refused the request (401 UNAUTHENTICATED): missing or invalid bearer token. Check the token"),
    (413, {"error_code": "RESOURCE_LIMIT_EXCEEDED", "message": "body over 16777216 bytes"}, "too large"),
    (503, {"error_code": "TEMPORARILY_UNAVAILABLE", "message": "no production model loaded"}, "no model ready"),
])
def test_api_errors_are_shown_as_messages_not_tracebacks(api, status, body, expected):
    api.routes[INVOCATIONS] = (status, body, {})
    at = press(upload_pair(app(), coin_image(1), coin_image(2)), "Predict")
    assert not at.exception
    assert expected in texts(at.error)
    assert not at.metric  # no stale or made-up prediction


@pytest.mark.parametrize("endpoint_name, path", [
    ("coinyear-prod", "/serving-endpoints/coinyear-prod/invocations"),
    (None, "/serving-endpoints/main-coinyear-coinyear/invocations"),  # what `coinyear deploy` names it
])
def test_predict_calls_the_endpoint_name_not_the_unity_catalog_model_name(api, monkeypatch, endpoint_name, path):
    monkeypatch.setenv("COINYEAR_MODEL_NAME", "main.coinyear.coinyear")
    if endpoint_name:
        monkeypatch.setenv("COINYEAR_ENDPOINT_NAME", endpoint_name)
    get_settings.cache_clear()
    api.routes[("POST", path)] = (200, {"predictions": [-27.0]}, ANSWER_HEADERS)
    at = press(upload_pair(app(), coin_image(1), coin_image(2)), "Predict")
    assert [call["path"] for call in api.received if call["method"] == "POST"] == [path]
    assert at.metric[0].value == "27 BC" and not at.error


def test_a_wrong_endpoint_name_says_which_setting_to_fix(api):
    at = press(upload_pair(app(), coin_image(1), coin_image(2)), "Predict")  # no route: ENDPOINT_NOT_FOUND
    assert "no serving endpoint of that name" in texts(at.error) and "COINYEAR_ENDPOINT_NAME" in texts(at.error)


def noise_photo(seed: int, size: int = 640) -> bytes:
    """A PNG that does not compress: two make a request over Model Serving's logging limit."""
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_with_the_databricks_backend_the_ui_talks_to_the_workspace_itself(api, monkeypatch):
    """As a Databricks App: scoring by the Model Serving endpoint with a client_request_id of its own, what it serves
    from the endpoint's config, the correction as a file in the volume (the calls a workspace answers, here by the
    contract server)."""
    for key, value in {"COINYEAR_SERVING_BACKEND": "databricks", "COINYEAR_MODEL_NAME": "main.coinyear.coinyear",
                       "COINYEAR_ENDPOINT_NAME": "coinyear-prod", "COINYEAR_LOOP_VOLUME": "/Volumes/main/coinyear/loop",
                       "DATABRICKS_HOST": api.url, "DATABRICKS_TOKEN": "workspace-token"}.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    invocations = "/serving-endpoints/coinyear-prod/invocations"
    api.routes[("POST", invocations)] = (200, {"predictions": [-27.0]}, {})  # Model Serving sends no version
    api.routes[("GET", "/api/2.0/serving-endpoints/coinyear-prod")] = (200, {
        "state": {"ready": "READY"}, "config": {"served_entities": [
            {"name": "v7", "entity_name": "main.coinyear.coinyear", "entity_version": "7"}]}}, {})
    at = app()
    assert "Serving **main.coinyear.coinyear** version **7**" in texts(at.sidebar.success)
    at = press(upload_pair(at, coin_image(1), coin_image(2)), "Predict")
    (call,) = api.calls(invocations)
    request_id = call["json"]["client_request_id"]
    assert call["headers"]["Authorization"] == "Bearer workspace-token"
    assert f"`{request_id}`" in texts(at.markdown) and "version **7**" in texts(at.markdown)
    folder = "/api/2.0/fs/files/Volumes/main/coinyear/loop/feedback/"
    api.routes[("PUT", folder + "*")] = (204, {}, {})
    at.text_input(key="year_from").input("27 BC")
    at = press(at, "Submit correction")
    (upload,) = [r for r in api.received if r["method"] == "PUT"]
    assert upload["path"].startswith(folder) and upload["path"].endswith(".json?overwrite=false")
    assert upload["json"]["request_id"] == request_id and upload["json"]["year_from"] == -27
    assert upload["json"]["actor"] == "anonymous"  # local-dev: nobody signed in, so it is never trained on
    assert not at.error

    # photos over the payload table's limit are in the volume before the request leaves
    api.routes[("PUT", "/api/2.0/fs/files/Volumes/main/coinyear/loop/photos/*")] = (204, {}, {})
    big_front, big_back = noise_photo(1), noise_photo(2)
    at = press(upload_pair(at, big_front, big_back), "Predict")
    big_id = api.calls(invocations)[-1]["json"]["client_request_id"]
    photos = {r["path"].split("?")[0].rsplit("/", 1)[1]: r["body"] for r in api.received
              if r["method"] == "PUT" and f"/photos/{big_id}/0/" in r["path"]}
    assert photos == {"front": big_front, "back": big_back}
    assert not at.error


def test_a_file_that_is_not_an_image_is_flagged_and_left_to_the_api(api):
    api.routes[INVOCATIONS] = (400, {"error_code": "INVALID_PARAMETER_VALUE",
                                     "message": "row 0: front image: cannot identify image file"}, {})
    at = upload_pair(app(), b"%PDF-1.4 not a photo", coin_image(2))
    assert not at.exception
    assert "The front file cannot be shown" in texts(at.warning)
    at = press(at, "Predict")
    assert "cannot identify image file" in texts(at.error)


def test_api_down_is_a_clear_message(api, monkeypatch):
    api.shutdown()
    api.server_close()
    at = press(upload_pair(app(), coin_image(1), coin_image(2)), "Predict")
    assert not at.exception
    assert f"Cannot reach the coinyear API at {api.url}" in texts(at.error)
    assert f"Cannot reach the coinyear API at {api.url}" in texts(at.sidebar.warning)


def test_a_slow_api_times_out_with_a_message(api):
    api.routes[INVOCATIONS] = (200, {"predictions": [50.0]}, ANSWER_HEADERS, 4)
    at = press(upload_pair(app(), coin_image(1), coin_image(2)), "Predict")
    assert "did not answer within 2 s" in texts(at.error)


def test_sidebar_names_the_served_model_version(api):
    assert "Serving **coinyear** version **3**" in texts(app().sidebar.success)


def test_sidebar_says_when_the_api_has_no_model_yet(api):
    api.routes[("GET", "/version")] = (200, {"model_name": "coinyear", "model_version": None,
                                             "last_error": "version 4 failed its smoke request"}, {})
    assert "no production model loaded yet. version 4 failed its smoke request" in texts(app().sidebar.warning)


# ------------------------------------------------------------------------------------------------ correct
@pytest.fixture
def predicted(api):
    api.routes[INVOCATIONS] = (200, {"predictions": [80.0]}, ANSWER_HEADERS)
    api.routes[("POST", "/feedback")] = (200, {"status": "recorded"}, {})
    return press(upload_pair(app(), coin_image(1), coin_image(2)), "Predict")


def correct(at: AppTest, first: str, last: str = "") -> AppTest:
    at.text_input(key="year_from").input(first)
    at.text_input(key="year_to").input(last)
    return press(at, "Submit correction")


def test_a_correction_is_posted_against_the_request_id(api, predicted):
    at = correct(predicted, "27 BC", "AD 14")
    (call,) = api.calls("/feedback")
    assert call["json"] == {"request_id": "req-123", "year_from": -27, "year_to": 14, "source": "ui"}
    assert "correction **27 BC – AD 14** recorded for request `req-123`" in texts(at.success)


def test_a_single_year_correction_is_a_one_year_range(api, predicted):
    correct(predicted, "73")
    assert api.calls("/feedback")[0]["json"]["year_from"] == api.calls("/feedback")[0]["json"]["year_to"] == 73


@pytest.mark.parametrize("first, last, expected", [
    ("hello", "", "is not a year"),
    ("AD 80", "AD 70", "ends (AD 70) before it starts (AD 80)"),
    ("0", "", "there is no year 0"),
])
def test_an_unreadable_correction_is_explained_and_not_sent(api, predicted, first, last, expected):
    at = correct(predicted, first, last)
    assert expected in texts(at.error)
    assert not api.calls("/feedback")


def test_a_refused_correction_shows_the_api_message(api, predicted):
    api.routes[("POST", "/feedback")] = (404, {"error_code": "RESOURCE_DOES_NOT_EXIST",
                                               "message": "unknown request_id req-123"}, {})
    at = correct(predicted, "AD 70")
    assert "unknown request_id req-123" in texts(at.error)
    assert not at.main.success


def test_without_tokens_a_correction_goes_without_the_uis_own_token(api, predicted):
    """Local-dev (no COINYEAR_API_TOKENS): nobody signs in, so the correction is sent with no credential, never
    with the UI's own COINYEAR_API_TOKEN; the gateway records it as anonymous, which is never trained on.
    Before: sent with the UI's token, so the gateway took it as the token's holder."""
    api.routes[("POST", "/feedback")] = (200, {"recorded": True, "actor": "anonymous"}, {})
    at = correct(predicted, "AD 70")
    (call,) = api.calls("/feedback")
    assert "Authorization" not in call["headers"]
    assert "recorded as **anonymous**" in texts(at.success) and "waits on the Review page" in texts(at.success)


def test_a_correction_without_sign_in_never_becomes_training_data(api, predicted, tmp_path):
    """The UI's correction, sent again as it was sent to a real gateway: one that takes the UI's own token
    refuses it (no credential), an open one records it as anonymous, and retraining leaves that row out."""
    import hashlib

    from coinyear.jobs import clean, ingest
    from tests.code.test_serve_pieces import PATH, coin_body, gateway_client

    correct(predicted, "AD 70")
    (call,) = api.calls("/feedback")
    sent = {k: v for k, v in call["headers"].items() if k.lower() == "authorization"}
    with gateway_client(tmp_path / "takes-the-uis-token", api_tokens=[TOKEN]) as gateway:
        scored = gateway.post(PATH, json=coin_body(1), headers={"Authorization": f"Bearer {TOKEN}"})
        replay = gateway.post("/feedback", json={**call["json"], "request_id": scored.headers["x-request-id"]},
                              headers=sent)
        assert replay.status_code == 401, replay.text
    with gateway_client(tmp_path / "open", api_tokens=[]) as gateway:
        scored = gateway.post(PATH, json=coin_body(1))
        replay = gateway.post("/feedback", json={**call["json"], "request_id": scored.headers["x-request-id"]},
                              headers=sent)
        assert replay.status_code == 200, replay.text
        served = gateway.gateway.backend
        assert served.log_writer.flush(10) and served.feedback_writer.flush(10)
        candidates = ingest.feedback_candidates(served.lake, served.lake.read(FEEDBACK))
        kept, dropped = clean.clean(candidates, pd.DataFrame(), served.settings)
    assert kept.empty and list(dropped["reason"]) == ["anonymous"]
    assert hashlib.sha256(TOKEN.encode()).hexdigest()[:8] not in served.lake.read(FEEDBACK).to_csv()


def predict_with_tokens(api, monkeypatch, tokens: str) -> AppTest:
    monkeypatch.setenv("COINYEAR_API_TOKENS", tokens)
    get_settings.cache_clear()
    api.routes[INVOCATIONS] = (200, {"predictions": [80.0]}, ANSWER_HEADERS)
    return press(upload_pair(app(), coin_image(1), coin_image(2)), "Predict")


def test_with_tokens_an_unsigned_visitor_is_asked_to_sign_in_before_correcting(api, monkeypatch):
    """Before: anyone reaching the Predict page posted corrections with the UI's own token."""
    at = predict_with_tokens(api, monkeypatch, "ada:ada-secret")
    assert "Predicted year" in [m.label for m in at.metric]
    assert not [b for b in at.button if b.label == "Submit correction"]
    assert "Sign in with an API token to correct the date" in texts(at.info)
    assert not api.calls("/feedback")


def test_a_signed_in_correction_is_sent_with_the_persons_own_token(api, monkeypatch):
    api.routes[("POST", "/feedback")] = (200, {"recorded": True, "actor": "ada"}, {})
    at = sign_in(predict_with_tokens(api, monkeypatch, "ada:ada-secret,other-secret"), "Ada", "ada-secret")
    assert "Predicted year" in [m.label for m in at.metric]  # the prediction stays through the sign-in
    at = correct(at, "AD 70")
    (call,) = api.calls("/feedback")
    assert call["headers"]["Authorization"] == "Bearer ada-secret"  # the gateway records who from it
    assert "recorded as **ada**" in texts(at.success) and "used when the model is next retrained" in texts(at.success)


def test_as_a_databricks_app_the_feedback_file_names_the_signed_in_person(api, monkeypatch):
    for key, value in {"COINYEAR_SERVING_BACKEND": "databricks", "COINYEAR_LOOP_VOLUME": "/Volumes/main/coinyear/loop",
                       "DATABRICKS_HOST": api.url, "DATABRICKS_TOKEN": "workspace-token"}.items():
        monkeypatch.setenv(key, value)
    api.routes[("GET", "/api/2.0/serving-endpoints/coinyear")] = (200, {"state": {"ready": "READY"}}, {})
    api.routes[("PUT", "/api/2.0/fs/files/Volumes/main/coinyear/loop/feedback/*")] = (204, {}, {})
    at = sign_in(predict_with_tokens(api, monkeypatch, "ada:ada-secret"), "Ada", "ada-secret")
    correct(at, "AD 70")
    (upload,) = [r for r in api.received if r["method"] == "PUT"]
    assert upload["json"]["actor"] == "ada" and b"ada-secret" not in upload["body"]


@pytest.mark.parametrize("text, year", [("27 BC", -27), ("AD 73", 73), ("73", 73), ("-27", -27), ("73 ad", 73),
                                        ("BC 4", -4), (" 1 BCE ", -1)])
def test_parse_year_reads_numismatic_forms(text, year):
    assert parse_year(text) == year


@pytest.mark.parametrize("text", ["", "AD", "AD -5", "0", "AD 73 BC", "12345", "73.5"])
def test_parse_year_rejects_what_is_not_a_year(text):
    with pytest.raises(ValueError):
        parse_year(text)


# ------------------------------------------------------------------------------------------------ monitor
def log_rows(day: str, count: int, failed: int, version: str, prediction: float) -> list[dict]:
    stamp = pd.Timestamp(f"{day}T12:00:00Z")
    return [{"request_id": f"{day}-{version}-{i}", "timestamp": stamp, "date": stamp.date(),
             "status_code": 400 if i < failed else 200, "execution_time_ms": 10.0 + i,
             "model_name": "coinyear", "model_version": version,
             "prediction": None if i < failed else prediction + i} for i in range(count)]


def test_monitor_has_empty_states_before_any_traffic(api):
    at = app("monitor.py")
    assert "No requests logged yet" in texts(at.info)
    assert "No drift indicators yet" in texts(at.info)


def test_monitor_summarises_the_log_feedback_and_drift(api):
    lake = open_lake(get_settings())
    lake.append(INFERENCE_LOG, log_rows("2026-11-20", 10, 2, "1", 50.0) + log_rows("2026-11-21", 10, 0, "2", 90.0))
    lake.append(FEEDBACK, [  # version 1 predicted 52 and 53: 17 and 18 years off the range's midpoint, AD 35
        {"request_id": "2026-11-20-1-2", "year_from": 30, "year_to": 40, "timestamp": pd.Timestamp.now(tz="UTC")},
        {"request_id": "2026-11-20-1-3", "year_from": 30, "year_to": 40, "timestamp": pd.Timestamp.now(tz="UTC")},
        # version 2 predicted 90, the midpoint of the expert's range: no error
        {"request_id": "2026-11-21-2-0", "year_from": 85, "year_to": 95, "timestamp": pd.Timestamp.now(tz="UTC")},
    ])
    lake.append(MONITORING, pd.DataFrame({  # two runs of `coinyear monitor`: the later one counts
        "date": ["2026-11-20", "2026-11-21", "2026-11-20", "2026-11-21"], "model_version": ["1", "2", "1", "2"],
        "computed_at": pd.to_datetime(["2026-11-21T01:00Z"] * 2 + ["2026-11-22T01:00Z"] * 2),
        "prediction_psi": [0.9, 0.9, 0.05, 0.31], "brightness_psi": [0.9, 0.9, 0.01, 0.02]}))
    at = app("monitor.py")
    kpis = {m.label: m.value for m in at.metric}
    assert kpis["Requests"] == "20" and kpis["Error rate"] == "10.0%"
    by_version = at.dataframe[0].value.set_index("version")
    assert by_version.loc["1", "MAE (years)"] == pytest.approx(17.5)
    assert by_version.loc["2", "MAE (years)"] == 0
    assert "Drift on 2026-11-21: prediction_psi above 0.25." in texts(at.warning)


def test_monitor_counts_requests_not_coins(api):
    """Three requests: one of 4 coins, one of 1 coin, one refused with 2 rows: 3 requests, 1 failed (33.3%), and
    the caption says 7 coins (the page counted 7 requests and 28.6% before)."""
    stamp = pd.Timestamp("2026-11-20T12:00:00Z")

    def rows(request: str, coins: int, status: int, latency: float) -> list[dict]:
        return [{"request_id": f"{request}-{i}", "http_request_id": request, "timestamp": stamp, "date": stamp.date(),
                 "status_code": status, "execution_time_ms": latency, "model_name": "coinyear", "model_version": "1",
                 "prediction": None if status >= 400 else 50.0 + i} for i in range(coins)]

    open_lake(get_settings()).append(INFERENCE_LOG, rows("a", 4, 200, 40.0) + rows("b", 1, 200, 10.0)
                                + rows("c", 2, 400, 1.0))
    at = app("monitor.py")
    kpis = {m.label: m.value for m in at.metric}
    assert kpis["Requests"] == "3" and kpis["Error rate"] == "33.3%"
    assert kpis["Latency p50"] == "25 ms"  # the two answered requests, each once (not 40 ms, as per coin)
    assert "3 logged requests (7 coins)" in texts(at.caption)


def test_the_page_and_the_monitoring_job_agree_on_feedback_mae_and_the_drift_threshold(api, monkeypatch):
    """One feedback error and one PSI threshold (COINYEAR_MONITOR_PSI_ALERT) for the page and `coinyear monitor`."""
    from coinyear.jobs.monitor import compute_monitoring

    monkeypatch.setenv("COINYEAR_MONITOR_PSI_ALERT", "0.4")
    monkeypatch.setenv("COINYEAR_RETRAIN_BASE_LIMIT", "20")
    get_settings.cache_clear()
    lake = open_lake(get_settings())
    lake.append(INFERENCE_LOG, log_rows("2026-11-20", 6, 0, "1", 50.0) + log_rows("2026-11-21", 6, 0, "2", 90.0))
    day1, day2 = pd.Timestamp("2026-11-22T00:00Z"), pd.Timestamp("2026-11-23T00:00Z")
    lake.append(FEEDBACK, [  # a range, a single year, and a request corrected twice (the later one counts)
        {"request_id": "2026-11-20-1-0", "year_from": 30, "year_to": 60, "timestamp": day1},
        {"request_id": "2026-11-20-1-1", "year_from": 80, "year_to": 80, "timestamp": day1},
        {"request_id": "2026-11-21-2-2", "year_from": 10, "year_to": 10, "timestamp": day1},
        {"request_id": "2026-11-21-2-2", "year_from": 70, "year_to": 100, "timestamp": day2},
    ])
    job = compute_monitoring(get_settings()).set_index("model_version")
    # the job's alert list follows the same setting: none of these PSIs is above 0.4 unless listed
    for _, row in job.iterrows():
        listed = set(filter(None, row["drift_alerts"].split(",")))
        assert listed == {c for c in ("prediction_psi", "brightness_psi", "contrast_psi") if row[c] > 0.4}
    lake.append(MONITORING, pd.DataFrame({
        "date": ["2026-11-21"], "model_version": ["2"], "computed_at": pd.to_datetime(["2026-11-22T01:00Z"]),
        "prediction_psi": [0.3], "brightness_psi": [0.45]}))
    at = app("monitor.py")
    page = at.dataframe[0].value.set_index("version")["MAE (years)"]
    # version 1: |50 - 45| and |51 - 80|; version 2: |92 - 85|
    assert job.loc["1", "feedback_mae"] == pytest.approx(17.0) and job.loc["2", "feedback_mae"] == pytest.approx(7.0)
    assert page.to_dict() == pytest.approx(job["feedback_mae"].to_dict())
    assert "Drift on 2026-11-21: brightness_psi above 0.4." in texts(at.warning)  # 0.3 is not above 0.4


# ------------------------------------------------------------------------------------------------- models
@pytest.fixture
def registered(api):
    """Three registered versions (real MLflow registry, no training): 2 in production, having replaced 1."""
    settings = get_settings()
    client = registry.client(settings)
    client.create_registered_model(settings.model_name)
    experiment = ensure_experiment(settings)
    for mae in (20.0, 15.0, 18.0):
        with mlflow.start_run(experiment_id=experiment) as run:
            mlflow.log_metrics({"val_mae": mae, "val_within_10y": 0.4})
        client.create_model_version(settings.model_name, f"{run.info.artifact_uri}/model", run.info.run_id)
    registry.promote(settings, 1, registry.PRODUCTION)
    registry.promote(settings, 2, registry.PRODUCTION)
    registry.tag_version(settings, 3, {"decision": "rejected", "decision_reason": "MAE not 2% lower"})
    open_lake(settings).append(MODEL_DECISIONS, pd.DataFrame({
        "decided_at": pd.to_datetime(["2026-11-20T03:00Z", "2026-11-21T03:00Z"]), "candidate_version": ["2", "3"],
        "decision": ["promoted", "rejected"], "reason": ["first production", "MAE not 2% lower"]}))
    return settings


def test_models_page_has_empty_states(api):
    at = app("models.py")
    assert "No versions of `coinyear` registered yet" in texts(at.info)
    assert "No retraining decisions yet" in texts(at.info)


def test_models_page_lists_versions_aliases_metrics_and_decisions(registered):
    at = app("models.py")
    versions = at.dataframe[0].value.set_index("version")
    assert list(versions.index) == [3, 2, 1]
    assert versions.loc[2, "aliases"] == "production"
    assert versions.loc[2, "val MAE (years)"] == 15.0
    assert versions.loc[3, "decision"] == "rejected" and versions.loc[2, "replaced"] == "1"
    decisions = at.dataframe[1].value
    assert list(decisions["decision"]) == ["rejected", "promoted"]  # newest first


def test_promotion_needs_confirmation_then_moves_the_alias(registered):
    at = app("models.py")
    at.selectbox(key="promote_version").set_value("3")
    at.radio(key="promote_alias").set_value("production")
    at = press(at, "Promote…")
    assert "Point `production` at version 3?" in texts(at.warning)
    assert registry.version_by_alias(registered, registry.PRODUCTION) == "2"  # nothing changed yet
    at = press(at, "Yes, do it")
    assert registry.version_by_alias(registered, registry.PRODUCTION) == "3"
    assert "`production` now points to version 3 (was 2)" in texts(at.success)


def test_a_cancelled_rollback_changes_nothing_and_a_confirmed_one_rolls_back(registered):
    at = press(app("models.py"), "Roll back production…")
    assert "Roll production back from version 2" in texts(at.warning)
    at = press(at, "Cancel")
    assert not at.warning and registry.version_by_alias(registered, registry.PRODUCTION) == "2"
    at = press(press(at, "Roll back production…"), "Yes, do it")
    assert registry.version_by_alias(registered, registry.PRODUCTION) == "1"
    assert "Rolled production back from version 2 to version 1" in texts(at.success)
    at = press(press(at, "Roll back production…"), "Yes, do it")  # version 1 replaced nothing
    assert "no earlier production version" in texts(at.error)


def test_a_rollback_confirmed_after_production_moved_does_not_roll_back_the_new_version(registered):
    """The question named version 2; before the person confirms, a retraining moves production (here: back to 1
    and forward to a new promotion of 2 would look the same, so: to 1). The confirmation must not roll back a
    version the person never saw."""
    at = press(app("models.py"), "Roll back production…")
    assert "Roll production back from version 2" in texts(at.warning)
    registry.promote(registered, "1", registry.PRODUCTION)  # someone else, meanwhile
    at = press(at, "Yes, do it")
    assert registry.version_by_alias(registered, registry.PRODUCTION) == "1"
    assert "production is version 1 now, not 2" in texts(at.error)


# ------------------------------------------------------------------------------------ who may move production
def test_without_tokens_coinyear_ui_refuses_a_non_loopback_address(api, monkeypatch, capsys):
    """The gateway's rule: no credentials, loopback only (the refusal comes before Streamlit is started)."""
    import os

    from coinyear.cli import main
    from coinyear.ui.access import check_bind

    monkeypatch.setattr(os, "execv", lambda *args: pytest.fail(f"the UI was started: {args}"))
    assert main(["ui", "--host", "0.0.0.0"]) == 2
    assert "refusing to serve the UI on 0.0.0.0 without auth" in capsys.readouterr().err
    monkeypatch.setenv("COINYEAR_API_TOKENS", "ui-secret")
    get_settings.cache_clear()
    check_bind(get_settings(), "0.0.0.0")  # with tokens people sign in: any address
    monkeypatch.setenv("COINYEAR_AUTH_DISABLED", "true")
    get_settings.cache_clear()
    with pytest.raises(RuntimeError, match="without auth"):
        check_bind(get_settings(), "10.0.0.5")
    check_bind(get_settings(), "127.0.0.1")


def test_without_tokens_a_browser_on_another_machine_cannot_move_production(registered, monkeypatch):
    from streamlit.runtime.context import ContextProxy

    monkeypatch.setattr(ContextProxy, "ip_address", property(lambda self: "10.1.2.3"))
    at = app("models.py")
    assert "Registry actions are refused to 10.1.2.3" in texts(at.error)
    assert not [b for b in at.button if b.label in ("Promote…", "Roll back production…")]


def sign_in(at: AppTest, name: str, token: str) -> AppTest:
    at.text_input(key="sign_in_name").input(name)
    at.text_input(key="sign_in_token").input(token)
    return press(at, "Sign in")


def test_a_rotated_out_token_ends_the_ui_session(registered, monkeypatch):
    """The sign-in is checked again on every page run: once its token leaves COINYEAR_API_TOKENS the session is
    signed out, on any page. Before: a signed-in session outlived its token."""
    monkeypatch.setenv("COINYEAR_API_TOKENS", "old-token,ui-secret")
    get_settings.cache_clear()
    at = sign_in(app("models.py"), "Ada", "old-token")
    assert [b for b in at.button if b.label == "Promote…"]
    monkeypatch.setenv("COINYEAR_API_TOKENS", "old-token,ui-secret,new-token")  # another token added: still in
    get_settings.cache_clear()
    assert [b for b in at.run().button if b.label == "Promote…"]
    monkeypatch.setenv("COINYEAR_API_TOKENS", "ui-secret,new-token")  # rotated out
    get_settings.cache_clear()
    at = at.run()
    assert not [b for b in at.button if b.label in ("Promote…", "Roll back production…")]
    assert "Your sign-in ended: its token is no longer accepted" in texts(at.warning)
    assert "Sign in with an API token to promote or roll back" in texts(at.info)
    at.switch_page("predict.py").run()
    assert not at.exception and "Acting as" not in texts(at.caption)


def test_with_tokens_a_person_signs_in_and_each_move_is_recorded_with_who_did_it(registered, monkeypatch):
    import hashlib

    monkeypatch.setenv("COINYEAR_API_TOKENS", "old-token,ui-secret")
    get_settings.cache_clear()
    at = app("models.py")
    assert not [b for b in at.button if b.label in ("Promote…", "Roll back production…")]
    at = sign_in(at, "Ada", "not-a-token")
    assert "That token is not accepted" in texts(at.error)
    assert not [b for b in at.button if b.label == "Promote…"]

    at = sign_in(at, "Ada", "ui-secret")
    actor = f"Ada (token {hashlib.sha256(b'ui-secret').hexdigest()[:8]})"
    assert f"Acting as **{actor}**" in texts(at.caption)
    at.selectbox(key="promote_version").set_value("3")
    at.radio(key="promote_alias").set_value("production")
    at = press(press(at, "Promote…"), "Yes, do it")
    assert registry.version_by_alias(registered, registry.PRODUCTION) == "3"
    at = press(press(at, "Roll back production…"), "Yes, do it")
    assert registry.version_by_alias(registered, registry.PRODUCTION) == "2"
    assert not at.error

    decisions = open_lake(get_settings()).read(MODEL_DECISIONS).sort_values("decided_at")
    by_hand = decisions[decisions["kind"] == "ui"]
    assert list(by_hand["decision"]) == ["promoted", "rolled_back"]
    assert list(by_hand["actor"]) == [actor, actor]
    assert list(by_hand["production_before"]) == ["2", "3"] and list(by_hand["production_after"]) == ["3", "2"]
    assert not decisions.astype(str).apply(lambda column: column.str.contains("ui-secret")).any().any()
    tags = {v.version: v.tags for v in registry.list_versions(registered)}
    assert tags["3"]["moved_by"] == actor and tags["3"]["moved_by_action"] == "promoted"
    assert tags["2"]["moved_by"] == actor and tags["2"]["moved_by_action"] == "rolled_back"
    assert app("models.py").dataframe[0].value.set_index("version").loc[2, "moved by"] == actor


# ------------------------------------------------------------------------------------------------- review
def anonymous_correction(request_id: str = "req-anon", year: int = 71) -> dict:
    return {"request_id": request_id, "year_from": year, "year_to": year + 2, "source": "ui", "note": None,
            "timestamp": pd.Timestamp("2026-11-20T12:00:00Z"), "actor": "anonymous"}


def test_review_queue_holds_what_nobody_answers_for_until_it_is_reviewed_or_settled():
    from coinyear.jobs.ingest import feedback_key, review_queue

    feedback = pd.DataFrame([
        anonymous_correction("a"), anonymous_correction("b"), {**anonymous_correction("c"), "actor": None},
        {**anonymous_correction("d"), "actor": "ada"},  # answered for: never queued
        anonymous_correction("e"),
        {**anonymous_correction("e"), "actor": "ada", "timestamp": pd.Timestamp("2026-11-21T12:00:00Z")},
    ])
    reviewed = pd.DataFrame({"feedback_key": [feedback_key(feedback.iloc[[1]]).iloc[0]]})  # b: reviewed
    queue = review_queue(feedback, reviewed)
    # a waits; b was reviewed; c (no actor) waits; d is accountable; e was settled by Ada's later correction
    assert list(queue["request_id"]) == ["a", "c"]
    assert list(queue["feedback_key"]) == list(feedback_key(feedback.iloc[[0, 2]]))
    assert review_queue(feedback.iloc[:0], reviewed).empty


def review_page(api, monkeypatch, tokens: str) -> AppTest:
    monkeypatch.setenv("COINYEAR_API_TOKENS", tokens)
    get_settings.cache_clear()
    lake = open_lake(get_settings())
    lake.append(INFERENCE_LOG, [{"request_id": "req-anon", "timestamp": pd.Timestamp("2026-11-20T11:59:00Z"),
                                 "date": pd.Timestamp("2026-11-20").date(), "status_code": 200,
                                 "prediction": 64.0, "front_image": coin_image(1), "back_image": coin_image(2)}])
    lake.append(FEEDBACK, [anonymous_correction()])
    return app("review.py")


def test_a_signed_in_expert_accepts_an_anonymous_correction_as_their_own(api, monkeypatch):
    """Before: an anonymous correction was kept for monitoring and never trained on, with no way for an expert to
    vouch for it. Accepting sends it again with the expert's own token (the gateway records them) and records
    the verdict; the queue is then empty."""
    api.routes[("POST", "/feedback")] = (200, {"recorded": True, "actor": "ada"}, {})
    at = review_page(api, monkeypatch, "ada:ada-secret")
    assert "**AD 71 – AD 73** for request `req-anon`" in texts(at.markdown)
    assert "the model answered AD 64" in texts(at.markdown)
    assert not [b for b in at.button if b.label == "Accept"]  # not signed in yet
    at = press(sign_in(at, "Ada", "ada-secret"), "Accept")
    (call,) = api.calls("/feedback")
    assert call["headers"]["Authorization"] == "Bearer ada-secret"
    assert {k: call["json"][k] for k in ("request_id", "year_from", "year_to", "source")} == {
        "request_id": "req-anon", "year_from": 71, "year_to": 73, "source": "review"}
    (review,) = open_lake(get_settings()).read(FEEDBACK_REVIEWS).to_dict("records")
    assert (review["verdict"], review["request_id"]) == ("accepted", "req-anon")
    assert review["actor"].startswith("Ada (token ")  # who vouched for it, never the token
    assert "No corrections waiting for review" in texts(at.info)
    assert "Accepted AD 71 – AD 73" in texts(at.success)


def test_a_rejected_correction_leaves_the_queue_and_is_never_sent(api, monkeypatch):
    at = sign_in(review_page(api, monkeypatch, "ada:ada-secret"), "Ada", "ada-secret")
    at = press(at, "Reject")
    assert not api.calls("/feedback")
    assert list(open_lake(get_settings()).read(FEEDBACK_REVIEWS)["verdict"]) == ["rejected"]
    assert "No corrections waiting for review" in texts(at.info)


def test_without_tokens_the_queue_is_shown_but_nobody_can_review_it(api, monkeypatch):
    at = review_page(api, monkeypatch, "")
    assert "**AD 71 – AD 73** for request `req-anon`" in texts(at.markdown)
    assert "Reviewing needs tokens" in texts(at.info)
    assert not [b for b in at.button if b.label in ("Accept", "Reject")]


def test_on_a_read_only_lake_an_accepted_correction_still_trains_and_a_rejection_says_it_was_not_recorded(
        api, monkeypatch):
    """A Databricks App reads the tables through a SQL warehouse, read-only and without filtered reads: the page
    must neither crash nor claim a verdict it could not record."""
    import coinyear.lake

    api.routes[("POST", "/feedback")] = (200, {"recorded": True, "actor": "ada"}, {})
    at = sign_in(review_page(api, monkeypatch, "ada:ada-secret"), "Ada", "ada-secret")
    real_open_lake = coinyear.lake.open_lake

    class ReadOnly:
        def __init__(self, lake):
            self.lake = lake

        def read(self, table, columns=None, filters=None, version=None):
            if filters:
                raise NotImplementedError("the warehouse lake reads whole tables")
            return self.lake.read(table, columns=columns)

        def append(self, table, rows, **kwargs):
            raise RuntimeError(f"the warehouse lake is read-only: {table} is written by the jobs")

    monkeypatch.setattr(coinyear.lake, "open_lake", lambda settings=None: ReadOnly(real_open_lake(settings)))
    at = press(at.run(), "Reject")
    assert "could not be recorded, so the correction stays in the queue" in texts(at.error)
    assert "its photos cannot be shown here" in texts(at.markdown)
    at = press(at, "Accept")
    assert len(api.calls("/feedback")) == 1  # sent as Ada's own correction
    assert "recorded as your correction" in texts(at.success) and "could not be recorded" in texts(at.success)
