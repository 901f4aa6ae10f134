"""Collection scoring stage: date every coin of a folder or a CSV with a registered model, locally or on Spark.

Scoring goes through the served model's own code: each pair is decoded by the pyfunc's `tensors` (the
function behind `predict`) and scored batched by its `predict_tensors` / `predict_intervals`, so a year
written here is the year the gateway answers for the same photos.

Naming rule for a folder (`--images DIR`, files directly in DIR, case-insensitive):

* `<id>_front.<ext>` / `<id>_back.<ext>`; the separator may be `_`, `-`, `.` or a space and the side word
  `front|obverse|heads` or `back|reverse|tails` (so `<id>-obverse.jpg` / `<id>-reverse.jpg` pair too);
* the OCRE form `heads<id>.<ext>` / `tails<id>.<ext>` (e.g. `heads00001.jpg` + `tails00001.jpg`).

Photos are `.jpg .jpeg .png .webp .tif .tiff .bmp .gif`; other files are ignored. A photo whose name follows
neither form, or whose other side is missing, becomes one row with an `error`, like a photo that cannot be read.

The output (CSV, or a folder of Parquet part files) gets one row per coin: `coin_id, front, back`, the CSV's
other columns, `year` (and `low, high, out_of_distribution` with an interval), `error` (empty when scored),
`model_name, model_version, scored_at`. It is written in chunks, each one complete before the next starts; a
rerun skips the coin ids already written, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from coinyear.config import Settings, configure_mlflow
from coinyear.resumable import open_output
from coinyear.years import out_of_span_warning

if TYPE_CHECKING:  # torch and MLflow's model classes load only when a model is scored
    from coinyear.pyfunc import CoinYearModel

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif"})
SIDES = {"front": "front", "obverse": "front", "heads": "front", "back": "back", "reverse": "back", "tails": "back"}
SUFFIX_FORM = re.compile(r"^(?P<id>.+?)[_\-. ](?P<side>front|back|obverse|reverse|heads|tails)$", re.IGNORECASE)
PREFIX_FORM = re.compile(r"^(?P<side>heads|tails)(?P<id>[0-9A-Za-z]+)$", re.IGNORECASE)  # OCRE: heads00001
INTERVAL_COLUMNS = ["low", "high", "out_of_distribution"]
META_COLUMNS = ["error", "model_name", "model_version", "scored_at"]


# ------------------------------------------------------------------------------------------ the pairs
def name_side(filename: str) -> tuple[str, str] | None:
    """(coin id, 'front' | 'back' | '') for a photo's file name by the naming rule; None for a non-photo.

    '' means a photo whose name says no side."""
    path = Path(filename)
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return None
    match = SUFFIX_FORM.match(path.stem) or PREFIX_FORM.match(path.stem)
    if match is None:
        return path.name, ""
    return match["id"], SIDES[match["side"].lower()]


def pair_folder(folder: str | Path) -> pd.DataFrame:
    """`coin_id, front, back, error` for the photos directly in `folder`, paired by the naming rule.

    A photo without its other side, with a name that says no side, or with a second photo of the same side
    is one row with its error (scoring skips it)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}")
    sides: dict[str, dict[str, list[str]]] = {}
    for path in sorted(folder.iterdir()):
        parsed = name_side(path.name) if path.is_file() else None
        if parsed is not None:
            sides.setdefault(parsed[0], {}).setdefault(parsed[1], []).append(str(path.resolve()))
    rows: list[tuple[str, str | None, str | None, str | None]] = []
    for coin_id, found in sides.items():
        front, back = found.get("front", []), found.get("back", [])
        error: str | None
        if "" in found:
            error = "file name names no side (use <id>_front/<id>_back or heads<id>/tails<id>)"
            rows.append((coin_id, found[""][0], None, error))
            continue
        if len(front) > 1 or len(back) > 1:
            error = f"more than one photo of a side: {', '.join(Path(p).name for p in front + back)}"
        else:
            error = None if front and back else f"no {'back' if front else 'front'} photo"
        rows.append((coin_id, front[0] if front else None, back[0] if back else None, error))
    if not rows:
        raise ValueError(f"no coin photos in {folder} (see `coinyear predict --help` for the naming rule)")
    return pd.DataFrame(rows, columns=["coin_id", "front", "back", "error"])


