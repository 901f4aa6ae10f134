"""The whole front end in a real headless Chromium: the real gateway (`coinyear serve`) with the registered model,
the real UI (`coinyear ui`), two real OCRE photos uploaded, Predict, the year read from the page, a correction
submitted, and the feedback row found in the Delta table. Writes the README screenshots to docs/img/.

The coin photos are masked in the screenshots: the OCRE photographs may not be copied into this repository.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from coinyear.config import get_settings
from coinyear.evaluate import year_label
from coinyear.lake import open_lake
from coinyear.lake.tables import FEEDBACK, INFERENCE_LOG, Lake
from coinyear.pyfunc import encode_file
from tests.conftest import REPO, coin_image, require_tool

pytestmark = pytest.mark.browser

TOKEN = "browser-test-token"
SCREENSHOTS = REPO / "docs" / "img"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
PHOTO_MASK = "#c8b68e"


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    message = ("NO BROWSER: Debian's chromium is not installed (`apt-get install -y chromium`, which .ci/run "
               "does); the browser end-to-end test of the UI did NOT run")
    if not found:
        print(f"\n{'!' * 100}\n{message}\n{'!' * 100}", file=sys.stderr)
    return require_tool(found, message)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, seconds: float, log: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{process.args} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} not ready after {seconds:.0f} s:\n{log.read_text()[-3000:]}")


def start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def stack(trained, tmp_path_factory):
    """The gateway serving the trained model's production version, and the UI pointed at it: (settings, urls)."""
    settings, _ = trained
    logs = tmp_path_factory.mktemp("stack-logs")
    api_port, ui_port = free_port(), free_port()
    env = {**os.environ, "COINYEAR_HOME": str(settings.home_dir), "COINYEAR_DATA_DIR": str(settings.data_dir),
           "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri, "MLFLOW_REGISTRY_URI": settings.mlflow_registry_uri,
           "COINYEAR_API_TOKENS": TOKEN, "COINYEAR_API_TOKEN": TOKEN, "COINYEAR_LOG_FLUSH_SECONDS": "0.2",
           "COINYEAR_API_URL": f"http://127.0.0.1:{api_port}", "COINYEAR_NUM_THREADS": "1"}
    coinyear = str(Path(sys.executable).with_name("coinyear"))
    server = start([coinyear, "serve", "--port", str(api_port)], env, logs / "serve.log")
    ui = start([coinyear, "ui", "--port", str(ui_port)], env, logs / "ui.log")
    try:
        wait_for(f"http://127.0.0.1:{api_port}/ready", server, 180, logs / "serve.log")
        wait_for(f"http://127.0.0.1:{ui_port}/_stcore/health", ui, 60, logs / "ui.log")
        yield settings, f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{ui_port}"
    finally:
        stop(ui)
        stop(server)


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def coins(ocre_dir: Path, count: int) -> pd.DataFrame:
    manifest = pd.read_csv(ocre_dir / "manifest.csv").dropna(subset=["obverse", "reverse"])
    return manifest.sample(count, random_state=7)


def poll(check, seconds: float = 30):
    deadline = time.monotonic() + seconds
    while True:
        result = check()
        if result is not None or time.monotonic() > deadline:
            return result
        time.sleep(0.3)


def rows_of(lake: Lake, table: str, request_id: str) -> pd.DataFrame | None:
    """The table's rows for one request id; None while there are none (the gateway commits in batches)."""
    rows = lake.read(table, filters=[("request_id", "=", request_id)])
    return rows if len(rows) else None


def screenshot(page, name: str) -> None:
    """The whole page: Streamlit scrolls inside its main block, so grow the window to the content first.

    Into docs/img only when asked (UPDATE_SCREENSHOTS=1): a test run must not rewrite tracked files."""
    if os.environ.get("UPDATE_SCREENSHOTS") != "1":
        return
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.wait_for_timeout(1000)  # let charts finish drawing
    height = page.evaluate("document.querySelector('[data-testid=\"stMainBlockContainer\"]').scrollHeight")
    page.set_viewport_size({"width": 1400, "height": max(900, int(height) + 80)})
    page.wait_for_timeout(500)
    page.screenshot(path=str(SCREENSHOTS / name), mask_color=PHOTO_MASK,
                    mask=[page.locator('[data-testid="stImage"] img')])
    page.set_viewport_size({"width": 1400, "height": 1000})


