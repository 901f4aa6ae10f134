"""Gateway pieces without a server: when auth may be off, token checks, and the wire formats' edge cases."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from coinyear.config import Settings
from coinyear.serve.auth import BearerAuth, is_loopback
from coinyear.serve.errors import ApiError
from coinyear.serve.wire import parse_body, prepare_rows
from tests.conftest import coin_image


class FakeRequest:
    def __init__(self, authorization: str | None = None):
        self.headers = {"authorization": authorization} if authorization is not None else {}


def test_auth_can_be_off_only_on_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.org")
    BearerAuth(Settings(api_tokens=[]), "127.0.0.1").check(FakeRequest())  # local-dev mode: open
    for settings in (Settings(api_tokens=[]), Settings(api_tokens=["t"], auth_disabled=True)):
        with pytest.raises(RuntimeError, match="refusing"):
            BearerAuth(settings, "0.0.0.0")


def test_any_configured_token_is_accepted_and_nothing_else():
    auth = BearerAuth(Settings(api_tokens="old-token, new-token"), "0.0.0.0")
    for token in ("old-token", "new-token"):
        auth.check(FakeRequest(f"Bearer {token}"))
        auth.check(FakeRequest(f"bearer {token}"))
    for header, status in ((None, 401), ("", 401), ("Bearer ", 401), ("Basic old-token", 401),
                           ("Bearer old-toke", 403), ("Bearer old-token-x", 403), ("Bearer new-token old", 403)):
        with pytest.raises(ApiError) as error:
            auth.check(FakeRequest(header))
        assert error.value.status == status, header


ROW = {"front_image_base64": "f", "back_image_base64": "b"}


@pytest.mark.parametrize("body, rows", [
    ({"inputs": [ROW, ROW]}, 2),
    ({"instances": [ROW]}, 1),
    ({"inputs": {"front_image_base64": ["f", "f"], "back_image_base64": ["b", "b"]}}, 2),
    ({"inputs": {"front_image_base64": "f", "back_image_base64": "b"}}, 1),  # one row as scalars
    ({"dataframe_split": {"index": [0], "columns": ["back_image_base64", "front_image_base64"], "data": [["b", "f"]]}},
     1),
    ({"dataframe_records": [ROW], "params": {"batch_size": 8, "other": 1}, "client_request_id": "c-1"}, 1),
])
def test_every_format_gives_front_back_rows(body, rows):
    import json

    parsed = parse_body(json.dumps(body).encode(), max_rows=64)
    assert parsed.rows == [("f", "b")] * rows


def test_rows_are_decoded_as_in_training_and_bad_sides_are_dropped_from_the_log():
    good = coin_image(1)
    buffer = io.BytesIO()
    Image.new("L", (40, 40)).save(buffer, "PNG")
    rows = prepare_rows([(base64.b64encode(good).decode(), "data:image/png;base64," +
                          base64.b64encode(buffer.getvalue()).decode()),
                         ("!!", base64.b64encode(b"plain text").decode())], image_size=32, grayscale=True)
    assert rows[0].error is None and rows[0].arrays[0].shape == (1, 32, 32) and rows[0].front == good
    assert rows[1].error.startswith("row 1: front_image_base64 is not valid base64")
    assert rows[1].front is None and rows[1].back is None and rows[1].back_size == len(b"plain text")
