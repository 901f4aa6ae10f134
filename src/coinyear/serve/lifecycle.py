"""Model lifecycle: always serve what `models:/<name>@production` points to, swapping with no failed request.

A watcher thread polls the alias every `alias_poll_seconds`. When it points to a new version, that version is
downloaded, loaded and warmed in the background, then answers a smoke request (the model's own logged input
example, through the same decoding path as live requests). Only a model that passes becomes `current`, in one
reference assignment; requests hold the model they started with, so in-flight requests finish on it. A
version that fails to load or to answer is not swapped in: the old one keeps serving, the failure is reported
in /version and /metrics, and that version is tried again only after `RETRY_SECONDS` (a failure may be
passing: an artifact store briefly down), or at once when the alias moves to another version.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import torch

from coinyear import registry
from coinyear.config import Settings, configure_mlflow
from coinyear.pyfunc import BACK, FRONT, CoinYearModel
from coinyear.serve.wire import prepare_rows

log = logging.getLogger(__name__)

RETRY_SECONDS = 60.0


@dataclass(eq=False)
class ServedModel:
    """One loaded model version; immutable once serving."""

    name: str
    version: str
    uri: str
    python_model: CoinYearModel = field(repr=False)
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def image_size(self) -> int:
        return self.python_model.size

    @property
    def grayscale(self) -> bool:
        return self.python_model.grayscale

    def forward(self, fronts: torch.Tensor, backs: torch.Tensor) -> np.ndarray:
        return self.python_model.predict_tensors(fronts, backs, batch_size=max(len(fronts), 1))


def to_tensors(arrays: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    fronts = torch.from_numpy(np.stack([front for front, _ in arrays])).float() / 255
    backs = torch.from_numpy(np.stack([back for _, back in arrays])).float() / 255
    return fronts, backs


def _synthetic_photo() -> str:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (96, 96), (40, 40, 40))
    ImageDraw.Draw(image).ellipse((6, 6, 90, 90), fill=(180, 150, 90))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def smoke_row(model_dir: str) -> tuple[str, str]:
    """The model's logged input example (a real coin) as base64, or a drawn disc when it has none."""
    from mlflow.models import Model

    try:
        example = Model.load(model_dir).load_input_example(model_dir)
        return str(example.iloc[0][FRONT]), str(example.iloc[0][BACK])
    except Exception as error:
        log.info("no usable input example in %s (%s): smoke test with a drawn coin", model_dir, error)
        photo = _synthetic_photo()
        return photo, photo


def load_version(settings: Settings, version: str, warm_batch: int) -> ServedModel:
    """Download, load, smoke-test and warm one registered version; raises when it cannot serve."""
    import mlflow

    configure_mlflow(settings)
    uri = registry.model_uri(settings, version)
    model_dir = mlflow.artifacts.download_artifacts(artifact_uri=uri)
    python_model = mlflow.pyfunc.load_model(model_dir).unwrap_python_model()
    if not isinstance(python_model, CoinYearModel):
        raise TypeError(f"{uri} is a {type(python_model).__name__}, not a CoinYearModel")
    served = ServedModel(settings.model_name, str(version), uri, python_model)
    row = prepare_rows([smoke_row(model_dir)], served.image_size, served.grayscale)[0]
    if row.arrays is None:
        raise ValueError(f"smoke request rejected: {row.error}")
    fronts, backs = to_tensors([row.arrays])
    years = served.forward(fronts, backs)
    if years.shape != (1,) or not math.isfinite(float(years[0])):
        raise ValueError(f"smoke request answered {years!r}, not one finite year")
    # warm the allocator and kernels at the largest batch the batcher will send
    served.forward(fronts.expand(warm_batch, -1, -1, -1), backs.expand(warm_batch, -1, -1, -1))
    served.loaded_at = datetime.now(UTC)
    return served


class ModelManager:
    """Holds the serving model and keeps it in step with the production alias."""

    def __init__(self, settings: Settings, alias: str = registry.PRODUCTION,
                 on_swap: Callable[[ServedModel], None] | None = None,
                 on_failure: Callable[[str, str], None] | None = None):
        self.settings, self.alias = settings, alias
        self.on_swap, self.on_failure = on_swap, on_failure
        self.current: ServedModel | None = None
        self.target_version: str | None = None
        self.failed: dict[str, tuple[str, float]] = {}  # version -> (why it was not swapped in, when)
        self.last_error: str | None = None
        self.last_check: datetime | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="alias-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def check(self) -> None:
        """One poll: load and swap in the alias's version when it changed (and did not fail before)."""
        try:
            version = registry.version_by_alias(self.settings, self.alias)
        except Exception as error:  # registry briefly unreachable: keep serving, try again next poll
            self.last_error = f"cannot read alias {self.alias}: {error}"
            log.warning(self.last_error)
            return
        self.last_check = datetime.now(UTC)
        self.target_version = version
        current = self.current
        if version is None or (current is not None and current.version == version):
            return
        if version in self.failed and time.monotonic() - self.failed[version][1] < RETRY_SECONDS:
            return
        log.info("loading %s version %s (%s)", self.settings.model_name, version, self.alias)
        started = time.monotonic()
        try:
            candidate = load_version(self.settings, version, self.settings.batch_max_size)
        except Exception as error:
            reason = f"{type(error).__name__}: {error}"
            self.failed[version] = (reason, time.monotonic())
            self.last_error = f"version {version} not swapped in: {reason}"
            log.error("%s; still serving %s", self.last_error, current.version if current else "nothing")
            if self.on_failure:
                self.on_failure(version, reason)
            return
        self.current = candidate  # the swap: one reference assignment, atomic for every reader
        self.failed.pop(version, None)
        self.last_error = None
        log.info("now serving %s version %s (loaded in %.1fs)", candidate.name, version, time.monotonic() - started)
        if self.on_swap:
            self.on_swap(candidate)

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.check()
            self._stop.wait(self.settings.alias_poll_seconds)

    def status(self) -> dict:
        current = self.current
        return {
            "model_name": self.settings.model_name,
            "alias": self.alias,
            "model_version": current.version if current else None,
            "model_uri": current.uri if current else None,
            "loaded_at": current.loaded_at.isoformat() if current else None,
            "alias_version": self.target_version,
            "last_check": self.last_check.isoformat() if self.last_check else None,
            "last_error": self.last_error,
            "rejected_versions": {version: reason for version, (reason, _) in self.failed.items()},
        }
