"""The retraining job on real OCRE coins, with the inference log and feedback written through the lake (as the
gateway writes them): first promotion, cleaning counts, the frozen hold-out, exactly-once ingestion, a later
correction replacing an earlier label, rejection."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from coinyear import registry
from coinyear.data import group_keys, is_test_type
from coinyear.jobs.ingest import FEEDBACK_EVAL, HOLDOUT, TRAIN, current_rows
from coinyear.jobs.retrain import PROMOTED, REJECTED, SKIPPED, run_retrain
from coinyear.lake import open_lake
from coinyear.lake.tables import FEEDBACK, INFERENCE_LOG, MODEL_DECISIONS, SCHEMAS, TRAINING_DATA, Lake
from tests.conftest import OCRE, make_settings

pytestmark = pytest.mark.slow

BASE_LIMIT = 80


def small_settings(home, **overrides):
    """The tests' recipe (seconds on 2 cores) and a base set of 80 coins."""
    return make_settings(home, **{"backbone": "mobilenet_v3_small", "image_size": 64, "proj_dim": 32, "epochs": 1,
                                  "batch_size": 16, "seed": 1, "retrain_base_limit": BASE_LIMIT,
                                  "retrain_decade_min_coins": 5,
                                  # a shared 2-core CI machine can be slow; the latency gate has its own case
                                  "retrain_latency_budget_ms": 60_000, **overrides})


def held_back_coins(settings, count: int, skip: int = 0) -> pd.DataFrame:
    """OCRE coins outside the base set the job trains on: the coins users send for dating."""
    from coinyear.data import read_manifest

    base = set(read_manifest(OCRE, limit=BASE_LIMIT, seed=settings.retrain_holdout_seed,
                             check_images=False).rows["coin_id"])
    manifest = pd.read_csv(OCRE / "manifest.csv").dropna(subset=["obverse", "reverse"])
    return manifest[~manifest["coin_id"].isin(base)].sample(count + skip, random_state=7).iloc[skip:]


def log_request(front: bytes | None, back: bytes | None, prediction: float = 60.0) -> dict:
    now = datetime.now(UTC)
    return {"request_id": uuid.uuid4().hex, "timestamp": now, "date": now.date(), "status_code": 200,
            "execution_time_ms": 15.0, "model_name": "coinyear", "model_version": "1", "prediction": prediction,
            "front_image": front, "back_image": back}


def correction(request_id: str, year_from: int, year_to: int, seconds: float = 0.0) -> dict:
    return {"request_id": request_id, "year_from": year_from, "year_to": year_to, "source": "test",
            "timestamp": datetime.now(UTC) + timedelta(seconds=seconds), "actor": "test-expert"}


def write(lake: Lake, table: str, rows: list[dict]) -> None:
    lake.append(table, [{name: row.get(name) for name in SCHEMAS[table].names} for row in rows])


def coin_requests(coins: pd.DataFrame) -> tuple[list[dict], list[dict]]:
    """One logged request per coin and the expert's correction with the catalogue's years."""
    logs, feedback = [], []
    for coin in coins.itertuples():
        logged = log_request((OCRE / coin.obverse).read_bytes(), (OCRE / coin.reverse).read_bytes())
        logs.append(logged)
        feedback.append(correction(logged["request_id"], int(coin.year_from), int(coin.year_to)))
    return logs, feedback