def pair_csv(csv_file: str | Path) -> pd.DataFrame:
    """The CSV's rows with `front` and `back` resolved against the CSV's folder, `error` None.

    Every other column is kept. `coin_id` (the restart key) is the CSV's own when it has one, which must be
    unique; otherwise the row number (1 = first data row)."""
    csv_file = Path(csv_file)
    table = pd.read_csv(csv_file, dtype=str, keep_default_na=False)
    missing = [column for column in ("front", "back") if column not in table.columns]
    if missing:
        raise ValueError(f"{csv_file} has no column(s) {', '.join(missing)} (needs `front` and `back` paths)")
    if "coin_id" not in table.columns:
        table.insert(0, "coin_id", [str(n) for n in range(1, len(table) + 1)])
    duplicated = table["coin_id"][table["coin_id"].duplicated()].unique()
    if len(duplicated):
        raise ValueError(f"{csv_file}: coin_id must be unique (repeated: {', '.join(duplicated[:5])})")
    base = csv_file.resolve().parent
    for column in ("front", "back"):
        table[column] = [str(base / value) if value else None for value in table[column]]
    table["error"] = [None if front and back else "front or back path is empty"
                      for front, back in zip(table["front"], table["back"])]
    return table


# ------------------------------------------------------------------------------------------ the model
@dataclass
class ScoringModel:
    """A loaded CoinYearModel pinned to one registered version (an alias is resolved once, before scoring)."""

    uri: str
    name: str | None
    version: str | None
    python_model: CoinYearModel


def resolve_model_uri(settings: Settings, uri: str) -> tuple[str, str | None, str | None]:
    """(pinned URI, model name, version) for `models:/name@alias` or `models:/name/N`; other URIs as given.

    An alias that is not set is a clear error (ValueError), a failing registry a RegistryError."""
    from coinyear import registry

    match = re.fullmatch(r"models:/(?P<name>[^@/]+(?:\.[^@/]+)*)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))", uri)
    if match is None:
        return uri, None, None
    name, version = match["name"], match["version"]
    if match["alias"]:
        version = registry.version_by_alias(settings.model_copy(update={"model_name": name}), match["alias"])
        if version is None:
            raise ValueError(f"model {name} has no version with the alias {match['alias']}")
    return f"models:/{name}/{version}", name, version


def load_scoring_model(settings: Settings, model_uri: str | None = None) -> ScoringModel:
    """The model to score with; default `models:/<model_name>@production` of our registry."""
    import mlflow

    from coinyear.pyfunc import CoinYearModel

    configure_mlflow(settings)  # `models:/...` resolves against our registry, not MLflow's default store
    pinned, name, version = resolve_model_uri(settings, model_uri or f"models:/{settings.model_name}@production")
    python_model = mlflow.pyfunc.load_model(pinned).unwrap_python_model()
    if not isinstance(python_model, CoinYearModel):
        # a ValueError: the CLI reports it as a clear error (a wrong --model), not as a crash
        raise ValueError(f"{pinned} is a {type(python_model).__name__}, not a coinyear model")
    return ScoringModel(pinned, name, version, python_model)


def check_interval(model: ScoringModel, interval: float) -> float:
    """0 (years only) or a coverage level in (0, 1) that this model version can give ranges for."""
    if not 0 <= interval < 1:
        raise ValueError(f"--interval must be between 0 and 1 (e.g. 0.9), got {interval}")
    if interval and getattr(model.python_model, "quality", None) is None:
        raise ValueError(f"{model.uri} was logged without interval calibration: run without --interval")
    return float(interval)


