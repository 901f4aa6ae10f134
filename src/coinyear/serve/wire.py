"""The scoring wire format (MLflow scoring server / Databricks Model Serving) in, coin rows out.

Accepted bodies, each with the columns `front_image_base64` and `back_image_base64`:
    {"inputs": [{"front_image_base64": ..., "back_image_base64": ...}, ...]}      (or "instances")
    {"inputs": {"front_image_base64": [...], "back_image_base64": [...]}}         (columns)
    {"dataframe_records": [{...}, ...]}
    {"dataframe_split": {"columns": [...], "data": [[...], ...], "index": [...]}}
plus optional "params" and "client_request_id" (a string kept in the inference log). Other top-level keys
are ignored, as MLflow does. Params: `batch_size` (accepted for compatibility: the server batches by itself),
`interval` (a coverage level in (0, 1): each prediction becomes {year, low, high, out_of_distribution}) and
`neighbours` (k in 0..20: each prediction becomes an object with the k nearest training coins, `neighbours`)
and `portraits` (k in 0..5: each prediction becomes an object with the k likeliest portraits, `portraits`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from coinyear.coin_input import BACK, FRONT, InvalidCoinInput, decode_base64
from coinyear.data import ImageError, preprocess
from coinyear.params import ScoringParams, parse_params
from coinyear.serve.errors import BAD_REQUEST, INVALID_PARAMETER_VALUE

FORMATS = ("inputs", "instances", "dataframe_records", "dataframe_split")
MAX_CLIENT_REQUEST_ID = 128


@dataclass
class ParsedRequest:
    rows: list[tuple[object, object]] = field(default_factory=list)  # (front, back) raw JSON values
    input_format: str | None = None
    params: dict = field(default_factory=dict)
    client_request_id: str | None = None
    asked: ScoringParams = field(default_factory=ScoringParams)  # interval, neighbours, portraits: 0 = none


@dataclass
class PreparedRow:
    """One row decoded as far as it could be: photo bytes for the log, model arrays when readable."""

    front: bytes | None = None
    back: bytes | None = None
    front_size: int | None = None
    back_size: int | None = None
    arrays: tuple | None = None
    error: str | None = None


class InvalidRequest(ValueError):
    """A body that is not a well-formed scoring request, with its MLflow error code: the gateway answers it with a
    400, payload ingestion logs why a logged request could not be read."""

    def __init__(self, message: str, error_code: str = BAD_REQUEST):
        super().__init__(message)
        self.error_code, self.message = error_code, message


def bad(message: str, code: str = BAD_REQUEST) -> InvalidRequest:
    return InvalidRequest(message, code)


def _records(value, where: str) -> list[tuple[object, object]]:
    if isinstance(value, dict):  # column-oriented: {"col": [values]}
        columns = {k: (v if isinstance(v, list) else [v]) for k, v in value.items()}
        missing = [c for c in (FRONT, BACK) if c not in columns]
        if missing:
            raise bad(f"{where}: missing column(s): {', '.join(missing)}", INVALID_PARAMETER_VALUE)
        if len(columns[FRONT]) != len(columns[BACK]):
            raise bad(f"{where}: columns {FRONT} and {BACK} have different lengths", INVALID_PARAMETER_VALUE)
        return list(zip(columns[FRONT], columns[BACK]))
    if not isinstance(value, list):
        raise bad(f"{where} must be a list of records or an object of columns, not {type(value).__name__}")
    rows = []
    for index, record in enumerate(value):
        if not isinstance(record, dict):
            raise bad(f"{where}[{index}] must be an object with {FRONT} and {BACK}, not {type(record).__name__}")
        missing = [c for c in (FRONT, BACK) if c not in record]
        if missing:
            raise bad(f"row {index}: missing column(s): {', '.join(missing)}", INVALID_PARAMETER_VALUE)
        rows.append((record[FRONT], record[BACK]))
    return rows


def _split(value) -> list[tuple[object, object]]:
    if not isinstance(value, dict) or not isinstance(value.get("columns"), list) \
            or not isinstance(value.get("data"), list):
        raise bad("dataframe_split must be an object with 'columns' (list) and 'data' (list of rows)")
    columns = value["columns"]
    missing = [c for c in (FRONT, BACK) if c not in columns]
    if missing:
        raise bad(f"dataframe_split: missing column(s): {', '.join(missing)}", INVALID_PARAMETER_VALUE)
    front_at, back_at = columns.index(FRONT), columns.index(BACK)
    rows = []
    for index, row in enumerate(value["data"]):
        if not isinstance(row, list) or len(row) != len(columns):
            raise bad(f"dataframe_split: data[{index}] must be a list of {len(columns)} values")
        rows.append((row[front_at], row[back_at]))
    return rows


def _encodable(text: str) -> bool:
    """False for JSON strings with lone surrogates (`"\\ud800"`): valid JSON, but no UTF-8 column can hold them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def json_object(body: bytes) -> dict:
    """A request body as the JSON object every scoring format is; InvalidRequest when it is not one (both
    backends read it so, the forwarding one before it passes the rest to the endpoint)."""
    try:
        payload = json.loads(body.decode("utf-8"))  # what the Content-Type says (json.loads would guess UTF-16)
    except (ValueError, RecursionError) as error:  # also numbers of over 4300 digits and nesting past the stack
        raise bad(f"Invalid input. Ensure that input is a valid JSON formatted string: "
                  f"{type(error).__name__}: {str(error)[:200]}") from error
    if not isinstance(payload, dict):
        raise bad(f"The input must be a JSON object with exactly one of the fields {list(FORMATS)}, "
                  f"not a {type(payload).__name__}")
    return payload


