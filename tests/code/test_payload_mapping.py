"""The databricks loop's pure pieces, without Spark or a server: one payload row to inference_log rows, the
served entity the gateway reports, feedback file validation."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import pytest

from coinyear.config import Settings
from coinyear.databricks.payloads import feedback_record, map_payload
from coinyear.databricks.volume import photo_path, served_model
from tests.conftest import coin_image

FRONT, BACK = "front_image_base64", "back_image_base64"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def logged(request, response, status=200, client_id="c-1"):
    return {"databricks_request_id": "dbx-1", "client_request_id": client_id, "request_time_us": 1_700_000_000_000_000,
            "status_code": status, "execution_duration_ms": 12, "sampling_fraction": 1.0, "served_entity_id": "e",
            "requester": "sp", "logging_error_codes": None, "entity_name": "coinyear", "entity_version": "2",
            "request": request if request is None else json.dumps(request), "response": json.dumps(response)}


def test_columns_format_gives_one_row_per_coin_numbered_as_the_gateway_does():
    photos = [coin_image(seed) for seed in range(4)]
    request = {"inputs": {FRONT: [b64(photos[0]), b64(photos[2])], BACK: [b64(photos[1]), b64(photos[3])]}}
    rows = map_payload(logged(request, {"predictions": [3.5, -10.0]}), None, "coinyear")
    assert [r["request_id"] for r in rows] == ["c-1-0", "c-1-1"]
    assert [r["prediction"] for r in rows] == [3.5, -10.0]
    assert rows[1]["front_image"] == photos[2] and rows[1]["back_image_bytes"] == len(photos[3])
    assert {r["model_version"] for r in rows} == {"2"} and {r["http_request_id"] for r in rows} == {"dbx-1"}


def test_without_a_client_request_id_the_databricks_id_is_the_key():
    request = {"dataframe_records": [{FRONT: b64(coin_image(1)), BACK: b64(coin_image(2))}]}
    (row,) = map_payload(logged(request, {"predictions": [7.0]}, client_id=None), None, "coinyear")
    assert row["request_id"] == "dbx-1" and row["client_request_id"] is None


def test_an_answer_that_is_not_json_keeps_the_row_without_a_prediction():
    request = {"dataframe_records": [{FRONT: b64(coin_image(1)), BACK: b64(coin_image(2))}]}
    payload = logged(request, None) | {"response": "<html>gateway timeout</html>", "status_code": 504}
    (row,) = map_payload(payload, None, "coinyear")
    assert row["prediction"] is None and row["error_message"] == "HTTP 504" and row["front_image"] == coin_image(1)


def test_an_unlogged_request_takes_its_row_count_and_photos_from_the_volume(tmp_path):
    for row in range(2):
        for side in ("front", "back"):
            path = tmp_path / photo_path("", "big", row, side).lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(coin_image(10 * row + (side == "back")))
    rows = map_payload(logged(None, None, status=500, client_id="big"), str(tmp_path), "coinyear")
    assert [r["request_id"] for r in rows] == ["big-0", "big-1"]
    assert rows[1]["back_image"] == coin_image(11)


def test_the_gateway_reports_the_entity_with_most_traffic():
    endpoint = {"config": {"served_entities": [
        {"name": "old", "entity_name": "cat.s.coinyear", "entity_version": "4"},
        {"name": "new", "entity_name": "cat.s.coinyear", "entity_version": "5"}],
        "traffic_config": {"routes": [{"served_model_name": "old", "traffic_percentage": 90},
                                      {"served_model_name": "new", "traffic_percentage": 10}]}}}
    assert served_model(endpoint) == ("cat.s.coinyear", "4")
    endpoint["config"]["traffic_config"]["routes"][0]["traffic_percentage"] = 0
    assert served_model(endpoint) == ("cat.s.coinyear", "5")
    assert served_model({"config": {}}) is None


@pytest.mark.parametrize("content, error", [
    ({"request_id": "r", "year_from": 5, "year_to": 4, "timestamp": "2026-11-20T10:00:00+00:00"}, "after"),
    ({"request_id": "r", "year_from": 5, "year_to": 5, "timestamp": "2026-11-20T10:00:00"}, "time zone"),
    ({"request_id": "", "year_from": 5, "year_to": 5, "timestamp": "2026-11-20T10:00:00+00:00"}, "request_id"),
    ({"request_id": "r", "year_from": True, "year_to": 5, "timestamp": "2026-11-20T10:00:00+00:00"}, "year_from"),
    ({"request_id": "r", "year_from": 5, "year_to": 9999, "timestamp": "2026-11-20T10:00:00+00:00"}, "year_to"),
])
def test_feedback_files_are_validated_like_the_feedback_route(content, error):
    with pytest.raises(ValueError, match=error):
        feedback_record(content, Settings())


def test_a_valid_feedback_file_is_a_feedback_row():
    row = feedback_record({"request_id": "r-1", "year_from": -27, "year_to": -20,
                           "timestamp": "2026-11-20T11:00:00+01:00", "source": "ui", "actor": "ada"}, Settings())
    assert row == {"request_id": "r-1", "year_from": -27, "year_to": -20, "source": "ui", "note": None,
                   "timestamp": datetime(2026, 11, 20, 10, 0, tzinfo=UTC), "actor": "ada"}
    # a file written before feedback named its actor: a row without one (never trained on)
    older = feedback_record({"request_id": "r-2", "year_from": 5, "year_to": 5,
                             "timestamp": "2026-11-20T11:00:00+01:00"}, Settings())
    assert older["actor"] is None
    with pytest.raises(ValueError, match="actor"):
        feedback_record({"request_id": "r-3", "year_from": 5, "year_to": 5, "actor": ["ada"],
                         "timestamp": "2026-11-20T11:00:00+01:00"}, Settings())


def test_the_cli_reports_what_it_did_and_needs_one_of_its_settings(tmp_path, monkeypatch, capsys):
    from coinyear.cli import main
    from coinyear.config import get_settings

    monkeypatch.setenv("COINYEAR_HOME", str(tmp_path / "home"))
    for name in ("COINYEAR_PAYLOAD_TABLE", "COINYEAR_LOOP_VOLUME"):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    assert main(["ingest-payloads"]) == 2
    assert "COINYEAR_PAYLOAD_TABLE" in capsys.readouterr().err
    (tmp_path / "volume" / "feedback").mkdir(parents=True)
    (tmp_path / "volume" / "feedback" / "bad.json").write_text("[1, 2]")
    monkeypatch.setenv("COINYEAR_LOOP_VOLUME", str(tmp_path / "volume"))
    get_settings.cache_clear()
    try:
        assert main(["ingest-payloads", "--json"]) == 0
    finally:
        get_settings.cache_clear()
    report = json.loads(capsys.readouterr().out)
    assert report["feedback_rejected"] == {"bad.json": "not a feedback row: not a JSON object"}
    assert (tmp_path / "volume" / "feedback" / "rejected" / "bad.json").is_file()