def decode_pair_files(model: ScoringModel, front: str, back: str):
    """(front tensor, back tensor, None) or (None, None, error) for one coin, decoded by the pyfunc itself."""
    from coinyear.pyfunc import BACK, FRONT, InvalidCoinInput, encode_file

    try:
        frame = pd.DataFrame({FRONT: [encode_file(front)], BACK: [encode_file(back)]})
        fronts, backs = model.python_model.tensors(frame)
    except InvalidCoinInput as error:
        return None, None, error.message.removeprefix("row 0: ")
    except OSError as error:  # missing, unreadable, a folder...
        return None, None, f"cannot read photo: {error.strerror or error} ({error.filename or ''})"
    return fronts, backs, None


def score_rows(model: ScoringModel, rows: pd.DataFrame, interval: float = 0.0, batch_size: int = 32,
               pool: ThreadPoolExecutor | None = None) -> pd.DataFrame:
    """`year` (+ interval columns) and `error` for rows with `front, back, error`; bad rows keep their error.

    Pairs are decoded one by one (in `pool`'s threads: PIL releases the GIL while decoding), so a bad photo
    names only its own row; the good ones are scored together in batches."""
    import torch

    todo = [i for i, error in enumerate(rows["error"]) if not error]
    mapper = pool.map if pool is not None else map
    decoded = list(mapper(lambda i: decode_pair_files(model, rows["front"].iat[i], rows["back"].iat[i]), todo))
    errors = list(rows["error"])
    good = []
    for i, (fronts, backs, error) in zip(todo, decoded):
        if error:
            errors[i] = error
        else:
            good.append((i, fronts, backs))
    out = pd.DataFrame({"year": np.full(len(rows), np.nan)}, index=rows.index)
    if interval:
        out["low"], out["high"] = np.nan, np.nan
        out["out_of_distribution"] = pd.array([None] * len(rows), dtype="boolean")
    if good:
        positions = [i for i, _, _ in good]
        fronts, backs = torch.cat([f for _, f, _ in good]), torch.cat([b for _, _, b in good])
        if interval:
            answer = model.python_model.predict_intervals(fronts, backs, interval, batch_size)
            for column in ["year", *INTERVAL_COLUMNS]:
                out.iloc[positions, out.columns.get_loc(column)] = answer[column].to_numpy()
        else:
            out.iloc[positions, 0] = model.python_model.predict_tensors(fronts, backs, batch_size)
    out["error"] = pd.array([e or None for e in errors], dtype="string")
    return out


def predict_pair(model: ScoringModel, front: str | Path, back: str | Path, interval: float = 0.0) -> dict:
    """One coin: {year[, low, high, out_of_distribution[, warning]], model_name, model_version, span};
    ValueError if unusable. `warning` (only when the flag is up) says in words what the model knows."""
    interval = check_interval(model, interval)
    rows = pd.DataFrame({"front": [str(front)], "back": [str(back)], "error": [None]})
    scored = score_rows(model, rows, interval)
    if pd.notna(scored["error"].iat[0]):
        raise ValueError(str(scored["error"].iat[0]))
    answer: dict = {"year": float(scored["year"].iat[0])}
    if interval:
        answer.update(low=float(scored["low"].iat[0]), high=float(scored["high"].iat[0]),
                      out_of_distribution=bool(scored["out_of_distribution"].iat[0]), interval=interval)
    span = getattr(model.python_model, "span", {})
    if answer.get("out_of_distribution"):
        answer["warning"] = out_of_span_warning(span)
    return {**answer, "model_name": model.name, "model_version": model.version, "model_uri": model.uri,
            "span": span}


@dataclass
class CollectionResult:
    total: int
    skipped: int
    scored: int
    errors: int
    out: str
    model_name: str | None
    model_version: str | None


