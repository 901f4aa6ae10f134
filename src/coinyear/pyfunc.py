"""The MLflow model: a pair of base64 photos in, the year out.

The logged model is an MLflow pyfunc, so anything that serves MLflow models serves it unchanged:
our gateway, `mlflow models serve -m models:/coinyear@production`, or Databricks Model Serving. Input rows
have two string columns, `front_image_base64` and `back_image_base64`; the output is one year per row.

With the inference parameter `interval` (a coverage level such as 0.9, sent as `{"params": {"interval": 0.9}}`)
each row's answer is instead `{"year", "low", "high", "out_of_distribution"}`: the conformal range that holds
the true year for that share of coins like the training coins, and whether the photos look unlike any
training coin (then the range and year deserve little trust).
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
CONFORMAL, OOD = "conformal", "ood"

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", FRONT), ColSpec("string", BACK)]),
    outputs=Schema([ColSpec("double")]),
    params=ParamSchema([ParamSpec("batch_size", "long", 32),
                        # 0 = plain years; a level in (0, 1) = year, conformal range and OOD flag per row
                        ParamSpec("interval", "double", 0.0)]),
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
        self.quality = None
        if CONFORMAL in context.artifacts and OOD in context.artifacts:  # models logged before have neither
            from coinyear.quality import Quality

            self.quality = Quality.load(context.artifacts[CONFORMAL], context.artifacts[OOD])

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

    def predict_intervals(self, fronts: torch.Tensor, backs: torch.Tensor, level: float,
                          batch_size: int = 32) -> pd.DataFrame:
        """Year, conformal range at `level` and out-of-distribution flag per coin."""
        from coinyear.model import infer

        if self.quality is None:
            raise InvalidCoinInput("this model version was logged without interval calibration; "
                                   "call it without the `interval` parameter")
        parts = [infer(self.model, fronts[start:start + batch_size], backs[start:start + batch_size], True)
                 for start in range(0, len(fronts), batch_size)]
        year, spread, features = (torch.cat([p[key] for p in parts]).numpy().astype(float)
                                  for key in ("year", "spread", "features"))
        low, high = self.quality.conformal.interval(year, level, spread)
        return pd.DataFrame({"year": year, "low": low, "high": high,
                             "out_of_distribution": self.quality.ood.flag(features)})

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        params = params or {}
        batch_size = max(int(params.get("batch_size") or 32), 1)
        level = _interval_level(params.get("interval"))
        if len(model_input) == 0:
            return pd.DataFrame(columns=["year", "low", "high", "out_of_distribution"]) if level else np.zeros(0)
        fronts, backs = self.tensors(model_input)
        if level:
            return self.predict_intervals(fronts, backs, level, batch_size)
        return self.predict_tensors(fronts, backs, batch_size)


def _interval_level(value) -> float:
    """0.0 (no interval) or a coverage level strictly between 0 and 1."""
    try:
        level = float(value or 0.0)
    except (TypeError, ValueError) as error:
        raise InvalidCoinInput(f"interval must be a number between 0 and 1, got {value!r}") from error
    if level == 0:
        return 0.0
    if not 0 < level < 1:
        raise InvalidCoinInput(f"interval must be between 0 and 1 (e.g. 0.9), got {level}")
    return level


def encode_file(path: str | Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def input_example(rows: pd.DataFrame) -> pd.DataFrame:
    """A real coin from the training data as the logged input example."""
    first = rows.iloc[0]
    return pd.DataFrame({FRONT: [encode_file(first["obverse_path"])], BACK: [encode_file(first["reverse_path"])]})


def log_model(checkpoint: Path, example: pd.DataFrame, registered_model_name: str | None = None,
              quality: dict[str, str] | None = None):
    """Log the pyfunc (signature + input example) in the active run; register it when a name is given.

    `quality` holds the interval calibration and OOD files (`Quality.save`), which enable `interval`.
    """
    import coinyear

    return mlflow.pyfunc.log_model(
        name="model",
        python_model=CoinYearModel(),
        artifacts={CHECKPOINT: str(checkpoint), **(quality or {})},
        signature=SIGNATURE,
        input_example=example,
        registered_model_name=registered_model_name,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "torchvision", "timm", "pillow",
                          f"coinyear=={coinyear.__version__}"],
    )
