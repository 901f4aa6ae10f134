"""`coinyear predict`: one coin through the CLI, a folder with a corrupt photo, a CSV with extra columns, a
restart after SIGKILL, and the Spark path (spark_udf on local PySpark), all against the pyfunc's own answers
for the same real OCRE photos (copied into temporary folders)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def coins(ocre_dir) -> pd.DataFrame:
    """40 real OCRE coins: coin_id, obverse and reverse paths."""
    manifest = pd.read_csv(ocre_dir / "manifest.csv").iloc[:40]
    return pd.DataFrame({"coin_id": manifest["coin_id"].astype(str),
                         "obverse": [str(ocre_dir / p) for p in manifest["obverse"]],
                         "reverse": [str(ocre_dir / p) for p in manifest["reverse"]],
                         "mint": manifest["mint"]})


@pytest.fixture(scope="module")
def pyfunc(trained):
    """The registered version loaded as MLflow serves it, and a function giving its answers for photo files."""
    import mlflow

    from coinyear.config import configure_mlflow
    from coinyear.pyfunc import BACK, FRONT, encode_file

    settings, outcome = trained
    configure_mlflow(settings)
    model = mlflow.pyfunc.load_model(f"models:/{settings.model_name}/{outcome.version}")

    def answer(fronts, backs, interval=0.0):
        frame = pd.DataFrame({FRONT: [encode_file(f) for f in fronts], BACK: [encode_file(b) for b in backs]})
        return model.predict(frame, params={"interval": interval} if interval else None)

    return answer


def cli_env(settings) -> dict:
    env = {**os.environ, "COINYEAR_HOME": str(settings.home), "COINYEAR_NUM_THREADS": "2",
           "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri, "MLFLOW_REGISTRY_URI": settings.mlflow_registry_uri}
    env.pop("COINYEAR_TRACKING_URI", None)
    return env


def coinyear(*args: str) -> list[str]:
    return [sys.executable, "-m", "coinyear.cli", *args]


def test_one_coin_from_the_command_line(trained, coins, pyfunc, tmp_path, monkeypatch, capsys):
    from coinyear.cli import main
    from coinyear.config import get_settings

    settings, outcome = trained
    front, back = shutil.copy(coins["obverse"][0], tmp_path), shutil.copy(coins["reverse"][0], tmp_path)
    done = subprocess.run(coinyear("predict", front, back, "--json"), check=False, env=cli_env(settings), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["model_name"] == settings.model_name and answer["model_version"] == str(outcome.version)
    assert answer["year"] == pytest.approx(float(pyfunc([front], [back])[0]), abs=1e-4)

    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not a photo")
    # the refusal in-process (one Python start less): the same `main` with the same environment
    for key in ("COINYEAR_HOME", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(key, cli_env(settings)[key])
    monkeypatch.delenv("COINYEAR_TRACKING_URI", raising=False)
    get_settings.cache_clear()
    try:
        assert main(["predict", str(tmp_path / "broken.jpg"), back]) == 2
    finally:
        get_settings.cache_clear()
    assert "front image: not a readable image" in capsys.readouterr().err


def test_folder_with_a_corrupt_photo_and_a_lone_side(trained, coins, pyfunc, tmp_path):
    from coinyear.predict import load_scoring_model, pair_folder, predict_collection

    settings, outcome = trained
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, coin in coins.iloc[:12].iterrows():
        # both naming forms in one folder: OCRE's heads/tails and <id>_front/<id>_back
        names = (f"heads{coin.coin_id}.jpg", f"tails{coin.coin_id}.jpg") if i % 2 else \
            (f"c{coin.coin_id}_front.JPG", f"c{coin.coin_id}_back.jpg")
        shutil.copy(coin.obverse, folder / names[0])
        shutil.copy(coin.reverse, folder / names[1])
    corrupt = folder / "c1_front.JPG"
    corrupt.write_bytes(corrupt.read_bytes()[:200])  # truncated mid-stream, as an interrupted copy leaves it
    shutil.copy(coins["obverse"][20], folder / "lonely-obverse.png")
    (folder / "notes.txt").write_text("not a photo: ignored")

    pairs = pair_folder(folder)
    assert len(pairs) == 13 and "notes.txt" not in " ".join(pairs["coin_id"])
    model = load_scoring_model(settings)
    result = predict_collection(model, pairs, tmp_path / "out.parquet", interval=0.9, chunk_size=5,
                                progress=False)
    assert (result.total, result.scored, result.errors) == (13, 13, 2)
    table = pd.read_parquet(tmp_path / "out.parquet").set_index("coin_id")
    assert len(list((tmp_path / "out.parquet").glob("part-*.parquet"))) == 3
    assert sorted(table.index) == sorted(pairs["coin_id"])
    assert "not a readable image" in table.loc["c1", "error"] and np.isnan(table.loc["c1", "year"])
    assert table.loc["lonely", "error"] == "no back photo"
    assert (table["model_version"] == str(outcome.version)).all() and (table["model_name"] == "coinyear").all()
    good = table[table["error"].isna()]
    expected = pyfunc(good["front"], good["back"], interval=0.9)
    np.testing.assert_allclose(good["year"], expected["year"], atol=1e-4)
    np.testing.assert_allclose(good[["low", "high"]], expected[["low", "high"]], atol=1e-4)
    assert list(good["out_of_distribution"]) == list(expected["out_of_distribution"])


def test_csv_input_keeps_its_columns(trained, coins, pyfunc, tmp_path):
    from coinyear.predict import load_scoring_model, pair_csv, predict_collection

    settings, _ = trained
    (tmp_path / "photos").mkdir()
    rows = []
    for coin in coins.iloc[:5].itertuples():
        shutil.copy(coin.obverse, tmp_path / "photos" / f"o{coin.coin_id}.jpg")
        rows.append({"museum_no": f"INV-{coin.coin_id}", "front": f"photos/o{coin.coin_id}.jpg",
                     "back": coin.reverse, "mint": coin.mint, "year": "?"})  # relative to the CSV, and absolute
    rows.append({"museum_no": "INV-missing", "front": "photos/nowhere.jpg", "back": coins["reverse"][0],
                 "mint": "Rome", "year": "AD 70"})
    pd.DataFrame(rows).to_csv(tmp_path / "list.csv", index=False)

    result = predict_collection(load_scoring_model(settings), pair_csv(tmp_path / "list.csv"),
                                tmp_path / "out.csv", progress=False)
    assert (result.scored, result.errors) == (6, 1)
    out = pd.read_csv(tmp_path / "out.csv", dtype={"coin_id": str})
    assert list(out.columns) == ["coin_id", "front", "back", "museum_no", "mint", "input_year", "year", "error",
                                 "model_name", "model_version", "scored_at"]
    assert list(out["input_year"]) == [r["year"] for r in rows]  # the museum's own `year` is kept, renamed
    assert list(out["coin_id"]) == ["1", "2", "3", "4", "5", "6"]
    assert list(out["museum_no"]) == [r["museum_no"] for r in rows] and list(out["mint"]) == [r["mint"] for r in rows]
    assert "cannot read photo" in out["error"].iat[5] and out["error"].iloc[:5].isna().all()
    np.testing.assert_allclose(out["year"].iloc[:5], pyfunc(out["front"].iloc[:5], out["back"].iloc[:5]), atol=1e-4)


def test_restart_after_kill_scores_every_coin_once(trained, coins, tmp_path):
    """The run is held inside its second chunk by a photo that is a named pipe (reading it blocks), so the
    SIGKILL lands after exactly one chunk; a half-written row is then appended, as a kill mid-write leaves."""
    settings, _ = trained
    listing = coins[["coin_id", "obverse", "reverse", "mint"]].rename(columns={"obverse": "front", "reverse": "back"})
    blocker = tmp_path / "coin10-front.jpg"
    os.mkfifo(blocker)
    listing.loc[9, "front"] = str(blocker)
    listing.to_csv(tmp_path / "coins.csv", index=False)
    out = tmp_path / "dated.csv"
    command = coinyear("-v", "predict", "--csv", str(tmp_path / "coins.csv"), "--out", str(out), "--chunk-size", "8")

    first = subprocess.Popen(command, env=cli_env(settings), cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (out.exists() and out.read_text().count("\n") == 9):  # header + the first chunk
            assert first.poll() is None and time.monotonic() < deadline, "first chunk never written"
            time.sleep(0.2)
        time.sleep(0.5)  # it is now blocked reading the pipe in chunk 2
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    before = pd.read_csv(out, dtype={"coin_id": str})
    assert list(before["coin_id"]) == list(coins["coin_id"].iloc[:8])
    with open(out, "a") as handle:
        handle.write(f"{coins['coin_id'][8]},{coins['obverse'][8]},{coins['reverse'][8][:12]}")  # no newline
    blocker.unlink()
    shutil.copy(coins["obverse"][9], blocker)

    second = subprocess.run(command, check=False, env=cli_env(settings), cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stderr
    assert "8 of 40 coins already in" in second.stderr and "partial row" in second.stderr
    assert second.stderr.count("wrote chunk") == 4  # 32 coins left: only they were scored
    after = pd.read_csv(out, dtype={"coin_id": str})
    assert sorted(after["coin_id"]) == sorted(coins["coin_id"]) and after["coin_id"].is_unique
    assert after["error"].isna().all() and after["year"].notna().all()
    pd.testing.assert_frame_equal(after.iloc[:8], before)  # same years, same scored_at: not scored again
    assert list(after["mint"]) == list(coins["mint"])


def test_spark_udf_scores_like_the_pyfunc(trained, coins, pyfunc, spark, tmp_path):
    from coinyear.predict import predict_spark

    settings, outcome = trained
    folder = tmp_path / "photos"
    folder.mkdir()
    for coin in coins.iloc[:6].itertuples():
        shutil.copy(coin.obverse, folder / f"{coin.coin_id}-obverse.jpg")
        shutil.copy(coin.reverse, folder / f"{coin.coin_id}-reverse.jpg")
    bad_id = coins["coin_id"][2]
    (folder / f"{bad_id}-obverse.jpg").write_bytes(b"corrupt")
    shutil.copy(coins["reverse"][7], folder / "lone-reverse.jpg")

    result = predict_spark(settings, spark, folder, "dated_coins", interval=0.9)
    assert (result["scored"], result["errors"], result["model_version"]) == (7, 2, str(outcome.version))
    table = spark.table("dated_coins").toPandas().set_index("coin_id")
    assert sorted(table.index) == sorted([*coins["coin_id"].iloc[:6], "lone"])
    assert "front image" in table.loc[bad_id, "error"] and table.loc["lone", "error"] == "no front photo"
    good = table[table["error"].isna()].sort_index()
    expected = pyfunc([folder / f"{i}-obverse.jpg" for i in good.index],
                      [folder / f"{i}-reverse.jpg" for i in good.index], interval=0.9)
    np.testing.assert_allclose(good["year"], expected["year"], atol=1e-4)
    np.testing.assert_allclose(good[["low", "high"]], expected[["low", "high"]], atol=1e-4)
    assert (table["model_version"] == str(outcome.version)).all()

    again = predict_spark(settings, spark, folder, "dated_coins", interval=0.9)
    assert again["scored"] == 0 and spark.table("dated_coins").count() == 7  # a rerun adds nothing
