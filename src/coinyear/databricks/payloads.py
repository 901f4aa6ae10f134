"""Databricks loop: the serving endpoint's payload table -> `inference_log`, feedback files -> `feedback`.

On Databricks, Model Serving logs every request to the endpoint's AI Gateway inference (payload) table
(`COINYEAR_PAYLOAD_TABLE`, delivered best effort, up to an hour late) and the gateway with the databricks
backend (coinyear.databricks.gateway) leaves feedback and the photos of big requests in a Unity Catalog volume
(`COINYEAR_LOOP_VOLUME`). `coinyear ingest-payloads` (a job task on a cluster, where the volume is mounted at
/Volumes/...) turns both into the rows the retraining and monitoring jobs read, through `open_lake(settings)`.

Payload table (columns as Databricks creates them):
    request_date DATE, databricks_request_id STRING, client_request_id STRING, request_time TIMESTAMP,
    status_code INT, sampling_fraction DOUBLE, execution_duration_ms BIGINT, request STRING, response STRING,
    served_entity_id STRING, logging_error_codes ARRAY<STRING>, requester STRING

Mapping, one `inference_log` row per input row of a request:
    request_id         `<key>` for a one-row request, `<key>-<i>` for row i; key = client_request_id (the
                       gateway's x-request-id: what feedback refers to), else databricks_request_id
    http_request_id    databricks_request_id (unique per logged request: the exactly-once key)
    client_request_id, timestamp (request_time), date (its UTC date), status_code,
    execution_time_ms  execution_duration_ms (model time only: Model Serving does not log the full latency)
    error_code, error_message   from the endpoint's JSON error answer (or why the payload could not be read)
    prediction         `predictions[i]` of the answer (the `year` of an interval answer); null unless 200
    model_name, model_version   the served entity, from `system.serving.served_entities` when readable
    front_image, back_image     base64-decoded from the request JSON (any scoring format); when Model Serving did
                       not log the request (over its 1 MB limit: `request` null, `MAX_REQUEST_SIZE_EXCEEDED`),
                       from `<volume>/photos/<client_request_id>/<i>/front|back`, where the gateway put them;
                       never for a client_request_id that is not a plain name (`safe_request_id`: the gateway
                       sends none such, another caller may): those rows are kept without photos and counted
    request_metadata   JSON: source, databricks_request_id, served_entity_id, requester, sampling_fraction,
                       input format, params, logging_error_codes, where the photos came from

Not mapped: `coinyear deploy`'s smoke queries (client_request_id starting with SMOKE_REQUEST_PREFIX): they are the
deploy checking a version, not traffic to monitor or learn from. Each run counts those it read in its report (a
smoke query inside the late window is read, and counted, again by the next run).

Exactly once: the newest `request_time` mapped is the watermark, committed as the Lake's transaction marker in the
same commit as the rows (app id WATERMARK_APP, version = microseconds since the epoch; +1 when a run maps only
late rows, as the version must rise). A run reads the payload rows from LATE_WINDOW before the watermark (rows
arrive late) and skips those whose databricks_request_id is already in `inference_log`; a row delivered twice is
one row.

Feedback files (`<volume>/feedback/*.json`, one `feedback` row each; written by the gateway): appended to
`feedback` once the request they correct is in `inference_log`, then moved to `feedback/ingested/`; a row that is
already in `feedback` (same request_id and timestamp: a run that stopped between the append and the move) is only
moved. An unreadable file, and one whose request is still unknown after UNKNOWN_REQUEST_GRACE, is moved to
`feedback/rejected/` with the reason in the run's report; nothing is deleted.

Who gave a correction (`actor`) is what its file says: the gateway's databricks backend writes the actor of the
caller's bearer token (`name` of a `name:token` entry of COINYEAR_API_TOKENS, else `token:<sha256 prefix>`,
`anonymous` without auth: coinyear.serve.auth), the UI as a Databricks App writes the person signed in to it the
same way, or `anonymous` (coinyear.ui.access). Nothing here can check it: the volume's write permission is the
trust boundary, so grant WRITE VOLUME only to the principals of the gateway and the App. A file without one
(written before files named it) is a row with a null actor, which retraining never learns from.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd

from coinyear.coin_input import InvalidCoinInput, decode_base64
from coinyear.config import Settings
from coinyear.databricks.volume import FEEDBACK_FILES, SMOKE_REQUEST_PREFIX, photo_path
from coinyear.lake import open_lake
from coinyear.lake.tables import FEEDBACK, INFERENCE_LOG, Lake
from coinyear.serve.request_id import SAFE_REQUEST_ID_RULE, safe_request_id
from coinyear.serve.wire import InvalidRequest, parse_body

log = logging.getLogger(__name__)

PAYLOAD_COLUMNS = ("request_date", "databricks_request_id", "client_request_id", "request_time", "status_code",
                   "sampling_fraction", "execution_duration_ms", "request", "response", "served_entity_id",
                   "logging_error_codes", "requester")
SERVED_ENTITIES = "system.serving.served_entities"
WATERMARK_APP = "coinyear-ingest-payloads"
LATE_WINDOW = timedelta(hours=24)  # Databricks delivers within an hour; a day of margin costs one re-read
UNKNOWN_REQUEST_GRACE = timedelta(days=2)
MAX_ROWS = 10_000  # rows of one logged request the mapping will expand (Model Serving caps the body at 16 MB)

@dataclass
class IngestResult:
    payload_table: str | None = None  # what was read (None: not configured, step skipped)
    payload_table_missing: bool = False  # configured, but the endpoint has not created it yet
    loop_volume: str | None = None
    requests_mapped: int = 0
    smoke_requests_skipped: int = 0  # `coinyear deploy`'s own queries (SMOKE_REQUEST_PREFIX), never mapped
    rows_appended: int = 0
    photos_from_volume: int = 0
    photos_missing: int = 0  # rows of unlogged requests whose photos are not in the volume either
    photos_unsafe_id: int = 0  # rows of unlogged requests whose client_request_id cannot name a volume folder
    unreadable_requests: int = 0
    watermark: str | None = None
    model_versions: str = ""
    feedback_appended: int = 0
    feedback_already_in: int = 0
    feedback_waiting: int = 0
    feedback_rejected: dict[str, str] = field(default_factory=dict)  # file -> reason

    def report(self) -> str:
        lines = [(f"new requests mapped from {self.payload_table}: {self.requests_mapped} "
                  f"({self.rows_appended} inference_log rows)") if self.payload_table else
                 "no payload table (COINYEAR_PAYLOAD_TABLE): inference_log not updated"]
        if self.payload_table_missing:
            lines[0] = (f"payload table {self.payload_table} does not exist yet (the endpoint creates it on its "
                        f"first deployment): inference_log not updated")
        if self.smoke_requests_skipped:
            lines.append(f"  skipped {self.smoke_requests_skipped} smoke queries of `coinyear deploy` "
                         f"(client_request_id {SMOKE_REQUEST_PREFIX}...)")
        if self.photos_from_volume or self.photos_missing or self.unreadable_requests:
            lines.append(f"  photos from the volume: {self.photos_from_volume} rows; photos missing: "
                         f"{self.photos_missing} rows; unreadable request JSON: {self.unreadable_requests}")
        if self.photos_unsafe_id:
            lines.append(f"  volume not read for {self.photos_unsafe_id} rows (kept without photos): their "
                         f"client_request_id is not a plain name ({SAFE_REQUEST_ID_RULE})")
        if self.model_versions:
            lines.append(f"  {self.model_versions}")
        if self.payload_table and not self.payload_table_missing:
            lines.append(f"watermark (newest request_time mapped): {self.watermark or '-'}")
        if not self.loop_volume:
            return "\n".join([*lines, "no volume (COINYEAR_LOOP_VOLUME): no feedback files read"])
        lines.append(f"feedback files: {self.feedback_appended} appended, {self.feedback_already_in} already in "
                     f"the table, {self.feedback_waiting} waiting for their request, "
                     f"{len(self.feedback_rejected)} rejected")
        lines += [f"  rejected {name}: {reason}" for name, reason in sorted(self.feedback_rejected.items())]
        return "\n".join(lines)


def ingest_payloads(settings: Settings, spark=None, now: datetime | None = None,
                    served_entities: str = SERVED_ENTITIES) -> IngestResult:
    """Map new payload rows onto `inference_log`, then append ready feedback files to `feedback`.

    Needs COINYEAR_PAYLOAD_TABLE, COINYEAR_LOOP_VOLUME or both (each step runs when its setting is there);
    `spark` defaults to the active session (coinyear.spark).
    """
    if not settings.payload_table and not settings.loop_volume:
        raise ValueError("nothing to ingest: set COINYEAR_PAYLOAD_TABLE (the endpoint's payload table) and/or "
                         "COINYEAR_LOOP_VOLUME (where the gateway keeps feedback and big requests' photos)")
    lake, result = open_lake(settings), IngestResult(settings.payload_table, loop_volume=settings.loop_volume)
    if settings.payload_table:
        if spark is None:
            from coinyear.spark import spark_session

            spark = spark_session()
        map_payloads(spark, settings, lake, result, served_entities)
    if settings.loop_volume:
        ingest_feedback(settings, lake, result, now or datetime.now(UTC))
    return result


# ------------------------------------------------------------------------------------------- payloads
def map_payloads(spark, settings: Settings, lake: Lake, result: IngestResult,
                 served_entities: str = SERVED_ENTITIES) -> None:
    """The payload table's new rows as `inference_log` rows, appended in one commit with the new watermark."""
    from pyspark.sql import functions as F

    if not spark.catalog.tableExists(settings.payload_table):
        result.payload_table_missing = True  # before the first deployment: nothing to map yet, not a failure
        return
    payloads = spark.table(settings.payload_table)
    missing = [column for column in PAYLOAD_COLUMNS if column not in payloads.columns]
    if missing:
        raise ValueError(f"{settings.payload_table} is not an AI Gateway payload table: no column(s) "
                         f"{', '.join(missing)}")
    watermark = lake.committed_version(INFERENCE_LOG, WATERMARK_APP)
    since = None
    if watermark is not None:
        since = datetime.fromtimestamp(watermark / 1e6, UTC) - LATE_WINDOW
        payloads = payloads.where(F.col("request_time") >= F.lit(since))
    payloads = payloads.where(F.col("databricks_request_id").isNotNull() & F.col("request_time").isNotNull()) \
                       .dropDuplicates(["databricks_request_id"])
    seen = lake.read(INFERENCE_LOG, columns=["http_request_id"],
                     filters=[("date", ">=", since.date())] if since else None)["http_request_id"].dropna()
    if len(seen):
        seen_ids = spark.createDataFrame(pd.DataFrame({"databricks_request_id": seen.unique().astype(str)}))
        payloads = payloads.join(seen_ids, "databricks_request_id", "left_anti")
    versions = _served_versions(spark, served_entities)
    if versions is not None:
        payloads = payloads.join(versions, "served_entity_id", "left")
    else:
        result.model_versions = (f"model versions unknown: {served_entities} is not readable (rows keep "
                                 f"served_entity_id in request_metadata)")
        payloads = payloads.withColumn("entity_name", F.lit(None).cast("string")) \
                           .withColumn("entity_version", F.lit(None).cast("string"))
    # Epoch microseconds, not timestamps: no trip through the session time zone. The rows are expanded on the
    # driver, where Lake.append needs them anyway (no Python workers to start), one request_date at a time so
    # that a first run over a long history holds one day in memory; each day is one append with its watermark.
    new = payloads.withColumn("request_time_us", F.unix_micros("request_time")) \
                  .withColumn("logging_error_codes", F.to_json("logging_error_codes")).drop("request_time") \
                  .withColumn("day", F.coalesce("request_date", F.to_date(F.timestamp_micros("request_time_us"))))
    days = [row["day"] for row in new.select("day").distinct().orderBy("day").collect()]
    for day in days:
        chunk = new.where(F.col("day") == F.lit(day)).drop("day").toPandas()
        watermark = _append_requests(chunk, settings, lake, result, watermark)
    result.watermark = _iso(watermark)


