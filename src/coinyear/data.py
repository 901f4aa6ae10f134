"""Data stage: read and validate a manifest, decode coin photos, cache preprocessed tensors, grouped splits.

A manifest is a CSV with `coin_id, obverse, reverse, year_from, year_to` (image paths relative to the
manifest's folder, or absolute) and any extra columns, which are kept. Every row is validated; a bad row is
skipped and reported with its reason, never silently used and never a crash.

Four parts, in this order: images (decode, crop, cache, memory-mapped tensor files), the manifest's rows, the
fixed test split and folds, and `coinyear data import`. The module is kept whole at about 500 lines: each part is
under 200, and together they are the data stage's API, imported by name from a dozen modules in every layer
above it, the notebooks and the docs; split, those names would move to four homes without any of them getting
simpler.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("coin_id", "obverse", "reverse", "year_from", "year_to")
GROUP_COLUMNS = ("date_text", "denomination", "mint")
# Both-sides-in-one-photo scans are about 750x390; single sides are close to square.
COMPOSITE_ASPECT = 1.6
# Coin photos are small; anything above this many pixels is a decompression bomb, not a coin.
MAX_IMAGE_PIXELS = 40_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


class ImageError(ValueError):
    """An image that cannot be used: not an image, truncated, or too large."""


# ---------------------------------------------------------------------------------------------- images
def _heif_support() -> bool:
    """Let Pillow read HEIC/HEIF (what phones send) when pillow-heif is installed; a logged model's own
    environment may lack it, and then such photos get a clear refusal instead (see `decode_side`)."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


HEIF_SUPPORTED = _heif_support()
HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")


def _is_heif(head: bytes) -> bool:
    return head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS


# A JPEG far larger than the model input is decoded at a reduced DCT scale (Pillow's draft mode), never below this
# many times the input side: a 4000x3000 phone photo for a 128 px model decodes at 1000x750 in a tenth of the time.
DRAFT_FACTOR = 4


def decode_side(source: bytes | str | Path, side: str, size: int | None = None) -> Image.Image:
    """Decode one side's photo into RGB; a composite scan is cut to the half that shows this side.

    Any format Pillow reads (JPEG, PNG with alpha, 16-bit PNG, CMYK JPEG, WebP, TIFF, BMP, and HEIC with
    pillow-heif), EXIF orientation applied. With `size` (the model input side), a JPEG of more than
    DRAFT_FACTOR times that on both sides is decoded at a reduced scale. Composites show the obverse on the left
    and the reverse on the right (checked by eye on the OCRE scans), so the front keeps the left half and the back
    the right half.
    """
    image: Image.Image
    try:
        # a file is closed by the `with` below like the in-memory one
        handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")  # noqa: SIM115
        with handle:
            if not HEIF_SUPPORTED and _is_heif(handle.read(12)):
                raise ImageError("HEIC photos are not supported; send JPEG or PNG")
            handle.seek(0)
            with Image.open(handle) as image:
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise ImageError(f"image of {image.width}x{image.height} pixels is larger than allowed")
                if size and image.format == "JPEG":
                    image.draft(None, (DRAFT_FACTOR * size, DRAFT_FACTOR * size))
                image.load()
                image = ImageOps.exif_transpose(image)
                if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: Pillow's RGB would clip at 255
                    image = image.point(lambda value: value / 256).convert("L")
                image = image.convert("RGB")
    except ImageError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageError(f"image rejected as a decompression bomb: {error}") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"not a readable image: {error}") from error
    except Exception as error:  # a crafted file makes decoders raise anything: it is still a bad photo
        raise ImageError(f"not a readable image ({type(error).__name__}: {error})") from error
    if image.width / max(image.height, 1) > COMPOSITE_ASPECT:
        half = image.width // 2
        box = (0, 0, half, image.height) if side == "front" else (image.width - half, 0, image.width, image.height)
        image = image.crop(box)
    return image


def to_array(image: Image.Image, size: int, grayscale: bool) -> np.ndarray:
    """Centre-crop to a square (coins are centred) and resize: uint8 array [C, size, size]."""
    image = ImageOps.fit(image, (size, size), method=Image.Resampling.BILINEAR)
    if grayscale:
        return np.asarray(image.convert("L"), dtype=np.uint8)[None]
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()


def preprocess(source: bytes | str | Path, side: str, size: int, grayscale: bool) -> np.ndarray:
    """Raw photo (bytes or path) to the model's uint8 input; the one function training and serving share."""
    return to_array(decode_side(source, side, size), size, grayscale)


