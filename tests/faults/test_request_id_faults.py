"""A `client_request_id` is a name in the loop volume (`photos/<client_request_id>/<row>/front|back`): one that is
not a plain name (`..`, a slash, a control character) must never become a path. The gateway refuses it with a
400; ingestion, which reads what any caller of the Model Serving endpoint sent, skips the volume for it and says so.
"""

from __future__ import annotations

import base64
import json

import pandas as pd
import pytest

from coinyear.databricks.volume import photo_path
from tests.conftest import coin_image, make_settings

UNSAFE = ["..", ".", "../outside", "a/b", "a\\\\b", "", "x" * 129, "tab\there", "nul\x00", ".hidden", "é"]


@pytest.mark.parametrize("request_id", UNSAFE)
def test_an_unsafe_id_is_never_a_volume_path(request_id):
    from coinyear.serve.request_id import safe_request_id

    assert not safe_request_id(request_id)
    with pytest.raises(ValueError, match="client_request_id"):
        photo_path("/Volumes/c/s/v", request_id, 0, "front")


@pytest.mark.parametrize("request_id", ["c-1", "catalogue-42", "0f3a" * 8, "A.b_c-9", "x" * 128])
def test_plain_names_are_safe(request_id):
    from coinyear.serve.request_id import safe_request_id

    assert safe_request_id(request_id)
    assert photo_path("/Volumes/c/s/v/", request_id, 3, "back") == f"/Volumes/c/s/v/photos/{request_id}/3/back"


def test_ingestion_skips_the_volume_for_an_unsafe_id_and_reports_it(tmp_path):
    from coinyear.databricks.payloads import IngestResult, _append_requests
    from coinyear.lake import open_lake
    from coinyear.lake.tables import INFERENCE_LOG

    volume, secret = tmp_path / "volume", coin_image(7)
    (volume / "photos").mkdir(parents=True)
    for side in ("front", "back"):  # what `<volume>/photos/../0/<side>` would reach: outside photos/
        (volume / "0").mkdir(exist_ok=True)
        (volume / "0" / side).write_bytes(secret)
    settings = make_settings(tmp_path / "home", loop_volume=str(volume), payload_table="main.s.payloads")
    lake, result = open_lake(settings), IngestResult(settings.payload_table, loop_volume=settings.loop_volume)
    unlogged = {"databricks_request_id": "dbx-1", "client_request_id": "..", "request_time_us": 1_700_000_000_000_000,
                "status_code": 200, "execution_duration_ms": 12, "sampling_fraction": 1.0, "served_entity_id": "e",
                "requester": "sp", "logging_error_codes": None, "entity_name": "coinyear", "entity_version": "2",
                "request": None, "response": json.dumps({"predictions": [5.0]})}
    photo = base64.b64encode(coin_image(1)).decode()
    logged = {**unlogged, "databricks_request_id": "dbx-2", "client_request_id": "../x",
              "request": json.dumps({"inputs": [{"front_image_base64": photo, "back_image_base64": photo}]})}
    _append_requests(pd.DataFrame([unlogged, logged]), settings, lake, result, None)
    rows = lake.read(INFERENCE_LOG).set_index("http_request_id")
    assert rows.loc["dbx-1", "front_image"] is None and rows.loc["dbx-1", "prediction"] == 5.0  # kept, no photos
    assert bytes(rows.loc["dbx-2", "front_image"]) == coin_image(1)  # a logged request needs no volume: as before
    assert result.photos_unsafe_id == 1 and result.photos_from_volume == 0
    assert "client_request_id" in result.report() and "not a plain name" in result.report()
