"""One recipe builder: `coinyear train` and the retraining job build the same recipe from the same settings, and
an invalid value is a clear error instead of a silent default."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from coinyear import cli
from coinyear.config import get_settings
from coinyear.jobs import retrain
from tests.conftest import make_settings

REPO = Path(__file__).resolve().parents[2]


def cli_recipe(settings, *flags: str):
    return cli._train_config(cli.build_parser().parse_args(["train", *flags]), settings)


def recipe_fields(config) -> dict:
    """What a recipe says, as plain values: compared with literals, not with another call of the same builder."""
    model = config.model
    return {"backbone": model.backbone, "mode": model.mode, "proj_dim": model.proj_dim, "grayscale": model.grayscale,
            "image_size": model.image_size, "pretrained": model.pretrained, "epochs": config.epochs,
            "batch_size": config.batch_size, "lr": config.lr, "loss": config.loss, "folds": config.folds,
            "seed": config.seed, "limit": config.limit, "horizontal_flip": config.horizontal_flip,
            "tta_angles": config.tta_angles, "ensemble": config.ensemble, "aux_weight": config.aux_weight,
            "aux_heads": config.aux_heads, "reshoot": config.reshoot, "ruler_statistic": model.ruler_statistic,
            "early_scale": config.early_scale, "full_size_epochs": config.full_size_epochs,
            "frozen_blocks": config.frozen_blocks, "ema_decay": config.ema_decay,
            "portrait_input": model.portrait_input, "ruler_blend": model.ruler_blend,
            "fit_ruler_blend": config.fit_ruler_blend}


def test_cli_train_and_retrain_build_the_same_recipe(tmp_path):
    """Before: retrain dropped TTA, the fold ensemble, the auxiliary heads and the pretrained switch. Both recipes
    are held to the values the settings name (both call `recipe_from_settings`, so comparing them with each other
    could not fail)."""
    settings = make_settings(tmp_path / "home", backbone="resnet18", mode="dual", image_size=96, proj_dim=0,
                             epochs=3, folds=3, lr=3e-4, tta=False, ensemble=True, aux_weight=0.5, pretrained=False,
                             reshoot=0.25, horizontal_flip=True, grayscale=True, seed=7, batch_size=8,
                             aux_heads=["portrait", "mint"], ruler_statistic="mean", early_scale=0.5,
                             full_size_epochs=1, frozen_blocks=2, ema_decay=0.95, portrait_input="fused",
                             ruler_blend=0.3)
    expected = {"backbone": "resnet18", "mode": "dual", "proj_dim": 0, "grayscale": True, "image_size": 96,
                "pretrained": False, "epochs": 3, "batch_size": 8, "lr": 3e-4, "loss": "interval", "folds": 3,
                "seed": 7, "limit": None, "horizontal_flip": True, "tta_angles": (), "ensemble": True,
                "aux_weight": 0.5, "aux_heads": ("portrait", "mint"), "reshoot": 0.25, "ruler_statistic": "mean",
                "early_scale": 0.5, "full_size_epochs": 1, "frozen_blocks": 2, "ema_decay": 0.95,
                "portrait_input": "fused", "ruler_blend": 0.3, "fit_ruler_blend": False}
    assert recipe_fields(retrain.recipe(settings)) == expected
    assert recipe_fields(cli_recipe(settings)) == expected
    # without settings: the defaults, written out, in both
    defaults = {"backbone": "efficientnet_lite0", "mode": "shared", "proj_dim": 256, "grayscale": False,
                "image_size": 192, "pretrained": True, "epochs": 6, "batch_size": 4, "lr": 1e-3, "loss": "interval",
                "folds": 0, "seed": 42, "limit": None, "horizontal_flip": False,
                "tta_angles": (-20.0, -10.0, 0.0, 10.0, 20.0), "ensemble": False, "aux_weight": 1.0,
                "aux_heads": ("portrait",), "reshoot": 0.5, "ruler_statistic": "median",
                "early_scale": 1.0, "full_size_epochs": 2, "frozen_blocks": 3, "ema_decay": 0.0,
                "portrait_input": "obverse", "ruler_blend": 0.5, "fit_ruler_blend": False}
    plain = make_settings(tmp_path / "plain")
    assert recipe_fields(retrain.recipe(plain)) == defaults
    assert recipe_fields(cli_recipe(plain)) == defaults


def test_flags_override_the_settings_and_zero_is_a_value(tmp_path):
    settings = make_settings(tmp_path / "home", folds=3, epochs=4)
    config = cli_recipe(settings, "--lr", "0.01", "--folds", "0", "--epochs", "1", "--no-tta", "--aux-weight", "0",
                        "--reshoot", "0")
    assert (config.lr, config.folds, config.epochs, config.tta_angles, config.aux_weight) == (0.01, 0, 1, (), 0.0)
    assert config.reshoot == 0.0
    frozen = make_settings(tmp_path / "frozen", frozen_blocks=3, ema_decay=0.99)
    assert (cli_recipe(frozen).frozen_blocks, cli_recipe(frozen).ema_decay) == (3, 0.99)
    config = cli_recipe(frozen, "--frozen-blocks", "0", "--ema-decay", "0")
    assert (config.frozen_blocks, config.ema_decay) == (0, 0.0)
    assert cli_recipe(frozen, "--portrait-input", "fused").model.portrait_input == "fused"
    fitted = cli_recipe(frozen, "--ruler-blend", "fit")
    assert (fitted.fit_ruler_blend, cli_recipe(frozen, "--ruler-blend", "0.2").model.ruler_blend) == (True, 0.2)
    assert cli_recipe(make_settings(tmp_path / "fit", ruler_blend="fit")).fit_ruler_blend


def test_make_train_best_runs_the_recipe_it_was_measured_with(tmp_path):
    """benchmarks/README.md's `make train-best` figures (1 h 46 min, MAE 8.64) are of 32 coins a step with the
    fused portrait head, for up to 12 epochs on 5 folds: the Makefile's command must still build that recipe
    although the demo's defaults have moved (4 coins a step, the obverse head)."""
    dry = subprocess.run(["make", "-n", "--no-print-directory", "train-best", "BIN=bin"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    command = [line for line in dry.stdout.replace("\\\n", " ").splitlines() if "coinyear train" in line]
    assert len(command) == 1, dry.stdout
    flags = shlex.split(command[0].split("coinyear train", 1)[1])
    config = cli_recipe(make_settings(tmp_path / "home"), *flags)
    assert (config.batch_size, config.model.portrait_input, config.epochs, config.folds) == (32, "fused", 12, 5)
    assert config.fit_ruler_blend  # its five folds' coins chose the blend
    assert "--promote" in flags and flags[flags.index("--promote") + 1] == "staging"


@pytest.mark.parametrize(("flags", "message"), [
    (["--lr", "0"], "lr: Input should be greater than 0, got 0.0"),
    (["--lr=-1e-3"], "lr: Input should be greater than 0"),
    (["--lr", "inf"], "lr: Input should be a finite number"),
    (["--epochs", "0"], "epochs: Input should be greater than or equal to 1"),
    (["--batch-size", "0"], "batch_size: Input should be greater than or equal to 1"),
    (["--image-size", "0"], "image_size: Input should be greater than or equal to 32"),
    (["--folds", "1"], "folds must be 0 (one grouped hold-out) or at least 2"),
    (["--ruler-blend", "1.5"], "ruler_blend: Input should be less than or equal to 1"),
    (["--ruler-blend", "half"], "ruler_blend: Input should be a valid number"),
    (["--aux-weight=-1"], "aux_weight: Input should be greater than or equal to 0"),
    (["--reshoot", "1.5"], "reshoot: Input should be less than or equal to 1"),
    (["--aux-heads", "portrait,legend"], "aux_heads: Input should be 'mint', 'denomination' or 'portrait'"),
    (["--limit", "0"], "limit must be none or an integer >= 1"),
    (["--early-scale", "0"], "early_scale: Input should be greater than 0"),
    (["--early-scale", "1.5"], "early_scale: Input should be less than or equal to 1"),
    (["--full-size-epochs", "0"], "full_size_epochs: Input should be greater than or equal to 1"),
    (["--frozen-blocks=-1"], "frozen_blocks: Input should be greater than or equal to 0"),
    (["--ema-decay", "1"], "ema_decay: Input should be less than 1"),
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


def test_invalid_settings_are_refused_before_any_recipe(tmp_path):
    """The settings carry the recipe's rules: a bad COINYEAR_EPOCHS never reaches the retraining job's recipe."""
    with pytest.raises(ValueError, match="epochs\n  Input should be greater than or equal to 1"):
        make_settings(tmp_path / "home", epochs=0)
    with pytest.raises(ValueError, match="lr\n  Input should be greater than 0"):
        make_settings(tmp_path / "home", lr=0.0)
    with pytest.raises(ValueError, match="invalid training recipe: ensemble needs folds >= 2"):
        retrain.recipe(make_settings(tmp_path / "home", ensemble=True))


def test_progressive_resizing_trains_only_the_last_epochs_at_the_served_size(tmp_path):
    """`early_size` is what the epoch loop shrinks a batch to: every epoch but the last `full_size_epochs` at
    `early_scale` of the image size; off at scale 1; a short run (a refit, a test) trains at full size."""
    config = cli_recipe(make_settings(tmp_path / "home", image_size=192, epochs=6, early_scale=2 / 3,
                                      full_size_epochs=2))
    assert [config.early_size(epoch, 6) for epoch in range(1, 7)] == [128, 128, 128, 128, None, None]
    assert [config.early_size(epoch, 3) for epoch in range(1, 4)] == [128, None, None]  # a 3-epoch refit
    assert [config.early_size(epoch, 2) for epoch in range(1, 3)] == [None, None]
    plain = cli_recipe(make_settings(tmp_path / "plain", epochs=6))
    assert all(plain.early_size(epoch, 6) is None for epoch in range(1, 7))
    tiny = cli_recipe(make_settings(tmp_path / "tiny", image_size=40, early_scale=0.5, epochs=4))
    assert tiny.early_size(1, 4) == 32  # never below the smallest size the backbones take
