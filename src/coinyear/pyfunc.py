"""The MLflow model: a pair of base64 photos in, the year out.

The logged model is an MLflow pyfunc, so anything that serves MLflow models serves it unchanged:
our gateway, `mlflow models serve -m models:/coinyear@production`, or Databricks Model Serving. Input rows
have two string columns, `front_image_base64` and `back_image_base64`; the output is one year per row.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from coinyear.data import ImageError, preprocess

FRONT, BACK = "front_image_base64", "back_image_base64"
CHECKPOINT = "checkpoint"

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", FRONT), ColSpec("string", BACK)]),
    outputs=Schema([ColSpec("double")]),
    params=ParamSchema([ParamSpec("batch_size", "long", 32)]),
)


class InvalidCoinInput(MlflowException):
    """A row that cannot be scored: MLflow's scoring server and ours turn it into a 400."""

    def __init__(self, message: str, row: int | None = None):
        where = f"row {row}: " if row is not None else ""
        super().__init__(where + message, error_code=INVALID_PARAMETER_VALUE)
        self.row = row


def decode_base64(value, row: int | None, column: str) -> bytes:
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


class CoinYearModel(mlflow.pyfunc.PythonModel):
    """Wraps a `DualImageRegressor` checkpoint."""

    def load_context(self, context) -> None:
        from coinyear.model import load_checkpoint

        self.model = load_checkpoint(context.artifacts[CHECKPOINT])
        self.size = self.model.config.image_size
        self.grayscale = self.model.config.grayscale

    def tensors(self, model_input: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [column for column in (FRONT, BACK) if column not in model_input.columns]
        if missing:
            raise InvalidCoinInput(f"missing column(s): {', '.join(missing)}")
        fronts, backs = [], []
        for row, (front, back) in enumerate(zip(model_input[FRONT], model_input[BACK])):
            front_array, back_array = decode_pair(decode_base64(front, row, FRONT), decode_base64(back, row, BACK),
                                                  self.size, self.grayscale, row)
            fronts.append(front_array)
            backs.append(back_array)
        return (torch.from_numpy(np.stack(fronts)).float() / 255, torch.from_numpy(np.stack(backs)).float() / 255)

    def predict_tensors(self, fronts: torch.Tensor, backs: torch.Tensor, batch_size: int = 32) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for start in range(0, len(fronts), batch_size):
                out.append(self.model(fronts[start:start + batch_size], backs[start:start + batch_size]).numpy())
        return np.concatenate(out).astype(float)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        if len(model_input) == 0:
            return np.zeros(0)
        batch_size = int((params or {}).get("batch_size") or 32)
        fronts, backs = self.tensors(model_input)
        return self.predict_tensors(fronts, backs, max(batch_size, 1))


def encode_file(path: str | Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def input_example(rows: pd.DataFrame) -> pd.DataFrame:
    """A real coin from the training data as the logged input example."""
    first = rows.iloc[0]
    return pd.DataFrame({FRONT: [encode_file(first["obverse_path"])], BACK: [encode_file(first["reverse_path"])]})


def log_model(checkpoint: Path, example: pd.DataFrame, registered_model_name: str | None = None):
    """Log the pyfunc (signature + input example) in the active run; register it when a name is given."""
    import coinyear

    return mlflow.pyfunc.log_model(
        name="model",
        python_model=CoinYearModel(),
        artifacts={CHECKPOINT: str(checkpoint)},
        signature=SIGNATURE,
        input_example=example,
        registered_model_name=registered_model_name,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "torchvision", "timm", "pillow",
                          f"coinyear=={coinyear.__version__}"],
    )