def predict_collection(model: ScoringModel, pairs: pd.DataFrame, out: str | Path, interval: float = 0.0,
                       chunk_size: int = 256, batch_size: int = 32, progress: bool = True) -> CollectionResult:
    """Score `pairs` (from `pair_folder` / `pair_csv`) into `out`, chunk by chunk, skipping coins already there."""
    from tqdm.auto import tqdm

    interval = check_interval(model, interval)
    output = open_output(out)
    scored_columns = ["year", *(INTERVAL_COLUMNS if interval else []), *META_COLUMNS]
    # an input column named like an output column (a museum's own `year`) is kept as `input_<name>`
    pairs = pairs.rename(columns={c: f"input_{c}" for c in pairs.columns if c in scored_columns and c != "error"})
    pairs = pairs.assign(coin_id=pairs["coin_id"].astype(str))
    carried = [c for c in pairs.columns if c not in ("coin_id", "front", "back", "error")]
    columns = ["coin_id", "front", "back", *carried, *scored_columns]
    existing = output.done()
    done: set[str] = set()
    if existing is not None:
        if list(existing.columns) != columns:
            raise ValueError(f"{out} holds other columns ({', '.join(existing.columns)}) than this run writes "
                             f"({', '.join(columns)}): use the same input and --interval, or another --out")
        done = set(existing["coin_id"].astype(str))
    todo = pairs[~pairs["coin_id"].isin(done)]
    skipped = len(pairs) - len(todo)
    if skipped:
        log.warning("%d of %d coins already in %s: not scored again", skipped, len(pairs), out)
    errors = 0
    workers = os.cpu_count() or 1
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(todo), desc="dating coins", unit="coin",
                                                   disable=not progress) as bar:
        for start in range(0, len(todo), chunk_size):
            chunk = todo.iloc[start:start + chunk_size].reset_index(drop=True)
            scored = score_rows(model, chunk, interval, batch_size, pool)
            frame = pd.concat([chunk[["coin_id", "front", "back", *carried]], scored], axis=1)
            frame["model_name"] = model.name or ""
            frame["model_version"] = model.version or ""
            frame["scored_at"] = datetime.now(UTC).isoformat(timespec="milliseconds")
            output.append(frame[columns])
            errors += int(frame["error"].notna().sum())
            log.info("wrote chunk: %d coins (%s .. %s)", len(frame), frame["coin_id"].iat[0],
                     frame["coin_id"].iat[-1])
            bar.update(len(chunk))
    return CollectionResult(len(pairs), skipped, len(todo), errors, str(out), model.name, model.version)


# ------------------------------------------------------------------------------------------ on Spark
def spark_result_type(interval: float) -> str:
    """The spark_udf result type: the year, or the pyfunc's interval columns as a struct."""
    if interval:
        return "year double, low double, high double, out_of_distribution boolean"
    return "double"


