"""The whole loop on real OCRE coins, through the real commands: `coinyear serve` answers requests for coins the
model never saw, an expert posts their catalogue years as feedback, `coinyear retrain` promotes a better
candidate and the running server switches to it; a retrain on corrupted labels is rejected and production
stays; `coinyear models rollback` restores the previous version and the server follows."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coinyear import registry
from coinyear.lake import open_lake
from coinyear.lake.tables import FEEDBACK, MODEL_DECISIONS
from coinyear.pyfunc import BACK, FRONT, encode_file
from tests.conftest import OCRE, small_train_config
from tests.system.test_retrain import BASE_LIMIT, held_back_coins, small_settings
from tests.system.test_serve import REPO, Server

pytestmark = pytest.mark.slow

COINYEAR = str(Path(sys.executable).with_name("coinyear"))
# the tests' recipe, as the environment variables a deployment would set
RECIPE_ENV = {"COINYEAR_BACKBONE": "mobilenet_v3_small", "COINYEAR_IMAGE_SIZE": "64", "COINYEAR_PROJ_DIM": "32",
              "COINYEAR_EPOCHS": "1", "COINYEAR_BATCH_SIZE": "16", "COINYEAR_SEED": "1",
              "COINYEAR_RETRAIN_BASE_LIMIT": str(BASE_LIMIT), "COINYEAR_RETRAIN_DECADE_MIN_COINS": "5",
              "COINYEAR_RETRAIN_LATENCY_BUDGET_MS": "60000", "COINYEAR_NUM_THREADS": "2"}


def coinyear(home: Path, *args: str, **env: str) -> str:
    environment = {**os.environ, "COINYEAR_HOME": str(home), **RECIPE_ENV, **env}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "COINYEAR_TRACKING_URI", "COINYEAR_LAKE_URI"):
        environment.pop(key, None)
    done = subprocess.run([COINYEAR, *args], env=environment, cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    print(f"$ coinyear {' '.join(args)}\n{done.stdout}")
    return done.stdout


def served_version(server: Server, coin) -> str:
    body = {"inputs": [{FRONT: encode_file(OCRE / coin.obverse), BACK: encode_file(OCRE / coin.reverse)}]}
    response = server.post(body)
    assert response.status_code == 200, response.text
    return response.headers["served-model-version"]


def wait_for_version(server: Server, coin, version: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while served_version(server, coin) != version:
        assert time.monotonic() < deadline, f"server did not switch to version {version}"
        time.sleep(0.3)


def test_feedback_retrain_promote_reject_rollback(tmp_path):
    from coinyear.data import read_manifest
    from coinyear.train import run_training

    home = tmp_path / "home"
    settings = small_settings(home)
    # Production v1 is a known-bad model: trained on the base coins with every label a thousand years late, so
    # a candidate trained on the true years beats it overall and in every decade: the promotion is certain.
    base = read_manifest(OCRE, limit=BASE_LIMIT, seed=settings.retrain_holdout_seed)
    base.rows[["year_from", "year_to", "year"]] += 1000
    v1 = run_training(settings, small_train_config(limit=None), base, run_name="a-millennium-late").version
    registry.promote(settings, v1, registry.PRODUCTION)

    server = Server(home, COINYEAR_AUTH_DISABLED="false").start()
    try:
        coins = held_back_coins(settings, 12)
        for coin in coins.itertuples():
            body = {"inputs": [{FRONT: encode_file(OCRE / coin.obverse), BACK: encode_file(OCRE / coin.reverse)}]}
            answer = server.post(body)
            assert answer.status_code == 200 and answer.headers["served-model-version"] == v1
            feedback = server.post({"request_id": answer.headers["x-request-id"], "year_from": int(coin.year_from),
                                    "year_to": int(coin.year_to), "source": "e2e"}, path="/feedback")
            assert feedback.status_code == 200, feedback.text
        server.wait_logged()
        assert open_lake(settings).count(FEEDBACK) == 12

        promoted = coinyear(home, "retrain")
        assert "new feedback rows: 12" in promoted and "decision: PROMOTED" in promoted
        v2 = registry.version_by_alias(settings, registry.PRODUCTION)
        assert v2 != v1
        probe = next(coins.itertuples())
        wait_for_version(server, probe, v2)

        assert "no new feedback" in coinyear(home, "retrain")

        # corrupted labels: a careless bulk import dates 40 more coins to AD 1800 (plausible years, so cleaning
        # keeps them); all go to training, and the candidate must lose against production on the clean hold-out
        for coin in held_back_coins(settings, 40, skip=12).itertuples():
            answer = server.post({"inputs": [{FRONT: encode_file(OCRE / coin.obverse),
                                              BACK: encode_file(OCRE / coin.reverse)}]})
            assert server.post({"request_id": answer.headers["x-request-id"], "year": 1800, "source": "bulk"},
                               path="/feedback").status_code == 200
        server.wait_logged()
        rejected = coinyear(home, "retrain", COINYEAR_RETRAIN_FEEDBACK_EVAL_PERCENT="0")
        assert "new feedback rows: 40" in rejected and "decision: REJECTED" in rejected
        assert registry.version_by_alias(settings, registry.PRODUCTION) == v2
        time.sleep(1.5)  # three alias polls: the server must still be on v2
        assert served_version(server, probe) == v2

        decisions = open_lake(settings).read(MODEL_DECISIONS).sort_values("decided_at")
        assert list(decisions["decision"]) == ["promoted", "rejected"]
        assert list(decisions["production_after"]) == [v2, v2]
        assert decisions["candidate_mae"].iloc[1] > decisions["production_mae"].iloc[1]
        listing = coinyear(home, "models", "list")
        assert "promoted" in listing and "rejected" in listing

        assert f"{v2} -> {v1}" in coinyear(home, "models", "rollback")
        wait_for_version(server, probe, v1)
    finally:
        server.kill()