def test_retrain_cleans_promotes_and_ingests_each_feedback_row_once(tmp_path):
    settings = small_settings(tmp_path / "home")
    lake = open_lake(settings)
    good_logs, good_feedback = coin_requests(held_back_coins(settings, 12))

    # dirty rows, one per cleaning reason
    first = good_logs[0]
    duplicate = log_request(first["front_image"], first["back_image"])  # same photos, same years
    # two requests with the same (new) photos: the first coin's sides swapped...
    twin_a, twin_b = (log_request(first["back_image"], first["front_image"]) for _ in range(2))
    garbage = log_request(b"not a jpeg at all", first["back_image"])
    out_of_span = log_request(good_logs[1]["back_image"], good_logs[1]["back_image"])
    backwards = log_request(good_logs[2]["back_image"], good_logs[2]["back_image"])
    blind = log_request(None, None)
    dirty_logs = [duplicate, twin_a, twin_b, garbage, out_of_span, backwards, blind]
    good_year = good_feedback[0]
    dirty_feedback = [
        correction(duplicate["request_id"], good_year["year_from"], good_year["year_to"]),
        correction(twin_a["request_id"], 60, 60),
        correction(twin_b["request_id"], 90, 90),  # ...with other years, later: it wins, the first is superseded
        correction(garbage["request_id"], 70, 70),
        correction(out_of_span["request_id"], 2500, 2500),
        correction(backwards["request_id"], 80, 70),
        correction(blind["request_id"], 70, 70),
        correction("no-such-request", 70, 70),
        correction(good_logs[3]["request_id"], 1, 1, seconds=-60),  # superseded by the later correction
    ]
    write(lake, INFERENCE_LOG, good_logs + dirty_logs)
    write(lake, FEEDBACK, good_feedback + dirty_feedback)

    preview = run_retrain(settings, dry_run=True)
    assert preview.decision == "dry_run" and not lake.exists(TRAINING_DATA)
    assert registry.version_by_alias(settings, registry.PRODUCTION) is None

    first_run = run_retrain(settings)
    print(first_run.report())
    assert first_run.decision == PROMOTED, first_run.reason
    assert "first valid model" in first_run.reason
    assert first_run.dropped == {"duplicate_image": 1, "impossible_label": 1, "missing_image": 1, "superseded": 2,
                                 "undecodable_image": 1, "unknown_request": 1, "year_out_of_span": 1}
    assert preview.dropped == first_run.dropped and preview.ingested_rows == first_run.ingested_rows
    assert registry.version_by_alias(settings, registry.PRODUCTION) == first_run.candidate_version

    data = lake.read(TRAINING_DATA)
    assert first_run.ingested_rows == len(data) == BASE_LIMIT + 13
    twin = data.set_index("request_id").loc[twin_b["request_id"]]
    assert (twin["year_from"], twin["year_to"]) == (90, 90)
    assert set(data["split"]) >= {TRAIN, HOLDOUT}
    assert (data.loc[data["source"] == "feedback", "split"].isin([TRAIN, FEEDBACK_EVAL])).all()
    assert data["content_hash"].is_unique
    holdout = set(data.loc[data["split"] == HOLDOUT, "coin_id"])
    # no coin type on both sides of the frozen hold-out, which is the test coin types `coinyear train` keeps out
    base = data[data["source"] == "base"]
    groups = base["date_text"] + base["denomination"] + base["mint"]
    assert not set(groups[base["split"] == HOLDOUT]) & set(groups[base["split"] == TRAIN])
    assert list(base["split"] == HOLDOUT) == list(is_test_type(group_keys(base)))
    # the feedback photos live in a content-addressed folder the rows point to
    feedback_rows = data[data["source"] == "feedback"]
    assert all(settings.state_dir in Path(p).parents for p in feedback_rows["obverse"])

    tags = {v.version: v.tags for v in registry.list_versions(settings)}[first_run.candidate_version]
    assert tags["decision"] == PROMOTED and tags["training_data_version"] == "0"
    decisions = lake.read(MODEL_DECISIONS)
    assert list(decisions["decision"]) == [PROMOTED]
    assert json.loads(decisions["dropped"].iloc[0]) == first_run.dropped

    # nothing new: the job says so and ingests nothing
    again = run_retrain(settings)
    assert again.decision == SKIPPED and "no new feedback" in again.reason
    assert lake.count(TRAINING_DATA) == BASE_LIMIT + 13

    # three new coins and a correction of one already used: exactly those are ingested, the correction replaces
    # the earlier label, the hold-out does not move
    new_logs, new_feedback = coin_requests(held_back_coins(settings, 3, skip=12))
    fixed = good_feedback[4]
    new_feedback.append(correction(fixed["request_id"], fixed["year_from"] + 5, fixed["year_to"] + 5, seconds=1))
    write(lake, INFERENCE_LOG, new_logs)
    write(lake, FEEDBACK, new_feedback)
    slow = small_settings(settings.home, retrain_latency_budget_ms=0.001)  # no model answers in a microsecond
    second_run = run_retrain(slow)
    print(second_run.report())
    assert second_run.new_feedback_rows == 4 and second_run.ingested_rows == 4 and not second_run.dropped
    data = lake.read(TRAINING_DATA)
    assert len(data) == BASE_LIMIT + 17
    current = current_rows(data).set_index("request_id")
    assert len(current) == BASE_LIMIT + 16
    assert current.loc[fixed["request_id"], "year_from"] == fixed["year_from"] + 5
    assert set(data.loc[data["split"] == HOLDOUT, "coin_id"]) == holdout
    assert second_run.decision == REJECTED and "too slow" in second_run.reason
    assert registry.version_by_alias(settings, registry.PRODUCTION) == first_run.candidate_version
    assert registry.version_by_alias(settings, registry.STAGING) == second_run.candidate_version
    rejected = {v.version: v.tags for v in registry.list_versions(settings)}[second_run.candidate_version]
    assert rejected["decision"] == REJECTED and "too slow" in rejected["decision_reason"]
    assert list(lake.read(MODEL_DECISIONS).sort_values("decided_at")["decision"]) == [PROMOTED, REJECTED]
    assert run_retrain(settings).decision == SKIPPED