def _append_requests(new: pd.DataFrame, settings: Settings, lake: Lake, result: IngestResult,
                     watermark: int | None) -> int | None:
    """Map and append one batch of payload rows; returns the watermark committed with them."""
    smoke = new["client_request_id"].fillna("").astype(str).str.startswith(SMOKE_REQUEST_PREFIX)
    result.smoke_requests_skipped += int(smoke.sum())
    new = new[~smoke]
    rows = [row for record in new.to_dict("records")
            for row in map_payload(record, settings.loop_volume, settings.serving_endpoint_name)]
    if not rows:
        return watermark
    frame = pd.DataFrame(rows)
    photos = frame["request_metadata"].map(lambda text: json.loads(text).get("photos"))
    frame["timestamp"] = pd.to_datetime(frame.pop("timestamp_us"), unit="us", utc=True)
    frame["date"] = frame["timestamp"].dt.date
    # the marker's version must rise with every append (the Lake's exactly-once rule): a batch of late rows only
    # moves it one microsecond
    new_watermark = max(int(frame["timestamp"].max().value // 1000), (watermark or 0) + 1)
    appended = lake.append(INFERENCE_LOG, frame, transaction=(WATERMARK_APP, new_watermark),
                           metadata={"source": f"payload table {settings.payload_table}"})
    result.requests_mapped += len(new)
    result.rows_appended += appended
    result.photos_from_volume += int((photos == "volume").sum())
    result.photos_missing += int((photos == "missing").sum())
    result.unreadable_requests += int((photos == "unreadable").sum())
    result.photos_unsafe_id += int((photos == "unsafe_id").sum())
    return new_watermark


def _iso(micros: int | None) -> str | None:
    return None if micros is None else datetime.fromtimestamp(micros / 1e6, UTC).isoformat()


def _served_versions(spark, table: str):
    """served_entity_id -> (entity_name, entity_version), or None when the system table cannot be read."""
    from pyspark.errors import AnalysisException

    try:
        return spark.table(table).select("served_entity_id", "entity_name", "entity_version") \
                    .dropDuplicates(["served_entity_id"])
    except AnalysisException as error:
        log.warning("cannot read %s: %s", table, str(error).splitlines()[0])
        return None


def map_payload(payload: dict, volume: str | None, endpoint: str) -> list[dict]:
    """One payload-table row as its inference_log rows (see the module docstring)."""
    key = payload.get("client_request_id") or payload["databricks_request_id"]
    status = int(payload["status_code"]) if pd.notna(payload.get("status_code")) else None
    errors = json.loads(payload["logging_error_codes"]) if payload.get("logging_error_codes") else []
    metadata = {"source": "payload_table", "databricks_request_id": payload["databricks_request_id"],
                "served_entity_id": payload.get("served_entity_id"), "requester": payload.get("requester"),
                "sampling_fraction": _number(payload.get("sampling_fraction")), "logging_error_codes": errors}
    predictions, error_code, error_message = _answer(payload.get("response"), status)
    photos: list[tuple[bytes | None, bytes | None]] = []
    request = payload.get("request")
    client_id = payload.get("client_request_id")
    if request is None and client_id and not safe_request_id(client_id):  # never a path: not from the gateway
        log.warning("payload %s: client_request_id %r is not a plain name; its photos are not looked up",
                    payload["databricks_request_id"], client_id[:200])
        photos = [(None, None)] * max(len(predictions or ()), 1)
        metadata["photos"] = "unsafe_id"
    elif request is None:  # not logged (too large): the gateway kept the photos in the volume
        count = len(predictions) if predictions else _volume_rows(volume, client_id)
        for index in range(max(count, 1)):
            photos.append((_volume_photo(volume, client_id, index, "front"),
                           _volume_photo(volume, client_id, index, "back")))
        metadata["photos"] = "volume" if all(f and b for f, b in photos) else "missing"
    else:
        try:
            parsed = parse_body(request.encode(), MAX_ROWS)
        except InvalidRequest as error:  # logged, but not a scoring request we can read: one row says why
            metadata["photos"] = "unreadable"
            error_code = error_code or error.error_code
            error_message = error_message or f"logged request is not readable: {error.message}"
            photos.append((None, None))
        else:
            metadata.update(photos="request", input_format=parsed.input_format, params=parsed.params)
            for index, (front, back) in enumerate(parsed.rows):
                photos.append((_decoded(front, index), _decoded(back, index)))
    metadata["rows"] = len(photos)
    ids = [key] if len(photos) == 1 else [f"{key}-{i}" for i in range(len(photos))]
    return [{
        "request_id": row_id, "http_request_id": payload["databricks_request_id"], "row_index": index,
        "client_request_id": payload.get("client_request_id"), "timestamp_us": int(payload["request_time_us"]),
        "status_code": status, "error_code": error_code, "error_message": error_message,
        "execution_time_ms": _number(payload.get("execution_duration_ms")), "endpoint_name": endpoint,
        "model_name": payload.get("entity_name"), "model_version": payload.get("entity_version"),
        "prediction": predictions[index] if predictions and index < len(predictions) else None,
        "front_image": front, "back_image": back,
        "front_image_bytes": len(front) if front is not None else None,
        "back_image_bytes": len(back) if back is not None else None,
        "request_metadata": json.dumps(metadata, default=str),
    } for index, (row_id, (front, back)) in enumerate(zip(ids, photos))]


def _number(value) -> float | None:
    return float(value) if value is not None and pd.notna(value) else None


def _answer(response: str | None, status: int | None) -> tuple[list[float | None] | None, str | None, str | None]:
    """(predictions, error code, error message) of the logged answer; a prediction that is not a number is None."""
    try:
        body = json.loads(response) if response else None
    except json.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        return None, None, None if status == 200 else f"HTTP {status}"
    if status != 200:
        return None, body.get("error_code"), body.get("message")
    predictions = body.get("predictions")
    if not isinstance(predictions, list):
        return None, None, None
    years = [p.get("year") if isinstance(p, dict) else p for p in predictions]
    return [float(y) if isinstance(y, (int, float)) else None for y in years], None, None


def _decoded(value, index: int) -> bytes | None:
    try:
        return decode_base64(value, index, "photo")
    except InvalidCoinInput:
        return None


def _volume_rows(volume: str | None, request_id: str | None) -> int:
    if not volume or not request_id:
        return 0
    folder = Path(photo_path(volume, request_id, 0, "front")).parent.parent
    return sum(1 for child in folder.iterdir() if child.name.isdigit()) if folder.is_dir() else 0


def _volume_photo(volume: str | None, request_id: str | None, row: int, side: str) -> bytes | None:
    if not volume or not request_id:
        return None
    path = Path(photo_path(volume, request_id, row, side))
    return path.read_bytes() if path.is_file() else None


# ------------------------------------------------------------------------------------------- feedback
def ingest_feedback(settings: Settings, lake: Lake, result: IngestResult, now: datetime) -> None:
    """Append the feedback files whose request is in `inference_log` to `feedback` (see the module docstring)."""
    if not settings.loop_volume:
        raise ValueError("no volume to read feedback files from: set COINYEAR_LOOP_VOLUME")
    folder = Path(settings.loop_volume) / FEEDBACK_FILES
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    records: dict[Path, dict] = {}
    for path in files:
        try:
            records[path] = feedback_record(json.loads(path.read_text()), settings)
        except (ValueError, TypeError, KeyError, UnicodeDecodeError) as error:
            _move(path, folder / "rejected")
            result.feedback_rejected[path.name] = f"not a feedback row: {error}"
    if not records:
        return
    ids = sorted({record["request_id"] for record in records.values()})
    logged = set(lake.read(INFERENCE_LOG, columns=["request_id"], filters=[("request_id", "in", ids)])["request_id"])
    present = lake.read(FEEDBACK, columns=["request_id", "timestamp"], filters=[("request_id", "in", ids)])
    already = {(r, pd.Timestamp(t).value) for r, t in zip(present["request_id"], present["timestamp"])}
    new, done = [], []
    for path, record in records.items():
        if (record["request_id"], pd.Timestamp(record["timestamp"]).value) in already:
            result.feedback_already_in += 1
            done.append(path)
        elif record["request_id"] in logged:
            new.append(record)
            done.append(path)
        elif now - record["timestamp"] > UNKNOWN_REQUEST_GRACE:
            _move(path, folder / "rejected")
            result.feedback_rejected[path.name] = (f"no inference_log row with request_id "
                                                   f"{record['request_id']!r} after {UNKNOWN_REQUEST_GRACE}")
        else:
            result.feedback_waiting += 1
    result.feedback_appended = lake.append(FEEDBACK, new) if new else 0
    for path in done:  # only after the append: a run stopped in between finds them in the table next time
        _move(path, folder / "ingested")


def feedback_record(data: dict, settings: Settings) -> dict:
    """A feedback file's content as a `feedback` row; ValueError / TypeError say what is wrong with it."""
    if not isinstance(data, dict):
        raise TypeError("not a JSON object")
    request_id = data["request_id"]
    if not isinstance(request_id, str) or not request_id:
        raise ValueError("request_id must be a non-empty string")
    years = []
    for name in ("year_from", "year_to"):
        value = data[name]
        if isinstance(value, bool) or not isinstance(value, int) or value == 0 \
                or not settings.min_year <= value <= settings.max_year:
            raise ValueError(f"{name}={value!r} is not a year in {settings.min_year}..{settings.max_year} (no 0)")
        years.append(value)
    if years[0] > years[1]:
        raise ValueError(f"year_from {years[0]} is after year_to {years[1]}")
    stamp = datetime.fromisoformat(data["timestamp"])
    if stamp.tzinfo is None:
        raise ValueError("timestamp has no time zone")
    actor = data.get("actor")
    if actor is not None and not isinstance(actor, str):
        raise ValueError(f"actor={actor!r} is not a name")
    return {"request_id": request_id, "year_from": years[0], "year_to": years[1], "timestamp": stamp.astimezone(UTC),
            "source": data.get("source"), "note": data.get("note"), "actor": actor}


def _move(path: Path, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.move(str(path), str(folder / path.name))