def test_predict_correct_monitor_models_in_a_real_browser(browser, stack, ocre_dir):  # no browser: skip first
    settings, api_url, ui_url = stack
    lake = open_lake(settings)
    coin = coins(ocre_dir, 1).iloc[0]
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(ui_url)
    page.get_by_text("Date a coin").wait_for()
    page.get_by_text("Serving coinyear version 1").wait_for()

    for side, photo in enumerate((coin["obverse"], coin["reverse"])):  # one at a time: each upload reruns the page
        page.locator('input[type="file"]').nth(side).set_input_files(str(ocre_dir / photo))
        page.locator('[data-testid="stImage"]').nth(side).wait_for()
    page.get_by_role("button", name="Predict").click()
    shown = page.get_by_test_id("stMetricValue").inner_text(timeout=60_000).strip()
    assert re.fullmatch(r"AD \d+|\d+ BC", shown), shown
    text = page.get_by_test_id("stMainBlockContainer").inner_text()
    assert re.search(r"90% interval: (AD \d+|\d+ BC) – (AD \d+|\d+ BC)", text), text
    # the portrait head's likeliest portraits beside the year, the first with its coins' median year
    assert re.search(r"Portrait: ([A-Z][a-z]+( [A-Z][a-z]+)*|other) \d+%", text), text
    # the five nearest reference coins under the prediction: their thumbnails (after the two photos), loaded and
    # drawn by the browser, and one caption naming their dates
    thumbnails = page.locator('[data-testid="stImage"] img')
    thumbnails.nth(6).wait_for()
    assert thumbnails.count() == 7
    for index in range(2, 7):
        assert thumbnails.nth(index).evaluate("img => img.decode().then(() => img.naturalWidth)") == 64
    caption = page.get_by_test_id("stMainBlockContainer").inner_text()
    assert re.search(r"Looks like these coins( of [A-Z][a-z]+( [A-Z][a-z]+)*)?, (AD \d+|\d+ BC)", caption), caption
    request_id = re.search(r"Request id ([0-9a-f-]{32,36})\b", text)
    assert request_id, "no request id on the page"
    request_id = request_id.group(1)

    logged = poll(lambda: rows_of(lake, INFERENCE_LOG, request_id))
    assert logged is not None, f"request {request_id} never reached the inference log"
    assert year_label(logged["prediction"].iloc[0]) == shown  # the page shows what the model answered
    screenshot(page, "predict.png")

    # corrections train the model: with tokens configured the page asks who gives one before taking it
    page.get_by_text("Sign in with an API token to correct the date").wait_for()
    assert page.get_by_role("button", name="Submit correction").count() == 0
    page.get_by_label("Your name").fill("Browser test")
    page.get_by_label("API token").fill(TOKEN)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_label("True year (or first year of the range)").fill("AD 70")
    page.get_by_label("Last year of the range (optional)").fill("AD 75")
    page.get_by_role("button", name="Submit correction").click()
    page.get_by_text(f"for request {request_id}").wait_for()
    feedback = poll(lambda: rows_of(lake, FEEDBACK, request_id))
    assert feedback is not None, "the correction is not in the feedback table"
    assert (feedback["year_from"].iloc[0], feedback["year_to"].iloc[0], feedback["source"].iloc[0]) == (70, 75, "ui")
    # sent with the signed-in person's token: the gateway records that token's actor (never the token)
    assert feedback["actor"].iloc[0] == f"token:{hashlib.sha256(TOKEN.encode()).hexdigest()[:8]}"
    screenshot(page, "correct.png")

    # a little more traffic, good and bad, so the Monitor page has something to chart
    for _, other in coins(ocre_dir, 6).iterrows():
        httpx.post(f"{api_url}/serving-endpoints/coinyear/invocations", timeout=30,
                   headers={"Authorization": f"Bearer {TOKEN}"},
                   json={"inputs": [{"front_image_base64": encode_file(ocre_dir / other["obverse"]),
                                     "back_image_base64": encode_file(ocre_dir / other["reverse"])}]})
    httpx.post(f"{api_url}/invocations", headers={"Authorization": f"Bearer {TOKEN}"}, json={"inputs": "nonsense"})
    poll(lambda: True if lake.count(INFERENCE_LOG) >= 8 else None)

    page.get_by_role("link", name="Monitor").click()
    page.get_by_text("Requests per day").wait_for()
    kpis = page.get_by_test_id("stMetric").all_inner_texts()
    assert any(re.search(r"Requests\s+(\d+)", k) and int(re.search(r"Requests\s+(\d+)", k).group(1)) >= 8
               for k in kpis), kpis
    screenshot(page, "monitor.png")

    page.get_by_role("link", name="Models").click()
    page.get_by_text("Change what is served").wait_for()
    # tokens are configured: registry actions need a sign-in; the one made on the Predict page holds here too
    page.get_by_text("Acting as Browser test (token").wait_for()
    page.get_by_text("Production is version 1.").wait_for()
    screenshot(page, "models.png")
    page.close()


@pytest.mark.parametrize("token, front, expected", [
    ("wrong-token", coin_image(1), "refused the request (403 PERMISSION_DENIED): invalid bearer token"),
    (TOKEN, b"these bytes are not a photo", "could not use this request (INVALID_PARAMETER_VALUE)"),
])
def test_the_real_gateway_errors_reach_the_page_as_messages(stack, monkeypatch, token, front, expected):
    _settings, api_url, _ = stack
    monkeypatch.setenv("COINYEAR_API_URL", api_url)
    monkeypatch.setenv("COINYEAR_API_TOKEN", token)
    get_settings.cache_clear()
    try:
        at = AppTest.from_file(str(REPO / "src" / "coinyear" / "ui" / "app.py"), default_timeout=60).run()
        at.file_uploader(key="front_upload").set_value(("front.jpg", front, "image/jpeg"))
        at.file_uploader(key="back_upload").set_value(("back.jpg", coin_image(2), "image/jpeg"))
        at.run()
        next(b for b in at.button if b.label == "Predict").click()
        at.run()
    finally:
        get_settings.cache_clear()
    assert not at.exception
    assert expected in "\n".join(e.value for e in at.error)
    assert not at.metric
