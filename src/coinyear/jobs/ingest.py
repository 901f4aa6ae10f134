"""Retraining, ingest side: feedback + inference log (+ the base dataset) -> candidate rows, and the
`training_data` table they become.

Which feedback is new is an anti-join on the feedback ids (`feedback_key`) that earlier decisions consumed
(`consumed` comes from the `model_decisions` table, see `coinyear.jobs.retrain`), never a Delta time-travel
read: old table versions disappear with VACUUM. The `training_data` table is append-only; its current rows are
those of decided runs (`current_rows`), the latest label of each photo pair winning.

Only accountable labels train: a feedback row whose `actor` is null (written before feedback named who gave it)
or `anonymous` (sent without credentials) becomes a candidate with a `problem` (`no_actor`, `anonymous`), so
cleaning drops it and the run's report counts it; it never supersedes an accountable correction of the same
request. Such rows still count for monitoring (coinyear.jobs.monitor), and wait in the UI's review queue
(`review_queue`) for an expert who accepts one (it is sent again as their own correction) or rejects it.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa

from coinyear.config import Settings
from coinyear.data import Manifest, group_keys, is_test_type, read_manifest, type_bucket, validate_rows
from coinyear.identity import ANONYMOUS
from coinyear.lake.tables import FEEDBACK, INFERENCE_LOG, TRAINING_DATA, Lake

log = logging.getLogger(__name__)

TRAIN, HOLDOUT, FEEDBACK_EVAL = "train", "holdout", "feedback_eval"
BASE, FEEDBACK_SOURCE = "base", "feedback"
# why a feedback row may not train (a candidate's `problem`: the reason before ': ' is what the report counts)
NO_ACTOR = "no_actor: recorded before feedback named who gave it"
ANONYMOUS_FEEDBACK = "anonymous: sent without credentials: kept for monitoring, never trained on"

TRAINING_DATA_SCHEMA = pa.schema([
    ("coin_id", pa.string()), ("source", pa.string()), ("split", pa.string()),
    ("obverse", pa.string()), ("reverse", pa.string()),
    ("year_from", pa.int32()), ("year_to", pa.int32()),
    ("date_text", pa.string()), ("denomination", pa.string()), ("mint", pa.string()),
    ("content_hash", pa.string()), ("request_id", pa.string()), ("feedback_timestamp", pa.string()),
    ("feedback_version", pa.int64()), ("retrain_run_id", pa.string()), ("added_at", pa.timestamp("us", tz="UTC")),
])
CANDIDATE_COLUMNS = ["coin_id", "source", "front", "back", "obverse", "reverse", "year_from", "year_to",
                     "date_text", "denomination", "mint", "request_id", "feedback_timestamp", "group", "problem"]


def table_version(lake: Lake, table: str) -> int:
    """The table's current version (Delta's, or the Spark lake's logical one), -1 while it does not exist."""
    return lake.version(table)