def parse_body(body: bytes, max_rows: int) -> ParsedRequest:
    """Body bytes to rows; InvalidRequest for anything that is not a well-formed scoring request."""
    payload = json_object(body)
    present = [key for key in FORMATS if key in payload]
    if len(present) != 1:
        raise bad(f"The input must be a JSON object with exactly one of the fields {list(FORMATS)}; "
                  f"got fields {sorted(payload)}")
    input_format = present[0]
    value = payload[input_format]
    rows = _split(value) if input_format == "dataframe_split" else _records(value, input_format)
    if not rows:
        raise bad("the request has no rows", INVALID_PARAMETER_VALUE)
    if len(rows) > max_rows:
        raise bad(f"{len(rows)} rows in one request; at most {max_rows} are accepted", INVALID_PARAMETER_VALUE)
    params = payload.get("params") or {}
    if not isinstance(params, dict):
        raise bad("params must be a JSON object", INVALID_PARAMETER_VALUE)
    batch_size = params.get("batch_size")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise bad("params.batch_size must be a positive integer", INVALID_PARAMETER_VALUE)
    try:
        asked = parse_params(params)  # the packaged model's parser too (coinyear.params)
    except ValueError as error:
        raise bad(f"params.{error}", INVALID_PARAMETER_VALUE) from error
    client_request_id = payload.get("client_request_id")
    if client_request_id is not None and (not isinstance(client_request_id, str)
                                          or len(client_request_id) > MAX_CLIENT_REQUEST_ID
                                          or not _encodable(client_request_id)):
        raise bad(f"client_request_id must be a string of at most {MAX_CLIENT_REQUEST_ID} characters",
                  INVALID_PARAMETER_VALUE)
    return ParsedRequest(rows, input_format, params, client_request_id, asked)


class Abandoned(Exception):
    """The request's deadline passed while its photos were being decoded: nobody waits for them any more."""


def prepare_rows(rows: list[tuple[object, object]], image_size: int | None, grayscale: bool,
                 abandoned: Callable[[], bool] | None = None) -> list[PreparedRow]:
    """Decode every row's photos (base64, then the training preprocessing when a model size is known).

    Every row is decoded even after a bad one, so the log keeps what each row carried; a side that is not
    valid base64 or not a readable image is kept out of the log (None). `abandoned` is asked before each
    photo: once it says True, decoding stops with `Abandoned` (a thread cannot be cancelled from outside).
    """
    prepared = []
    for index, (front_value, back_value) in enumerate(rows):
        row = PreparedRow()
        decoded: dict[str, bytes | None] = {}
        for side, column, value in (("front", FRONT, front_value), ("back", BACK, back_value)):
            try:
                decoded[side] = decode_base64(value, index, column)
            except InvalidCoinInput as error:
                row.error = row.error or error.message
                decoded[side] = None
        row.front_size = len(decoded["front"]) if decoded["front"] is not None else None
        row.back_size = len(decoded["back"]) if decoded["back"] is not None else None
        arrays = {}
        for side in ("front", "back"):
            data = decoded[side]
            if data is None or image_size is None:
                continue
            if abandoned is not None and abandoned():
                raise Abandoned(f"abandoned at row {index}, {side}")
            try:
                arrays[side] = preprocess(data, side, image_size, grayscale)
            except ImageError as error:
                row.error = row.error or f"row {index}: {side} image: {error}"
                decoded[side] = None
        row.front, row.back = decoded["front"], decoded["back"]
        if len(arrays) == 2:
            row.arrays = (arrays["front"], arrays["back"])
        prepared.append(row)
    return prepared
