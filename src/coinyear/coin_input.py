"""A scoring row as the model's signature names it: two base64 photo columns, their decoding and its error.

Everything that reads a request before the network does (the pyfunc, the gateway's request checks, the
Databricks forwarding gateway, payload ingestion) decodes with these, so a photo is accepted or refused the same
way everywhere, and none of them needs torch to do it.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from coinyear.data import ImageError, preprocess

FRONT, BACK = "front_image_base64", "back_image_base64"


class InvalidCoinInput(MlflowException):
    """A row that cannot be scored: MLflow's scoring server and ours turn it into a 400."""

    def __init__(self, message: str, row: int | None = None):
        where = f"row {row}: " if row is not None else ""
        super().__init__(where + message, error_code=INVALID_PARAMETER_VALUE)
        self.row = row


def decode_base64(value, row: int | None, column: str) -> bytes:
    """The bytes of one photo column (a data URL's payload too); InvalidCoinInput when it is not base64."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidCoinInput(f"{column} must be a non-empty base64 string", row)
    text = value.strip()
    if text.startswith("data:") and "," in text:  # browsers send data URLs
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidCoinInput(f"{column} is not valid base64 ({error})", row) from error


def decode_pair(front: bytes, back: bytes, size: int, grayscale: bool, row: int | None = None):
    """Both sides preprocessed exactly as in training; InvalidCoinInput names the bad side."""
    arrays = []
    for side, data in (("front", front), ("back", back)):
        try:
            arrays.append(preprocess(data, side, size, grayscale))
        except ImageError as error:
            raise InvalidCoinInput(f"{side} image: {error}", row) from error
    return arrays


def encode_file(path: str | Path) -> str:
    """A photo file as the base64 text a scoring row carries."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")
