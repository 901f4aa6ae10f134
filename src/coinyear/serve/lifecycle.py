"""Model lifecycle: always serve what `models:/<name>@production` points to, swapping with no failed request.

A watcher thread polls the alias every `alias_poll_seconds`. When it points to a new version, that version is
downloaded, loaded and warmed in the background, then answers a smoke request (the model's own logged input
example, through the same decoding path as live requests). Only a model that passes becomes `current`, in one
reference assignment; requests hold the model they started with, so in-flight requests finish on it. A
version that fails to load or to answer is not swapped in: the old one keeps serving, the failure is reported
in /version and /metrics, and that version is tried again only after `RETRY_SECONDS` (a failure may be
passing: an artifact store briefly down), or at once when the alias moves to another version.

A registry that errors or hangs never stops serving: the current model keeps answering and /version's `watch`
says the alias watch is degraded (failing polls in a row, or a poll that has not come back for a while).
Each version is downloaded into a folder of this process under COINYEAR_HOME/serving, deleted when that
version stops being served or fails to load (and left-overs of dead processes at start).
"""

from __future__ import annotations

import base64
import io
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
import torch

from coinyear import registry
from coinyear.config import Settings, configure_mlflow
from coinyear.pyfunc import BACK, FRONT, CoinYearModel, pair_tensors
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
    model_dir: Path | None = None  # the downloaded artifacts, deleted once this version is no longer served

    @property
    def image_size(self) -> int:
        return self.python_model.size

    @property
    def grayscale(self) -> bool:
        return self.python_model.grayscale

    @property
    def has_intervals(self) -> bool:
        return getattr(self.python_model, "quality", None) is not None

    @property
    def has_portraits(self) -> bool:
        return bool(getattr(self.python_model, "portraits", None))

    def score(self, fronts: torch.Tensor, backs: torch.Tensor) -> dict[str, np.ndarray]:
        """One scoring pass (`CoinYearModel.score_tensors`): with the OOD features (and portrait probabilities)
        whenever the version can give intervals or portraits, so plain and other requests share a batch."""
        return self.python_model.score_tensors(fronts, backs, self.has_intervals or self.has_portraits,
                                               max(len(fronts), 1))

    def forward(self, fronts: torch.Tensor, backs: torch.Tensor) -> np.ndarray:
        return self.score(fronts, backs)["year"]


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
        # MLflow annotates the example as str | None; a pyfunc's logged example loads as a DataFrame
        example = cast(pd.DataFrame, Model.load(model_dir).load_input_example(model_dir))
        return str(example.iloc[0][FRONT]), str(example.iloc[0][BACK])
    except Exception as error:  # noqa: BLE001 - any unreadable example only means the drawn coin is used
        log.info("no usable input example in %s (%s): smoke test with a drawn coin", model_dir, error)
        photo = _synthetic_photo()
        return photo, photo


def downloads_dir(settings: Settings) -> Path:
    """This process's folder of downloaded versions (per process: two gateways may share a home)."""
    return settings.home_dir / "serving" / str(os.getpid())


