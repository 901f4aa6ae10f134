"""Evidence stage: the reference coins that look most like a request's coin, with their catalogue dates.

A date is easier to trust when it comes with the coins that support it. The logged model carries one table,
`neighbours.parquet`, with a row per training coin in the order of the OOD detector's reference rows
(`quality.FeatureDistance.reference`): its catalogue fields and a small JPEG of each side. An answer asked for
`neighbours: k` lists the k training coins nearest to the request's coin by the OOD flag's own cosine distance.

Loading it needs pandas and pyarrow only (both come with `mlflow`, a serving requirement of every model).
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

NEIGHBOURS_FILE = "neighbours.parquet"
THUMBNAIL_PX = 64  # per side; 64 px JPEGs of the ~2,900 OCRE coins take about 10 MB
THUMBNAIL_QUALITY = 80
FIELDS = ("coin_id", "year_from", "year_to", "date_text", "denomination", "mint", "portrait")


def jpeg(array: np.ndarray, quality: int = THUMBNAIL_QUALITY) -> bytes:
    """A uint8 image array [C, H, W] (C = 1 or 3) as JPEG bytes."""
    from PIL import Image

    image = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def build_table(rows: pd.DataFrame, fronts: np.ndarray, backs: np.ndarray) -> pd.DataFrame:
    """The reference table: the catalogue fields of `rows` (a manifest's rows, in the OOD reference order) and
    a JPEG of each side from `fronts`/`backs` (uint8 [N, C, H, W], e.g. the 64 px image cache)."""
    from coinyear.rulers import portrait

    if not len(rows) == len(fronts) == len(backs):
        raise ValueError(f"{len(rows)} rows but {len(fronts)} fronts and {len(backs)} backs")

    def text(column: str) -> list[str | None]:
        values = rows[column] if column in rows.columns else [None] * len(rows)
        return [None if pd.isna(value) or value == "" else str(value) for value in values]  # "": feedback rows

    return pd.DataFrame({
        "coin_id": [str(value) for value in rows["coin_id"]],
        "year_from": rows["year_from"].astype("int64").to_numpy(),
        "year_to": rows["year_to"].astype("int64").to_numpy(),
        "date_text": text("date_text"),
        "denomination": text("denomination"),
        "mint": text("mint"),
        "portrait": [portrait(desc) for desc in text("obverse_desc")],
        "front_jpeg": [jpeg(array) for array in fronts],
        "back_jpeg": [jpeg(array) for array in backs],
    })


def reference_file(rows: pd.DataFrame, cache_dir: str | Path, folder: str | Path) -> dict[str, str]:
    """Build and save the reference table of the coins a model was trained on (`rows`, in the order its OOD
    reference was built from); returns {"neighbours": path}, the logged model's artifact. Thumbnails come from
    the image cache at THUMBNAIL_PX in colour (decoded once per photo, then cached)."""
    from coinyear.data import ImageCache, load_arrays

    fronts, backs = load_arrays(rows, ImageCache(Path(cache_dir), THUMBNAIL_PX, False), progress=True)
    return {"neighbours": References(build_table(rows, fronts, backs)).save(folder)}


def data_url(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")


@dataclass
class References:
    """The reference coins of a logged model, row i = OOD reference row i."""

    table: pd.DataFrame

    def save(self, folder: str | Path) -> str:
        path = Path(folder) / NEIGHBOURS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self.table.to_parquet(path, index=False)
        return str(path)

    @classmethod
    def load(cls, path: str | Path) -> References:
        return cls(pd.read_parquet(path))

    def __len__(self) -> int:
        return len(self.table)

    def describe(self, index: np.ndarray, distance: np.ndarray) -> list[list[dict]]:
        """Per request coin, its neighbours as JSON-ready dicts (catalogue fields, `distance`, and the two sides
        as data URLs `thumbnail` (obverse) and `thumbnail_back`), from `FeatureDistance.nearest`."""
        records = self.table.iloc[np.asarray(index).ravel()].to_dict(orient="records")
        out: list[list[dict]] = []
        for coin, (indices, distances) in enumerate(zip(index, distance)):
            chosen = records[coin * len(indices):(coin + 1) * len(indices)]
            out.append([{**{name: _plain(record[name]) for name in FIELDS},
                         "distance": max(round(float(gap), 6), 0.0),  # float16 reference rows: never below 0
                         "thumbnail": data_url(record["front_jpeg"]),
                         "thumbnail_back": data_url(record["back_jpeg"])}
                        for record, gap in zip(chosen, distances)])
        return out


def _plain(value):
    """numpy scalars and missing values as JSON's own types."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value
