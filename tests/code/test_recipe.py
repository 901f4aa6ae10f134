"""One recipe builder: `coinyear train` and the retraining job build the same recipe from the same settings, and
an invalid value is a clear error instead of a silent default."""

from __future__ import annotations

import pytest

from coinyear import cli
from coinyear.config import get_settings
from coinyear.jobs import retrain
from coinyear.recipe import recipe_from_settings
from tests.conftest import make_settings


def cli_recipe(settings, *flags: str):
    return cli._train_config(cli.build_parser().parse_args(["train", *flags]), settings)


def test_cli_train_and_retrain_build_the_same_recipe(tmp_path):
    """Before: retrain dropped TTA, the fold ensemble, the auxiliary heads and the pretrained switch."""
    settings = make_settings(tmp_path / "home", backbone="resnet18", mode="dual", image_size=96, proj_dim=0,
                             epochs=3, folds=3, lr=3e-4, tta=False, ensemble=True, aux_weight=0.5, pretrained=False,
                             reshoot=0.25, horizontal_flip=True, grayscale=True, seed=7)
    job = retrain.recipe(settings)
    assert cli_recipe(settings) == job
    assert (job.tta_angles, job.ensemble, job.aux_weight, job.model.pretrained) == ((), True, 0.5, False)
    assert job.reshoot == 0.25
    assert (job.folds, job.lr, job.model.backbone, job.model.proj_dim, job.model.grayscale) == (3, 3e-4, "resnet18",
                                                                                               0, True)
    # defaults: the same too
    plain = make_settings(tmp_path / "plain")
    assert cli_recipe(plain) == retrain.recipe(plain) == recipe_from_settings(plain)[1]
    assert len(retrain.recipe(plain).tta_angles) == 5


def test_flags_override_the_settings_and_zero_is_a_value(tmp_path):
    settings = make_settings(tmp_path / "home", folds=3, epochs=4)
    config = cli_recipe(settings, "--lr", "0.01", "--folds", "0", "--epochs", "1", "--no-tta", "--aux-weight", "0",
                        "--reshoot", "0")
    assert (config.lr, config.folds, config.epochs, config.tta_angles, config.aux_weight) == (0.01, 0, 1, (), 0.0)
    assert config.reshoot == 0.0


@pytest.mark.parametrize(("flags", "message"), [
    (["--lr", "0"], "lr must be a number > 0, got 0.0"),
    (["--lr=-1e-3"], "lr must be a number > 0"),
    (["--epochs", "0"], "epochs must be an integer >= 1"),
    (["--batch-size", "0"], "batch_size must be an integer >= 1"),
    (["--image-size", "0"], "image_size must be an integer >= 32"),
    (["--folds", "1"], "folds must be 0 (one grouped hold-out) or an integer >= 2"),
    (["--aux-weight=-1"], "aux_weight must be a number >= 0"),
    (["--reshoot", "1.5"], "reshoot must be a number from 0 to 1"),
    (["--ensemble"], "ensemble needs folds >= 2"),
])
def test_an_invalid_recipe_is_a_clear_error(tmp_path, monkeypatch, capsys, flags, message):
    """Before: `--lr 0` (and `--batch-size 0`, `--image-size 0`) fell back to the default without a word."""
    monkeypatch.setenv("COINYEAR_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    try:
        assert cli.main(["train", "--no-register", *flags]) == 2
    finally:
        get_settings.cache_clear()
    error = capsys.readouterr().err
    assert "invalid training recipe" in error and message in error
    assert not (tmp_path / "home" / "mlflow.db").exists()  # refused before any run started


def test_invalid_settings_fail_the_retraining_recipe_too(tmp_path):
    with pytest.raises(ValueError, match="epochs must be an integer >= 1, got 0"):
        retrain.recipe(make_settings(tmp_path / "home", epochs=0))
    with pytest.raises(ValueError, match="lr must be a number > 0"):
        retrain.recipe(make_settings(tmp_path / "home", lr=0.0))
