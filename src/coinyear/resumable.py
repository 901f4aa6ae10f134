"""Collection scoring's output, resumable: a CSV or a folder of Parquet part files, appended chunk by chunk.

Each chunk is complete on disk (fsync'ed; a Parquet part renamed into place) before the next is written, so a
killed run leaves at most a partial last CSV line or an unrenamed part, both dropped when the next run reads
what is `done()` and skips those coins (`coinyear.predict.predict_collection`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)


class CsvOutput:
    """Appends chunks to a CSV, each flushed and fsync'ed. A kill can leave only a partial last line, which
    the next run cuts off; line breaks inside values are written as spaces so that a row is always one line."""

    def __init__(self, path: Path):
        self.path = path

    def done(self) -> pd.DataFrame | None:
        """The rows already written (a partial last line cut off first); None when there are none."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return None
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            log.warning("%s ends in a partial row (an interrupted run): cut off, that coin is scored again",
                        self.path)
            with open(self.path, "r+b") as handle:
                handle.truncate(complete)
                os.fsync(handle.fileno())
        if complete == 0:
            return None
        return pd.read_csv(self.path, dtype={"coin_id": str}, keep_default_na=False, na_values=[""])

    def append(self, frame: pd.DataFrame) -> None:
        """Append one chunk and fsync it (the header only into an empty file)."""
        header = not self.path.exists() or self.path.stat().st_size == 0
        frame = frame.replace(to_replace=r"[\r\n]+", value=" ", regex=True)
        text = frame.to_csv(index=False, header=header, lineterminator="\n")
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())


class ParquetOutput:
    """A folder of `part-NNNNN.parquet` files, each written under a temporary name and renamed when complete."""

    def __init__(self, path: Path):
        self.path = path

    def _parts(self) -> list[Path]:
        return sorted(self.path.glob("part-*.parquet"))

    def done(self) -> pd.DataFrame | None:
        """The rows of every complete part (interrupted ones deleted first); None when there are none."""
        for stale in self.path.glob(".part-*.tmp"):  # a chunk a kill interrupted: never renamed, so never read
            stale.unlink()
        parts = self._parts()
        return pd.concat([pd.read_parquet(part) for part in parts], ignore_index=True) if parts else None

    def append(self, frame: pd.DataFrame) -> None:
        """Write one chunk as the next part: under a temporary name, fsync'ed, then renamed into place."""
        self.path.mkdir(parents=True, exist_ok=True)
        parts = self._parts()
        number = int(parts[-1].stem.split("-")[1]) + 1 if parts else 0
        temporary = self.path / f".part-{number:05d}.tmp"
        frame.to_parquet(temporary, index=False)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, self.path / f"part-{number:05d}.parquet")


def open_output(path: str | Path):
    """CSV for `*.csv`, a Parquet part folder for `*.parquet` (or an existing folder)."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return CsvOutput(path)
    if path.suffix.lower() == ".parquet" or path.is_dir():
        return ParquetOutput(path)
    raise ValueError(f"--out must end in .csv or .parquet, got {path}")