# ---------------------------------------------------------------------------------------------- feedback
def feedback_key(feedback: pd.DataFrame) -> pd.Series:
    """One id per feedback row: its request id and its timestamp in microseconds (the feedback table has no id
    column; an expert who corrects a request twice makes two rows with two timestamps)."""
    if len(feedback) == 0:
        return pd.Series([], dtype=str, index=feedback.index)
    stamps = pd.to_datetime(feedback["timestamp"], utc=True)
    micros = (stamps - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(microseconds=1)
    return feedback["request_id"].astype(str) + "@" + micros.fillna(-1).astype("int64").astype(str)


def read_new_feedback(lake: Lake, consumed: set[str]) -> tuple[int, pd.DataFrame]:
    """(feedback table version read, its rows whose `feedback_key` is not in `consumed`)."""
    version = table_version(lake, FEEDBACK)
    rows = lake.read(FEEDBACK) if version >= 0 else lake.empty(FEEDBACK)
    if len(rows) == 0:
        return version, rows
    return version, rows[~feedback_key(rows).isin(consumed).to_numpy()].reset_index(drop=True)


# ------------------------------------------------------------------------------------------- candidates
def ingest(settings: Settings, lake: Lake, new_feedback: pd.DataFrame, first_build: bool) -> pd.DataFrame:
    """Candidate rows (photos as bytes) from the new feedback and, on the first build, the base dataset."""
    parts = [feedback_candidates(lake, new_feedback)]
    if first_build:
        parts.insert(0, base_candidates(settings))
    parts = [part for part in parts if len(part)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=CANDIDATE_COLUMNS)


def base_candidates(settings: Settings) -> pd.DataFrame:
    """The base manifest's rows; rows it rejects (missing file, bad year...) come along with their reason.
    (`retrain_holdout_seed` only draws the `retrain_base_limit` subset; which rows are evaluation rows is the
    test split's rule, `assign_splits`.)"""
    manifest = read_manifest(settings.data_dir, settings.min_year, settings.max_year,
                             limit=settings.retrain_base_limit, seed=settings.retrain_holdout_seed)
    log.info(manifest.report())
    rows = manifest.rows
    valid = pd.DataFrame({
        "coin_id": "base:" + rows["coin_id"].astype(str), "source": BASE,
        "front": [Path(p).read_bytes() for p in rows["obverse_path"]],
        "back": [Path(p).read_bytes() for p in rows["reverse_path"]],
        # absolute, so the rows stay valid whatever the working directory of a later run
        "obverse": [str(Path(p).resolve()) for p in rows["obverse_path"]],
        "reverse": [str(Path(p).resolve()) for p in rows["reverse_path"]],
        "year_from": rows["year_from"], "year_to": rows["year_to"],
        **{c: rows[c].fillna("").astype(str) if c in rows else "" for c in ("date_text", "denomination", "mint")},
        "request_id": None, "feedback_timestamp": None, "group": rows["group"], "problem": None,
    })
    invalid = pd.DataFrame({"coin_id": "base:" + manifest.dropped["coin_id"].astype(str), "source": BASE,
                            "problem": manifest.dropped["reason"] + ": " + manifest.dropped["detail"].astype(str)})
    return pd.concat([valid, invalid], ignore_index=True).reindex(columns=CANDIDATE_COLUMNS)


def unaccountable(feedback: pd.DataFrame) -> pd.Series:
    """Why each feedback row may not train (NO_ACTOR, ANONYMOUS_FEEDBACK), None where someone answers for it."""
    actor = feedback["actor"] if "actor" in feedback else pd.Series(None, index=feedback.index, dtype=object)
    named = actor.fillna("").astype(str).str.strip()
    why = pd.Series(None, index=feedback.index, dtype=object)
    why[(named == "").to_numpy()] = NO_ACTOR
    why[(named.str.lower() == ANONYMOUS).to_numpy()] = ANONYMOUS_FEEDBACK
    return why


def review_queue(feedback: pd.DataFrame, reviews: pd.DataFrame) -> pd.DataFrame:
    """The corrections waiting for an expert's review (the UI's Review page), oldest first, with `feedback_key`:
    rows nobody answers for (`unaccountable`), not reviewed yet (`feedback_reviews`), and whose request has no
    later accountable correction (which settles it already: the latest accountable correction wins)."""
    if len(feedback) == 0:
        return feedback.assign(feedback_key=pd.Series(dtype=str))
    rows = feedback.assign(feedback_key=feedback_key(feedback))
    why = unaccountable(rows)
    reviewed = set(reviews["feedback_key"]) if len(reviews) else set()
    stamps = pd.to_datetime(rows["timestamp"], utc=True)
    settled_at = stamps[why.isna()].groupby(rows.loc[why.isna(), "request_id"]).max()
    later = rows["request_id"].map(settled_at)
    waiting = why.notna() & ~rows["feedback_key"].isin(reviewed) & ~(later.notna() & (later >= stamps))
    return rows[waiting.to_numpy()].assign(_at=stamps[waiting.to_numpy()]).sort_values("_at").drop(
        columns="_at").reset_index(drop=True)


def feedback_candidates(lake: Lake, feedback: pd.DataFrame) -> pd.DataFrame:
    """New feedback joined to its inference-log row: the expert's years with the photos that were scored.

    Rows nobody answers for (`unaccountable`) carry their reason as `problem`. Of several accountable corrections
    of one request in this batch the latest counts, the others are `superseded`; `feedback_timestamp` (ISO 8601,
    UTC) lets a later run's correction of the same photos replace this one."""
    if len(feedback) == 0:
        return pd.DataFrame(columns=CANDIDATE_COLUMNS)
    ids = sorted(set(feedback["request_id"]))
    logged = lake.read(INFERENCE_LOG, columns=["request_id", "front_image", "back_image"],
                       filters=[("request_id", "in", ids)]).drop_duplicates("request_id")
    rows = feedback.merge(logged, on="request_id", how="left")
    why = unaccountable(rows)
    accountable = why.isna()
    # an anonymous correction arriving later must not push an accountable one out
    latest = rows[accountable].sort_values("timestamp").duplicated("request_id", keep="last")
    year_text = rows["year_from"].astype(str) + ".." + rows["year_to"].astype(str)
    out = pd.DataFrame({
        "coin_id": "feedback:" + rows["request_id"].astype(str), "source": FEEDBACK_SOURCE,
        "front": rows["front_image"], "back": rows["back_image"], "obverse": None, "reverse": None,
        "year_from": rows["year_from"], "year_to": rows["year_to"],
        "date_text": year_text, "denomination": "", "mint": "",
        "request_id": rows["request_id"],
        "feedback_timestamp": pd.to_datetime(rows["timestamp"], utc=True).map(lambda t: t.isoformat()),
        "group": None, "problem": None,
    })
    out["group"] = group_keys(out)  # the coin type as the grouped folds see it (a feedback row's type is its years)
    out.loc[~rows["request_id"].isin(logged["request_id"]), "problem"] = \
        "unknown_request: no inference-log row with this request_id"
    out.loc[latest.reindex(out.index, fill_value=False).to_numpy(), "problem"] = \
        "superseded: a later correction of this request"
    out.loc[~accountable.to_numpy(), "problem"] = why[~accountable]
    return out.reindex(columns=CANDIDATE_COLUMNS)


# ------------------------------------------------------------------------------------------ training data
def current_rows(table: pd.DataFrame, runs: set[str] | None = None) -> pd.DataFrame:
    """The rows of `training_data` that count: those written by `runs` (the decided runs; None: all), and of
    each photo pair only its latest label (a later expert correction replaces an earlier one or the base
    label; rows are never rewritten, the newer row wins)."""
    if len(table) and runs is not None:
        table = table[table["retrain_run_id"].isin(runs)]
    if len(table) == 0:  # also a table not written yet, which has no columns
        return table.reset_index(drop=True)
    order = pd.to_datetime(table["feedback_timestamp"], utc=True, errors="coerce", format="ISO8601")
    ranked = table.assign(_when=order).sort_values(["_when", "added_at"], na_position="first", kind="stable")
    return ranked.drop_duplicates("content_hash", keep="last").drop(columns="_when").reset_index(drop=True)


def image_store(settings: Settings) -> Path:
    """Content-addressed copies of feedback photos, so a manifest row can point at a file."""
    return settings.state_dir / "images"


def store_image(settings: Settings, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    path = image_store(settings) / digest[:2] / digest
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return str(path)


def assign_splits(settings: Settings, rows: pd.DataFrame, existing: pd.DataFrame | None = None) -> pd.Series:
    """Each row's split, whole coin types at a time (`data.group_keys`, the grouped folds' grouping).

    Base rows: HOLDOUT when of a test coin type (`data.is_test_type`, the one evaluation split `coinyear train`
    and `coinyear evaluate --holdout` use), else TRAIN. Feedback rows (whose type is their years): FEEDBACK_EVAL
    when of a test type or in the first `retrain_feedback_eval_percent` buckets of the same hash
    (`data.type_bucket`), and when the same photos (`content_hash`) are already on the evaluation side in
    `existing` (the current `training_data` rows): a corrected label of an evaluation coin stays evaluation
    data. A type is on the evaluation side in every run or in none, so no model is trained on what the gate
    scores."""
    split = pd.Series(TRAIN, index=rows.index)
    if len(rows) == 0:
        return split
    groups = group_keys(rows)
    test = is_test_type(groups)
    base = (rows["source"] == BASE).to_numpy()
    feedback = (rows["source"] == FEEDBACK_SOURCE).to_numpy()
    split[base & test] = HOLDOUT
    kept_back = test | (groups.map(type_bucket) < settings.retrain_feedback_eval_percent).to_numpy()
    if existing is not None and len(existing) and "content_hash" in rows:
        evaluated = set(existing.loc[(evaluation_side(existing) != TRAIN).to_numpy(), "content_hash"])
        kept_back = kept_back | rows["content_hash"].isin(evaluated).to_numpy()
    split[feedback & kept_back] = FEEDBACK_EVAL
    return split


def evaluation_side(table: pd.DataFrame) -> pd.Series:
    """The split of `training_data` rows as a run reads them: the stored one, except that every row of a test
    coin type is on the evaluation side and a base row of another type is on the training side. Rows written
    under the earlier rule (a seeded grouped hold-out of the base rows) are so read under the test split too."""
    if len(table) == 0:
        return table["split"] if "split" in table else pd.Series([], dtype=str)
    split = table["split"].copy()
    test = is_test_type(group_keys(table))
    base = (table["source"] == BASE).to_numpy()
    split[base] = TRAIN
    split[base & test] = HOLDOUT
    split[~base & test] = FEEDBACK_EVAL
    return split


def build(settings: Settings, lake: Lake, kept: pd.DataFrame, feedback_version: int, run_id: str | None,
          existing: pd.DataFrame | None = None) -> int:
    """Append the clean rows to `training_data`, tagged with `run_id`; returns rows added. `existing`: the
    current rows already there (`assign_splits` keeps their evaluation photos on the evaluation side).

    The rows count for later runs only once `run_id` has a decision (`current_rows`): a run that fails after
    this leaves rows no later run trains on, and its feedback is ingested again."""
    if len(kept) == 0:
        return 0
    rows = kept.copy()
    rows["split"] = assign_splits(settings, rows, existing)
    feedback = rows["source"] == FEEDBACK_SOURCE
    rows.loc[feedback, "obverse"] = [store_image(settings, b) for b in rows.loc[feedback, "front"]]
    rows.loc[feedback, "reverse"] = [store_image(settings, b) for b in rows.loc[feedback, "back"]]
    rows["feedback_version"], rows["retrain_run_id"] = feedback_version, run_id
    rows["added_at"] = datetime.now(UTC)
    table = pa.Table.from_pandas(rows[TRAINING_DATA_SCHEMA.names].astype({"year_from": int, "year_to": int}),
                                 schema=TRAINING_DATA_SCHEMA, preserve_index=False)
    return lake.append(TRAINING_DATA, table, metadata={"retrain_run_id": str(run_id)})


def dataset(lake: Lake, settings: Settings, version: int, runs: set[str] | None = None) -> tuple[Manifest, Manifest]:
    """(train rows, evaluation rows) of `training_data` at `version`: the current rows of `runs` (None: all),
    split by `evaluation_side`."""
    table = current_rows(lake.read(TRAINING_DATA, version=version), runs)
    if len(table):
        table = table.assign(split=evaluation_side(table))
    table = restore_feedback_photos(settings, lake, table)
    source = f"{lake.uri(TRAINING_DATA)}@v{version}"

    def manifest(rows: pd.DataFrame) -> Manifest:
        out = validate_rows(rows.reset_index(drop=True), Path("/"), settings.min_year, settings.max_year)
        out.source = source
        return out

    return manifest(table[table["split"] == TRAIN]), manifest(table[table["split"] != TRAIN])


def restore_feedback_photos(settings: Settings, lake: Lake, table: pd.DataFrame) -> pd.DataFrame:
    """`table` with the photo copies of its feedback rows present again, copied back from `inference_log`.

    A job cluster's COINYEAR_HOME is a local disk (deploy/databricks), so the copies `build` made under
    `state/images` are gone by the next run; the logged photos they came from are still in the lake.
    """
    feedback = table["source"] == FEEDBACK_SOURCE
    present = table["obverse"].map(lambda p: isinstance(p, str) and Path(p).is_file()) \
        & table["reverse"].map(lambda p: isinstance(p, str) and Path(p).is_file())
    missing = feedback & ~present
    if not missing.any():
        return table
    ids = sorted(set(table.loc[missing, "request_id"].dropna()))
    logged = lake.read(INFERENCE_LOG, columns=["request_id", "front_image", "back_image"],
                       filters=[("request_id", "in", ids)]).drop_duplicates("request_id").set_index("request_id")
    table, restored = table.copy(), 0
    for index in table.index[missing]:
        request_id = table.at[index, "request_id"]
        if request_id not in logged.index:
            continue  # left missing: validation drops the row and names it
        front, back = logged.at[request_id, "front_image"], logged.at[request_id, "back_image"]
        if isinstance(front, (bytes, bytearray)) and isinstance(back, (bytes, bytearray)):
            table.at[index, "obverse"] = store_image(settings, bytes(front))
            table.at[index, "reverse"] = store_image(settings, bytes(back))
            restored += 1
    log.info("restored the photos of %d of %d feedback rows from %s", restored, int(missing.sum()), INFERENCE_LOG)
    return table
