"""`coinyear demo` (what `make demo` runs): every step on real data, a registered production model scored on the
test coin types, and a closing summary with each step's time and the model's figures."""

from coinyear import registry
from coinyear.cli import main
from tests.conftest import make_settings

SMALL = {"backbone": "mobilenet_v3_small", "image_size": 64, "proj_dim": 32, "epochs": 1, "batch_size": 16}


def test_the_demo_trains_promotes_scores_the_test_types_and_sums_up(tmp_path, capsys):
    from coinyear.jobs.demo import run_demo

    settings = make_settings(tmp_path / "home", **SMALL)
    summary = run_demo(settings, setup_seconds=61.0, limit=150)
    assert list(summary.seconds) == ["set-up", "data", "training", "registration", "evaluation"]
    assert all(seconds >= 0 for seconds in summary.seconds.values()) and summary.seconds["training"] > 0
    assert registry.version_by_alias(settings, registry.PRODUCTION) == summary.version
    assert 0 < summary.test_coins < 150 / 3  # the test coin types only
    assert summary.metrics["count"] == summary.test_coins and summary.metrics["mae"] > 0
    assert 0 <= summary.metrics["portrait_top1"] <= summary.metrics["portrait_top3"] <= 1
    out = capsys.readouterr().out
    for step in ("== data ==", "== training and registration ==", "== evaluation ==", "Summary",
                 "set-up        1 min 01 s", f"version {summary.version} (alias production)",
                 "portrait named right (top-1)", "year MAE"):
        assert step in out, step


def test_the_demo_command_exits_2_with_one_line_when_there_is_no_data(tmp_path, monkeypatch, capsys):
    """No copy anywhere and a source that cannot be read: a clear error, no training started."""
    monkeypatch.chdir(tmp_path)  # no ../shared/data/ocre from here
    for key, value in {"HOME": str(tmp_path / "home"), "DATA_DIR": str(tmp_path / "nodata"),
                       "DATA_SOURCE": str(tmp_path / "missing.tar.gz")}.items():
        monkeypatch.setenv(f"COINYEAR_{key}", value)
    from coinyear.config import get_settings

    get_settings.cache_clear()
    try:
        assert main(["demo", "--limit", "20"]) == 2
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err
    assert "missing.tar.gz" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "home" / "mlflow.db").exists()