def clear_stale_downloads(settings: Settings) -> None:
    """Delete the download folders of gateway processes that no longer run (a kill -9 leaves them behind)."""
    root = settings.home_dir / "serving"
    for folder in root.glob("*") if root.is_dir() else []:
        if folder.name.isdigit() and int(folder.name) != os.getpid() and not _running(int(folder.name)):
            shutil.rmtree(folder, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_version(settings: Settings, version: str, warm_batch: int) -> ServedModel:
    """Download, load, smoke-test and warm one registered version; raises when it cannot serve (and then
    deletes what it downloaded)."""
    import mlflow

    configure_mlflow(settings)
    uri = registry.model_uri(settings, version)
    target = downloads_dir(settings) / f"v{version}-{time.monotonic_ns()}"
    target.mkdir(parents=True)
    try:
        return _load(settings, version, uri, Path(mlflow.artifacts.download_artifacts(artifact_uri=uri,
                                                                                      dst_path=str(target))),
                     target, warm_batch)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise


def _load(settings: Settings, version: str, uri: str, model_dir: Path, target: Path, warm_batch: int) -> ServedModel:
    import mlflow

    python_model = mlflow.pyfunc.load_model(str(model_dir)).unwrap_python_model()
    if not isinstance(python_model, CoinYearModel):
        raise TypeError(f"{uri} is a {type(python_model).__name__}, not a CoinYearModel")
    served = ServedModel(settings.model_name, str(version), uri, python_model, model_dir=target)
    row = prepare_rows([smoke_row(str(model_dir))], served.image_size, served.grayscale)[0]
    if row.arrays is None:
        raise ValueError(f"smoke request rejected: {row.error}")
    fronts, backs = pair_tensors([row.arrays])
    scored = served.score(fronts, backs)  # the pass live requests take, features and all
    years = scored["year"]
    if years.shape != (1,) or not math.isfinite(float(years[0])):
        raise ValueError(f"smoke request answered {years!r}, not one finite year")
    if served.has_intervals:
        served.python_model.answers(scored, 0.9)
    # warm the allocator and kernels at the largest batch the batcher will send
    served.score(fronts.expand(warm_batch, -1, -1, -1), backs.expand(warm_batch, -1, -1, -1))
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
        self.poll_failures = 0  # alias reads that failed in a row
        self.poll_started: float | None = None  # monotonic start of the alias read under way
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        clear_stale_downloads(self.settings)
        self._thread = threading.Thread(target=self._watch, name="alias-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        current = self.current
        if current is not None and current.model_dir is not None:
            shutil.rmtree(current.model_dir, ignore_errors=True)

    def _read_alias(self) -> str | None:
        self.poll_started = time.monotonic()
        try:
            return registry.version_by_alias(self.settings, self.alias)
        finally:
            self.poll_started = None

    def check(self) -> None:
        """One poll: load and swap in the alias's version when it changed (and did not fail before)."""
        try:
            version = self._read_alias()
        except Exception as error:  # noqa: BLE001 - registry unreachable: keep serving, try again next poll
            self.poll_failures += 1
            self.last_error = f"cannot read alias {self.alias}: {error}"
            log.warning(self.last_error)
            return
        self.poll_failures = 0
        self.last_check = datetime.now(UTC)
        self.target_version = version
        current = self.current
        if version is None or (current is not None and current.version == version):
            if self.last_error and self.last_error.startswith("cannot read alias"):
                self.last_error = None
            return
        if version in self.failed and time.monotonic() - self.failed[version][1] < RETRY_SECONDS:
            return
        log.info("loading %s version %s (%s)", self.settings.model_name, version, self.alias)
        started = time.monotonic()
        try:
            candidate = load_version(self.settings, version, self.settings.batch_max_size)
        except Exception as error:  # noqa: BLE001 - a version that fails to load is recorded; the current one serves
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
        if current is not None and current.model_dir is not None:
            # in-flight requests on the old version hold it in memory; its files are no longer read
            shutil.rmtree(current.model_dir, ignore_errors=True)
        if self.on_swap:
            self.on_swap(candidate)

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except Exception:  # a bug in one poll must not end the watch: the next poll tries again
                log.exception("alias watch poll failed")
            self._stop.wait(self.settings.alias_poll_seconds)

    def watch_status(self) -> dict:
        """Is the alias watch keeping up? Degraded when polls fail in a row or one has not come back for
        longer than a few poll periods (a hanging registry)."""
        started = self.poll_started
        hanging = time.monotonic() - started if started is not None else 0.0
        stalled = hanging > max(3 * self.settings.alias_poll_seconds, 5.0)
        return {"healthy": self.poll_failures == 0 and not stalled, "failed_polls_in_a_row": self.poll_failures,
                "poll_running_seconds": round(hanging, 1)}

    def status(self) -> dict:
        current = self.current
        return {
            "model_name": self.settings.model_name,
            "alias": self.alias,
            "model_version": current.version if current else None,
            "model_uri": current.uri if current else None,
            "loaded_at": current.loaded_at.isoformat() if current else None,
            # what the served model was trained on (years, portraits); {} for a model logged before spans
            "span": getattr(current.python_model, "span", {}) if current else None,
            "alias_version": self.target_version,
            "last_check": self.last_check.isoformat() if self.last_check else None,
            "last_error": self.last_error,
            "rejected_versions": {version: reason for version, (reason, _) in self.failed.items()},
            "watch": self.watch_status(),
        }