def predict_spark(settings: Settings, spark, images: str | Path, table: str, model_uri: str | None = None,
                  interval: float = 0.0) -> dict:
    """Score a folder of photo pairs on Spark with `mlflow.pyfunc.spark_udf` and append them to `table`.

    Photos are read with Spark's `binaryFile` source and paired by `name_side` (the naming rule above). A
    Python UDF checks and base64-encodes each pair with the pyfunc's own decoding; pairs it rejects become
    rows with their `error` and never reach the model, because spark_udf fails the whole job on one exception.
    Coin ids already in `table` are skipped (a rerun resumes). Returns counts and the model version.
    """
    import mlflow
    from pyspark.sql import functions as F
    from pyspark.sql.types import StringType, StructField, StructType

    from coinyear.pyfunc import BACK, FRONT

    model = load_scoring_model(settings, model_uri)
    interval = check_interval(model, interval)
    size, grayscale = model.python_model.size, model.python_model.grayscale
    parsed = StructType([StructField("coin_id", StringType()), StructField("side", StringType())])

    @F.udf(parsed)
    def parse(path):
        found = name_side(path.rsplit("/", 1)[-1])
        return None if found is None else {"coin_id": found[0], "side": found[1]}

    encoded = StructType([StructField(FRONT, StringType()), StructField(BACK, StringType()),
                          StructField("error", StringType())])

    @F.udf(encoded)
    def encode(front, back, error):
        import base64

        from coinyear.pyfunc import InvalidCoinInput, decode_pair

        if error:
            return {FRONT: None, BACK: None, "error": error}
        try:
            decode_pair(bytes(front), bytes(back), size, grayscale)
        except InvalidCoinInput as bad:
            return {FRONT: None, BACK: None, "error": bad.message}
        return {FRONT: base64.b64encode(front).decode("ascii"), BACK: base64.b64encode(back).decode("ascii"),
                "error": None}

    # a URI (dbfs:/, s3://, abfss://...) goes to Spark as given; a local path (or a /Volumes/... path) absolute
    source = str(images) if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", str(images)) else str(Path(images).resolve())
    files = (spark.read.format("binaryFile").load(source)
             .withColumn("parsed", parse("path")).where(F.col("parsed").isNotNull())
             .select(F.col("parsed.coin_id").alias("coin_id"), F.col("parsed.side").alias("side"), "path",
                     "content"))
    fronts = files.where("side = 'front'").select("coin_id", F.col("path").alias("front"),
                                                  F.col("content").alias("front_bytes"))
    backs = files.where("side = 'back'").select("coin_id", F.col("path").alias("back"),
                                                F.col("content").alias("back_bytes"))
    unnamed = files.where("side = ''").select("coin_id", F.col("path").alias("front"))
    pairs = (fronts.join(backs, "coin_id", "full_outer")
             .withColumn("error", F.when(F.col("front").isNull(), "no front photo")
                         .when(F.col("back").isNull(), "no back photo"))
             .unionByName(unnamed.withColumn("error", F.lit("file name names no side")), allowMissingColumns=True))
    if spark.catalog.tableExists(table):
        pairs = pairs.join(spark.table(table).select("coin_id"), "coin_id", "left_anti")
    # one partition per core: the join leaves spark.sql.shuffle.partitions small tasks, and every task of a
    # Python UDF pays a round trip to a worker that holds the model
    checked = (pairs.coalesce(spark.sparkContext.defaultParallelism)
               .withColumn("encoded", encode("front_bytes", "back_bytes", "error"))
               .select("coin_id", "front", "back", "encoded.*")).cache()
    # counted first: this also materialises the cache, before the write adds these coin ids to `table`
    counts = checked.groupBy(F.col("error").isNull().alias("ok")).count().collect()
    # env_manager="local": the executors run this very interpreter (coinyear.spark sets PYSPARK_PYTHON; a
    # Databricks cluster has coinyear installed), so the model's requirements are already there; "virtualenv"
    # would build a fresh environment from PyPI for every run, which takes minutes and needs the internet.
    udf = mlflow.pyfunc.spark_udf(spark, model.uri, result_type=spark_result_type(interval), env_manager="local",
                                  params={"interval": float(interval)} if interval else None)
    good = checked.where(F.col("error").isNull())
    prediction = udf(F.struct(FRONT, BACK))
    if interval:
        scored = good.withColumn("p", prediction).select("coin_id", "front", "back", "p.*", "error")
    else:
        scored = good.withColumn("year", prediction).select("coin_id", "front", "back", "year", "error")
    bad = checked.where(F.col("error").isNotNull()).select("coin_id", "front", "back", "error")
    result = (scored.unionByName(bad, allowMissingColumns=True)
              .withColumn("model_name", F.lit(model.name or ""))
              .withColumn("model_version", F.lit(model.version or ""))
              .withColumn("scored_at", F.current_timestamp()))
    columns = ["coin_id", "front", "back", "year", *(INTERVAL_COLUMNS if interval else []), *META_COLUMNS]
    result.select(*columns).write.mode("append").saveAsTable(table)
    checked.unpersist()
    scored_count = sum(row["count"] for row in counts)
    errors = sum(row["count"] for row in counts if not row["ok"])
    return {"table": table, "scored": scored_count, "errors": errors, "model_name": model.name,
            "model_version": model.version}