# Version of what `preprocess` makes of a photo (decode_side's crop, to_array's fit, resize and colour conversion):
# part of every ImageCache key, so entries of an older preprocessing are never read back. Raise it with any change
# to those functions' output.
PREPROCESS_VERSION = 1


class ImageCache:
    """Decoded, resized images on disk, keyed by path + file time + size + colour mode + side + PREPROCESS_VERSION.

    Repeated epochs, folds and runs then never decode a JPEG twice.
    """

    def __init__(self, root: Path, size: int, grayscale: bool):
        self.size, self.grayscale = size, grayscale
        self.root = Path(root) / f"{size}px-{'gray' if grayscale else 'rgb'}"
        self.root.mkdir(parents=True, exist_ok=True)

    def _key(self, path: Path, side: str) -> Path:
        stat = path.stat()
        raw = f"{path.resolve()}|{stat.st_mtime_ns}|{stat.st_size}|{side}|v{PREPROCESS_VERSION}".encode()
        digest = hashlib.sha1(raw).hexdigest()
        return self.root / digest[:2] / f"{digest}.npy"

    def get(self, path: str | Path, side: str) -> np.ndarray:
        path = Path(path)
        entry = self._key(path, side)
        if entry.exists():
            try:
                return np.load(entry)
            except (OSError, ValueError):
                log.warning("cache entry %s unreadable; decoding again", entry)
        array = preprocess(path, side, self.size, self.grayscale)
        entry.parent.mkdir(exist_ok=True)
        tmp = entry.with_suffix(".tmp.npy")
        np.save(tmp, array)
        tmp.replace(entry)
        return array


def load_arrays(rows: pd.DataFrame, cache: ImageCache, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Stack the front and back images of every row: two uint8 arrays [N, C, H, W]."""
    from tqdm.auto import tqdm

    fronts, backs = [], []
    iterator = tqdm(rows.itertuples(), total=len(rows), desc="images", disable=not progress, leave=False)
    for row in iterator:
        fronts.append(cache.get(row.obverse_path, "front"))
        backs.append(cache.get(row.reverse_path, "back"))
    return np.stack(fronts), np.stack(backs)


# Tensor files kept per folder: each distinct set of rows (a new retraining set, another --limit) makes one pair.
TENSOR_FILES_KEPT = 4


def tensor_files(rows: pd.DataFrame, cache: ImageCache, folder: str | Path) -> tuple[Path, Path]:
    """Where the memory-mapped front and back tensors of these rows live: named by every row's cache key
    (path, file time, size, side, image size, colour mode), so a changed photo or row set gets new files."""
    digest = hashlib.sha1(str(cache.root.name).encode())
    for row in rows.itertuples():
        digest.update(cache._key(Path(row.obverse_path), "front").name.encode())
        digest.update(cache._key(Path(row.reverse_path), "back").name.encode())
    stem = Path(folder) / f"{len(rows)}-{digest.hexdigest()[:20]}"
    return stem.with_name(stem.name + "-front.npy"), stem.with_name(stem.name + "-back.npy")


def build_tensor_files(rows: pd.DataFrame, cache: ImageCache, folder: str | Path,
                       progress: bool = False) -> tuple[Path, Path]:
    """Write the decoded images of every row into two `.npy` files, one image at a time (never all in memory);
    a no-op when they exist. Concurrent builders each write a private temporary file and rename it into place."""
    import os

    from tqdm.auto import tqdm

    paths = tensor_files(rows, cache, folder)
    if all(path.exists() for path in paths):
        return paths
    if len(rows) == 0:
        raise ValueError("no rows: nothing to put in a tensor file")
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    first = cache.get(rows["obverse_path"].iloc[0], "front")
    shape = (len(rows), *first.shape)
    temporary = [path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy") for path in paths]
    fronts, backs = (np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape) for path in temporary)
    iterator = tqdm(enumerate(rows.itertuples()), total=len(rows), desc="tensors", unit="coin",
                    disable=not progress, leave=False)
    for position, row in iterator:
        fronts[position] = cache.get(row.obverse_path, "front")
        backs[position] = cache.get(row.reverse_path, "back")
    for array in (fronts, backs):
        array.flush()
    del fronts, backs
    for source, target in zip(temporary, paths):
        os.replace(source, target)
    _prune_tensor_files(Path(folder), keep=set(paths))
    return paths


def _prune_tensor_files(folder: Path, keep: set[Path]) -> None:
    """Drop the oldest tensor files beyond TENSOR_FILES_KEPT pairs. A process that still maps a removed file
    keeps reading it (POSIX), and a later run rebuilds it."""
    files = sorted(folder.glob("*-front.npy"), key=lambda path: path.stat().st_mtime, reverse=True)
    for front in files[TENSOR_FILES_KEPT:]:
        back = front.with_name(front.name.replace("-front.npy", "-back.npy"))
        for path in (front, back):
            if path not in keep:
                path.unlink(missing_ok=True)


def open_tensor_files(paths: tuple[Path, Path]) -> tuple[np.ndarray, np.ndarray]:
    """The front and back tensors, memory-mapped read-only: a process reads (and holds) only the rows it uses."""
    return np.load(paths[0], mmap_mode="r"), np.load(paths[1], mmap_mode="r")


def mapped_arrays(rows: pd.DataFrame, cache: ImageCache, folder: str | Path,
                  progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """`load_arrays` without the memory: build the tensor files once (if missing) and map them."""
    return open_tensor_files(build_tensor_files(rows, cache, folder, progress))


# --------------------------------------------------------------------------------------------- manifest
@dataclass
class Manifest:
    """Valid rows (with absolute `obverse_path` / `reverse_path`, midpoint `year`) and what was dropped."""

    rows: pd.DataFrame
    dropped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["coin_id", "reason", "detail"]))
    source: str = ""

    def summary(self) -> dict:
        reasons = Counter(self.dropped["reason"]) if len(self.dropped) else Counter()
        years = self.rows["year"] if len(self.rows) else pd.Series(dtype=float)
        return {
            "source": self.source,
            "rows": int(len(self.rows) + len(self.dropped)),
            "valid": int(len(self.rows)),
            "dropped": int(len(self.dropped)),
            "dropped_by_reason": dict(sorted(reasons.items())),
            "composites": int(self.rows.get("composite", pd.Series(dtype=bool)).sum()),
            "groups": int(self.rows["group"].nunique()) if len(self.rows) else 0,
            "year_min": float(years.min()) if len(years) else None,
            "year_max": float(years.max()) if len(years) else None,
            "year_median": float(years.median()) if len(years) else None,
        }

    def report(self) -> str:
        summary = self.summary()
        lines = [f"{summary['valid']} of {summary['rows']} rows valid in {self.source}"]
        lines += [f"  dropped {count} rows: {reason}" for reason, count in summary["dropped_by_reason"].items()]
        return "\n".join(lines)


def _as_year(value) -> int | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not np.isfinite(number) or number != int(number):
        return None
    return int(number)


def _check_image(path: Path) -> tuple[str, str] | tuple[None, bool]:
    """(reason, detail) when the file cannot be used, else (None, is_composite)."""
    if not path.is_file():
        return "missing_file", str(path)
    try:
        with Image.open(path) as image:
            # the cap decoding applies (PIL alone only refuses twice its limit): a photo that would fail to decode
            # in training is skipped here, with its reason, instead
            if image.width * image.height > MAX_IMAGE_PIXELS:
                return "image_too_large", (f"{path.name}: {image.width}x{image.height} pixels, over the "
                                           f"{MAX_IMAGE_PIXELS:,} allowed")
            image.load()
            return None, image.width / max(image.height, 1) > COMPOSITE_ASPECT
    except Image.DecompressionBombError as error:
        return "unreadable_image", f"{path.name}: {error}"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        return "unreadable_image", f"{path.name}: {error}"


def group_keys(rows: pd.DataFrame) -> pd.Series:
    """The coin type a row belongs to: specimens of one type share a label, so they must share a fold."""
    present = [column for column in GROUP_COLUMNS if column in rows.columns]
    if not present:
        return rows["year_from"].astype(str) + "|" + rows["year_to"].astype(str)
    return rows[present].fillna("").astype(str).agg("|".join, axis=1)


def validate_rows(table: pd.DataFrame, base_dir: Path, min_year: int, max_year: int,
                  check_images: bool = True) -> Manifest:
    """Validate every row of a manifest table; see `read_manifest`."""
    missing = [column for column in REQUIRED_COLUMNS if column not in table.columns]
    if missing:
        raise ValueError(f"manifest lacks required columns: {', '.join(missing)}")
    kept, dropped, seen_ids = [], [], set()
    for record in table.to_dict("records"):
        coin_id = record.get("coin_id")

        def drop(reason: str, detail: str = "") -> None:  # called within this iteration only
            dropped.append({"coin_id": coin_id, "reason": reason, "detail": detail})  # noqa: B023

        if pd.isna(coin_id) or str(coin_id).strip() == "":
            drop("missing_coin_id")
            continue
        if coin_id in seen_ids:
            drop("duplicate_coin_id", str(coin_id))
            continue
        seen_ids.add(coin_id)
        sides = {}
        for column in ("obverse", "reverse"):
            value = record.get(column)
            sides[column] = None if pd.isna(value) or str(value).strip() == "" else base_dir / str(value).strip()
        obverse, reverse = sides["obverse"], sides["reverse"]
        if obverse is None or reverse is None:
            drop("missing_side", "obverse" if obverse is None else "reverse")
            continue
        year_from, year_to = _as_year(record.get("year_from")), _as_year(record.get("year_to"))
        if year_from is None or year_to is None:
            drop("bad_year", f"{record.get('year_from')!r}..{record.get('year_to')!r}")
            continue
        if year_from > year_to:
            drop("impossible_range", f"{year_from} > {year_to}")
            continue
        if year_from < min_year or year_to > max_year or year_from == 0 or year_to == 0:
            drop("year_out_of_span", f"{year_from}..{year_to} (supported {min_year}..{max_year}, no year 0)")
            continue
        composite = False
        if check_images:
            problem = None
            for column, path in (("obverse", obverse), ("reverse", reverse)):
                reason, detail = _check_image(path)
                if reason is not None:
                    problem = (reason, f"{column}: {detail}")
                    break
                composite = composite or bool(detail)
            if problem:
                drop(*problem)
                continue
        record.update(
            obverse_path=str(sides["obverse"]), reverse_path=str(sides["reverse"]),
            year_from=year_from, year_to=year_to, year=(year_from + year_to) / 2.0, composite=composite,
        )
        kept.append(record)
    rows = pd.DataFrame(kept)
    if len(rows):
        rows["group"] = group_keys(rows)
        rows = rows.reset_index(drop=True)
    manifest = Manifest(rows=rows, dropped=pd.DataFrame(dropped, columns=["coin_id", "reason", "detail"]),
                        source=str(base_dir))
    for reason, count in manifest.summary()["dropped_by_reason"].items():
        log.warning("dropped %d rows: %s", count, reason)
    return manifest


def read_manifest(data_dir: str | Path, min_year: int = -700, max_year: int = 2100, check_images: bool = True,
                  limit: int | None = None, seed: int = 0) -> Manifest:
    """Read `manifest.csv` in `data_dir` (or a CSV path), validating rows and (optionally) decoding images.

    `limit` keeps a random, reproducible subset of whole rows before validation (for quick runs).
    """
    path = Path(data_dir)
    csv_path = path if path.suffix == ".csv" else path / "manifest.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(f"no manifest at {csv_path}")
    table = pd.read_csv(csv_path, dtype={"obverse": str, "reverse": str})
    if limit is not None and limit < len(table):
        table = table.sample(n=limit, random_state=seed).sort_index()
    return validate_rows(table, csv_path.parent, min_year, max_year, check_images)


# ----------------------------------------------------------------------------------------------- splits
# The one evaluation split. A coin type is a test type when this hash of its `group_keys` key falls below
# TEST_PERCENT: a property of the type alone, so it is the same whatever the seed, the --limit, the row order or
# the dataset the type turns up in (the base manifest, the retraining data, a feedback row), and every model
# ever compared on it (`coinyear train`, each K-fold model and its refit, retraining candidates, production)
# was trained without it. Test types are only ever scored for a report: choices (the early-stopping epoch, the
# conformal calibration, the out-of-distribution threshold) are made on a validation split of the other types.
# Changing either constant changes which coins every earlier model may be scored on: do not.
TEST_PERCENT = 15
TEST_SPLIT_RULE = f"sha256(coin type) % 100 < {TEST_PERCENT}"  # logged with every training run


def type_bucket(group: str) -> int:
    """0..99 from the coin type's key alone (`group_keys`): the bucket the test split and the retraining job's
    feedback evaluation share."""
    return int(hashlib.sha256(str(group).encode()).hexdigest()[:8], 16) % 100


def is_test_type(groups) -> np.ndarray:
    """Per coin type key (`group_keys`, a row's `group`): whether it is one of the test coin types."""
    return np.array([type_bucket(group) < TEST_PERCENT for group in groups], dtype=bool)


def split_test(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the rows a model may use: train and validation, indices of the test coin types' rows), both
    positions in `rows` in row order."""
    test = is_test_type(rows["group"]) if len(rows) else np.zeros(0, dtype=bool)
    return np.flatnonzero(~test), np.flatnonzero(test)


def choice_splits(rows: pd.DataFrame, folds: int, fraction: float, seed: int = 0,
                  ) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """How a training run splits `rows`: ([(train, validation), ...], test), positions in `rows`.

    The test coin types (`split_test`) come off first; the rest makes K grouped folds (`folds` >= 2) or one
    grouped (train, validation) hold-out of about `fraction` of those rows (seeded). Validation rows are what
    choices are made on; test rows are in none of the pairs."""
    usable, test = split_test(rows)
    if len(usable) < 4:
        raise ValueError(f"only {len(usable)} rows outside the test coin types: too few to train")
    pool = rows.iloc[usable]
    pairs = grouped_folds(pool, folds, seed) if folds >= 2 else [grouped_holdout(pool, fraction, seed)]
    return [(usable[train], usable[validation]) for train, validation in pairs], test


def grouped_folds(rows: pd.DataFrame, folds: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """K (train, validation) index pairs where no coin type is on both sides."""
    from sklearn.model_selection import GroupKFold

    groups = rows["group"].to_numpy()
    if len(set(groups)) < folds:
        raise ValueError(f"{len(set(groups))} coin types cannot make {folds} grouped folds")
    splitter = GroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(train, val) for train, val in splitter.split(rows, groups=groups)]


def grouped_holdout(rows: pd.DataFrame, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One (train, hold-out) split by coin type, about `fraction` of the rows held out."""
    from sklearn.model_selection import GroupShuffleSplit

    splitter = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    train, holdout = next(splitter.split(rows, groups=rows["group"].to_numpy()))
    return train, holdout


# ----------------------------------------------------------------------------------------------- import
FRONT_NAMES = ("obverse", "front", "front_image", "heads")
BACK_NAMES = ("reverse", "back", "back_image", "tails")


def import_collection(images_dir: str | Path, csv_path: str | Path, out_dir: str | Path,
                      min_year: int = -700, max_year: int = 2100) -> Manifest:
    """Turn a user's own photos + CSV into a validated manifest at `out_dir/manifest.csv`.

    The CSV names each coin's two files (columns obverse/front and reverse/back, relative to `images_dir`)
    and its date: `year_from` + `year_to`, or a single `year`.
    """
    images_dir, out_dir = Path(images_dir).resolve(), Path(out_dir)
    table = pd.read_csv(csv_path, dtype=str)
    columns = {c.lower().strip(): c for c in table.columns}

    def pick(names: tuple[str, ...], what: str) -> str:
        for name in names:
            if name in columns:
                return columns[name]
        raise ValueError(f"{csv_path}: no column for the {what} image (expected one of {', '.join(names)})")

    front, back = pick(FRONT_NAMES, "front"), pick(BACK_NAMES, "back")
    out = pd.DataFrame({
        "coin_id": table[columns["coin_id"]] if "coin_id" in columns else range(1, len(table) + 1),
        "obverse": table[front].map(lambda v: str(images_dir / v) if isinstance(v, str) and v.strip() else ""),
        "reverse": table[back].map(lambda v: str(images_dir / v) if isinstance(v, str) and v.strip() else ""),
    })
    if "year_from" in columns and "year_to" in columns:
        out["year_from"], out["year_to"] = table[columns["year_from"]], table[columns["year_to"]]
    elif "year" in columns:
        out["year_from"] = out["year_to"] = table[columns["year"]]
    else:
        raise ValueError(f"{csv_path}: needs year_from and year_to, or year")
    for column in table.columns:
        if column not in (front, back) and column.lower() not in ("coin_id", "year", "year_from", "year_to"):
            out[column] = table[column]
    # a repeated coin_id: the first row wins and each later one is reported with the CSV line it came from
    repeated = out["coin_id"].duplicated(keep="first") & out["coin_id"].notna()
    first_line: dict = {}
    for line, coin_id in zip(out.index + 2, out["coin_id"]):  # line 1 is the header
        first_line.setdefault(coin_id, line)
    duplicates = pd.DataFrame({
        "coin_id": out.loc[repeated, "coin_id"].to_list(), "reason": "duplicate_coin_id",
        "detail": [f"CSV line {line}: coin_id {coin_id} already on line {first_line[coin_id]}, which is kept"
                   for line, coin_id in zip(out.index[repeated] + 2, out.loc[repeated, "coin_id"])]},
        columns=["coin_id", "reason", "detail"])
    out = out[~repeated]
    manifest = validate_rows(out, out_dir, min_year, max_year)
    if len(duplicates):
        log.warning("dropped %d rows: duplicate_coin_id", len(duplicates))
        manifest.dropped = pd.concat([manifest.dropped, duplicates], ignore_index=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    keep_ids = set(manifest.rows["coin_id"]) if len(manifest.rows) else set()
    out[out["coin_id"].isin(keep_ids)].to_csv(out_dir / "manifest.csv", index=False)
    manifest.source = str(out_dir)
    return manifest
