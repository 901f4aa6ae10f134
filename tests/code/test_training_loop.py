"""The CPU training loop: freed memory is kept while it trains (glibc is told so, and restored after; the PyTorch
scoring fallback runs the same way), the trained model comes back in the ordinary memory layout, the final
calibration scores every coin once, not with the rotation TTA, and no fit, early stop or calibration ever sees a
test coin type."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from coinyear import experiment, runtime
from coinyear import fit as fit_module
from coinyear.backbones import early_stages
from coinyear.calibrate import BLENDS
from coinyear.experiment import fit_quality, new_model
from coinyear.fit import CoinDataset, fit
from coinyear.model import CoinEnsemble, infer
from coinyear.quality import SCALES
from coinyear.runtime import TORCH_BATCH, reused_memory, torch_infer
from tests.conftest import small_train_config


class RecordingLibc:
    """A stand-in for glibc's malloc controls: records each call; `mallopt` answers `accepts` (1 = done)."""

    def __init__(self, accepts: int = 1):
        self.calls: list[tuple] = []
        self.accepts = accepts

    def mallopt(self, option: int, value: int) -> int:
        self.calls.append(("mallopt", option, value))
        return self.accepts

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h


def test_reused_memory_keeps_freed_memory_while_training_then_restores_glibc(monkeypatch):
    """What reused_memory asks of glibc, checked on a recorder: no fresh mmap per big block and no trimming while
    the block runs, nothing more for a nested block, glibc's defaults and the memory back when the outermost
    block ends, also when training raises. (This replaces
    counting page faults of real allocations, which measured the machine's glibc and kernel, not this code.)"""
    libc = RecordingLibc()
    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda name: libc)
    with reused_memory():
        assert libc.calls == [("mallopt", M_MMAP_MAX, 0), ("mallopt", M_TRIM_THRESHOLD, -1)]  # -1: no trimming
        with reused_memory():  # nested (the epoch loop's validation scoring): changes and restores nothing
            pass
        assert len(libc.calls) == 2
    restored = [("mallopt", M_MMAP_MAX, 65536), ("mallopt", M_TRIM_THRESHOLD, 128 * 1024), ("malloc_trim", 0)]
    assert libc.calls[2:] == restored
    libc.calls.clear()
    with pytest.raises(RuntimeError, match="training broke"), reused_memory():
        raise RuntimeError("training broke")
    assert libc.calls[2:] == restored


def test_reused_memory_changes_nothing_where_glibc_does_not_take_it(monkeypatch):
    """A libc that refuses the option (or none: musl, macOS) is left as it is: nothing to restore."""
    refusing = RecordingLibc(accepts=0)
    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda name: refusing)
    with reused_memory():
        pass
    assert [call[0] for call in refusing.calls] == ["mallopt"]  # refused at once: no restore, no trim

    def no_libc(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(runtime.ctypes, "CDLL", no_libc)
    with reused_memory():
        pass


def test_the_pytorch_fallback_scores_like_infer_channels_last_in_kept_memory_batches(monkeypatch):
    """A model served without an ONNX graph (`torch_infer`): the same answers as `infer` on the whole batch, the
    network convolving channels-last batches of at most TORCH_BATCH coins, all inside one `reused_memory` block."""
    config = small_train_config()
    count = TORCH_BATCH + 4
    fronts, backs, year_from, year_to = _tiny_data(count=count)
    model = CoinEnsemble([new_model(config, year_from, year_to)], (0.0, 90.0)).eval()  # as a loaded model is
    front, back = (torch.from_numpy(side).float() / 255 for side in (fronts, backs))
    expected = infer(model, front, back, True)
    blocks, batches = [], []
    opened = runtime.reused_memory

    @contextlib.contextmanager
    def recording_block():
        blocks.append("open")
        with opened():
            yield

    stem = next(module for module in model.modules() if isinstance(module, torch.nn.Conv2d))
    stem.register_forward_hook(lambda module, inputs, output: batches.append(
        (len(output), output.is_contiguous(memory_format=torch.channels_last))))
    monkeypatch.setattr(runtime, "reused_memory", recording_block)
    got = torch_infer(model, front, back, True)
    assert blocks == ["open"]
    photos_per_coin = 2 * 2  # both sides through the shared backbone, at each of the 2 angles
    assert [size for size, _ in batches] == [TORCH_BATCH * photos_per_coin, 4 * photos_per_coin]
    assert all(channels_last for _, channels_last in batches)
    assert set(got) == set(expected)
    for key in expected:
        assert torch.allclose(got[key], expected[key], atol=1e-4), (key, (got[key] - expected[key]).abs().max())


def _tiny_data(count=24, size=64, seed=0):
    rng = np.random.default_rng(seed)
    fronts = rng.integers(0, 255, (count, 3, size, size), dtype=np.uint8)
    backs = rng.integers(0, 255, (count, 3, size, size), dtype=np.uint8)
    year_from = rng.integers(-50, 200, count)
    return fronts, backs, year_from, year_from + 10


def test_cpu_fit_trains_channels_last_and_returns_an_ordinary_model():
    config = small_train_config(batch_size=8, epochs=2)
    fronts, backs, year_from, year_to = _tiny_data(count=16)
    model = new_model(config, year_from, year_to)
    before = [p.detach().clone() for p in model.parameters()]
    history = fit(model, CoinDataset(fronts, backs, year_from, year_to), config,
                  CoinDataset(fronts, backs, year_from, year_to, index=np.arange(8)))
    assert len(history) == 2 and all(np.isfinite(h["train_loss"]) for h in history)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.is_contiguous() for p in model.parameters())
    assert next(model.parameters()).device.type == "cpu"


def test_progressive_resizing_shrinks_the_early_epochs_and_validates_at_the_served_size():
    """With early_scale 0.5 and one full-size epoch of three, the network's training batches are 32 px in epochs 1
    and 2 and 64 px (the served size) in epoch 3; validation passes are always 64 px, and the history says the
    size each epoch trained at."""
    config = small_train_config(batch_size=8, epochs=3, early_scale=0.5, full_size_epochs=1)
    fronts, backs, year_from, year_to = _tiny_data(count=16)
    model = new_model(config, year_from, year_to)
    seen: list[tuple[bool, int]] = []  # (training?, photo size) of every pass through the stem's convolution
    stem = next(module for module in model.modules() if isinstance(module, torch.nn.Conv2d))
    stem.register_forward_pre_hook(lambda module, inputs: seen.append((module.training, inputs[0].shape[-1])))
    history = fit(model, CoinDataset(fronts, backs, year_from, year_to), config,
                  CoinDataset(fronts, backs, year_from, year_to, index=np.arange(8)))
    assert [h["train_image_size"] for h in history] == [32.0, 32.0, 64.0]
    training = [size for is_training, size in seen if is_training]
    assert training == [32] * 4 + [64] * 2  # 2 batches of 8 per epoch, the shared backbone sees both sides at once
    assert {size for is_training, size in seen if not is_training} == {64}


@pytest.mark.parametrize("backbone", ["mobilenet_v3_small", "efficientnet_lite0", "resnet18"])
def test_frozen_blocks_keep_the_stem_and_first_stages_as_they_were(backbone):
    """With frozen_blocks 2 the stem and the first two stages of a pretrained backbone keep every weight and
    BatchNorm statistic through training (eval mode while the rest trains), the later stages and heads move, and
    the model comes back with every weight trainable; more blocks than the backbone has is refused by name, and a
    backbone without pretrained weights is never frozen."""
    config = small_train_config(batch_size=8, epochs=2, frozen_blocks=2, model={"backbone": backbone})
    fronts, backs, year_from, year_to = _tiny_data(count=16)
    model = new_model(config, year_from, year_to)
    model.pretrained_loaded = True  # as with ImageNet weights on disk (what the freezing keeps)
    stages = early_stages(model.front_net)
    prefix = {id(module): name for name, module in model.named_modules()}

    def names(modules) -> list[str]:  # their entries in the model's state dict
        return [name for name in model.state_dict() for m in modules if name.startswith(prefix[id(m)] + ".")]

    kept, later = names([m for stage in stages[:3] for m in stage]), names(stages[3])
    before = {name: value.clone() for name, value in model.state_dict().items()}
    fit(model, CoinDataset(fronts, backs, year_from, year_to), config,
        CoinDataset(fronts, backs, year_from, year_to, index=np.arange(8)))
    after = model.state_dict()
    assert kept and all(torch.equal(before[name], after[name]) for name in kept)
    assert any("running_mean" in name for name in kept)  # the BatchNorm statistics too
    assert later and any(not torch.equal(before[name], after[name]) for name in later)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match=f"frozen_blocks {len(stages)}: the {backbone} backbone has "
                                         f"{len(stages) - 1} stages"):
        fit(model, CoinDataset(fronts, backs, year_from, year_to),
            small_train_config(frozen_blocks=len(stages), model={"backbone": backbone}))
    scratch = new_model(config, year_from, year_to)
    scratch.pretrained_loaded = False  # random weights are never frozen
    assert fit_module.freeze_early_stages(scratch, 2) == []


def test_ema_validates_and_returns_the_weights_moving_average(monkeypatch):
    """With ema_decay, validation judges the averaged copy, not the network being stepped, and the weights that
    come back are that average: with a decay of nearly 1 it stays at the first step's weights, far closer to
    where training started than the weights as trained."""
    config = small_train_config(batch_size=4, epochs=2, early_stopping=False)
    fronts, backs, year_from, year_to = _tiny_data(count=16)
    start = new_model(config, year_from, year_to).state_dict()
    original = fit_module.validation_years

    def trained(decay: float):
        model = new_model(config, year_from, year_to)
        model.load_state_dict(start)
        judged: list = []
        monkeypatch.setattr(fit_module, "validation_years",
                            lambda m, val, device: judged.append(m) or original(m, val, device))
        fit(model, CoinDataset(fronts, backs, year_from, year_to), replace(config, ema_decay=decay),
            CoinDataset(fronts, backs, year_from, year_to, index=np.arange(8)))
        distance = sum(float((p.detach() - start[name]).norm()) for name, p in model.named_parameters())
        return model, judged, distance

    plain, plain_judged, plain_distance = trained(0.0)
    averaged, averaged_judged, averaged_distance = trained(0.999999)
    assert all(m is plain for m in plain_judged) and len(plain_judged) == 2
    assert len(averaged_judged) == 2 and all(m is not averaged for m in averaged_judged)
    assert 0 < averaged_distance < plain_distance / 3


def test_final_calibration_scores_every_coin_once(monkeypatch):
    config = small_train_config()
    fronts, backs, year_from, year_to = _tiny_data(count=12)
    member = new_model(config, year_from, year_to).eval()
    served = CoinEnsemble([member], config.tta_angles)
    expected = infer(served, torch.from_numpy(fronts).float() / 255, torch.from_numpy(backs).float() / 255,
                     with_features=True)["features"]
    calls = []
    original = CoinEnsemble.heads  # every scoring pass runs the heads once

    def counted(self, front, back, with_features=False):
        calls.append(len(self.tta_angles))
        return original(self, front, back, with_features)

    monkeypatch.setattr(CoinEnsemble, "heads", counted)
    table = {"predicted": year_from + 3.0, "year_from": year_from, "year_to": year_to,
             "spread": np.ones(len(year_from))}
    quality = fit_quality(served, fronts, backs, np.arange(len(year_from)) % 3, table, config, torch.device("cpu"))
    # one plain pass (a one-angle ensemble) per batch, never the 5 rotations, and the features the server compares
    assert calls and set(calls) == {1}
    assert len(config.tta_angles) == 5
    reference = fit_module.infer_arrays(member, fronts, backs, with_features=True)["features"]
    assert np.allclose(reference, expected.numpy(), atol=1e-5)
    assert np.isfinite(quality.ood.threshold)
    assert quality.ood.portrait_floor == 0  # no portraits given: no portrait flag


def test_the_portrait_flag_floor_is_the_stated_quantile_of_the_validation_coins():
    """With the served portrait probabilities of enough validation coins, the floor flags `portrait_flag_rate`
    of them (the view flag and the era-shift score their stated shares likewise); the range's scale is chosen
    among SCALES."""
    config = small_train_config(portrait_flag_rate=0.1, view_flag_rate=0.05, shift_flag_rate=0.1,
                                model={"aux_classes": {"portrait": 3},
                                                               "aux_names": {"portrait": ["A", "B", "other"]}})
    count = experiment.MIN_FLAG_CALIBRATION
    fronts, backs, year_from, year_to = _tiny_data(count=count, size=32)
    labels = np.arange(count) % 3
    served = CoinEnsemble([new_model(config, year_from, year_to, {"portrait": labels}).eval()], (0.0, 10.0))
    portraits = np.random.default_rng(0).dirichlet(np.ones(3), count)
    table = {"predicted": year_from + 3.0, "year_from": year_from, "year_to": year_to,
             "spread": np.ones(count)}
    quality = fit_quality(served, fronts, backs, np.arange(count) % 7, pd.DataFrame(table), config,
                          torch.device("cpu"), portraits=portraits)
    assert quality.ood.portrait_floor == pytest.approx(np.quantile(portraits.max(axis=1), 0.1))
    assert quality.ood.unsure_portrait(portraits).mean() == pytest.approx(0.1, abs=0.011)
    assert quality.conformal.by in SCALES
    assert quality.ood.disagreement_ceiling == 0  # no disagreement given: no view flag
    # what the test report flags with (`experiment.score_test_rows`): the array scoring gives the signal too
    scored = fit_module.infer_arrays(served, fronts, backs, with_features=True)
    assert scored["disagreement"].shape == (count,) and (scored["disagreement"] >= 0).all()
    disagreement = np.random.default_rng(1).gamma(1.0, 0.1, count)
    quality = fit_quality(served, fronts, backs, np.arange(count) % 7, pd.DataFrame(table), config,
                          torch.device("cpu"), portraits=portraits, disagreement=disagreement)
    assert quality.ood.views_disagree(disagreement).mean() == pytest.approx(config.view_flag_rate, abs=0.011)
    assert quality.ood.shift_ceiling == 0  # no rows of the predictions placed among the reference: no shift score
    # with the rows placed (the training run's validation coins), the era-shift score flags `shift_flag_rate` of
    # them, each scored without the reference coins of its own type
    groups = np.arange(count) % 7
    quality = fit_quality(served, fronts, backs, groups, pd.DataFrame(table), config, torch.device("cpu"),
                          portraits=portraits, disagreement=disagreement, predicted_rows=np.arange(count))
    assert 0 < quality.ood.shift_ceiling < 1 and quality.ood.shift_scale.shape == (2, count)
    score = quality.ood.shift_score(scored["embedding"], disagreement, groups=groups, reference_groups=groups)
    assert (score > quality.ood.shift_ceiling).mean() == pytest.approx(config.shift_flag_rate, abs=0.011)
    flagged = quality.ood.era_shifted(scored["embedding"], disagreement)
    assert flagged.shape == (count,) and flagged.dtype == bool


def test_the_served_year_blends_the_ruler_mixture_of_the_portrait_head():
    """With a portrait head each class gets its training coins' median year, and the served year is the mean of
    the regression head's year and the ruler mixture (ruler_blend 0.5); the training loss sees the regression's."""
    config = small_train_config(model={"aux_classes": {"portrait": 3}, "pretrained": False})
    labels = np.array([0, 0, 1, 1, 2, -100, 2])
    year_from = np.array([10, 20, 50, 60, 100, 0, 110])
    model = new_model(config, year_from, year_from, {"portrait": labels}, np.arange(7)).eval()
    assert model.portrait_years.tolist() == [15.0, 55.0, 105.0]
    fronts, backs, _, _ = _tiny_data(count=4)
    front, back = torch.from_numpy(fronts).float() / 255, torch.from_numpy(backs).float() / 255
    with torch.no_grad():
        features = model.features(front, back)
        regression = model.regression_year(features)
        ruler = torch.softmax(model.aux_heads["portrait"](features), dim=1) @ model.portrait_years
        torch.testing.assert_close(model(front, back), 0.5 * regression + 0.5 * ruler)
        torch.testing.assert_close(model.forward_with_aux(front, back)[0], regression)
    assert not torch.allclose(regression, ruler)  # the blend is not trivially the regression


def test_the_flag_threshold_is_calibrated_on_unseen_coins():
    """Scores of the rows given as `calibration` alone set the threshold (their quantile), not every row's."""
    from coinyear.quality import FeatureDistance

    rng = np.random.default_rng(0)
    features = np.abs(rng.normal(size=(60, 8)))
    groups = np.arange(60) // 2
    unseen = np.zeros(60, dtype=bool)
    unseen[:20] = True
    everyone = FeatureDistance.fit(features, groups, k=3, quantile=0.95)
    calibrated = FeatureDistance.fit(features, groups, k=3, quantile=0.95, calibration=unseen)
    scores = everyone.score(features, groups=groups)
    assert calibrated.threshold == float(np.quantile(scores[unseen], 0.95))
    assert calibrated.threshold != everyone.threshold


def test_reshoot_changes_the_photo_like_a_collectors_and_keeps_its_form():
    """A re-shot photo is another uint8 photo of the same size; the white background is what changes most,
    and p = 0 leaves every photo as it was."""
    from coinyear.augment import Reshoot

    photo = torch.full((3, 64, 64), 250, dtype=torch.uint8)
    photo[:, 16:48, 16:48] = 120  # a grey "coin" on a white background
    torch.manual_seed(0)
    shots = [Reshoot(p=1.0)(photo) for _ in range(40)]
    assert all(shot.dtype == torch.uint8 and shot.shape == photo.shape for shot in shots)
    corner_moved = np.mean([float((shot[:, :4, :4].float() - 250).abs().mean()) for shot in shots])
    centre_moved = np.mean([float((shot[:, 30:34, 30:34].float() - 120).abs().mean()) for shot in shots])
    assert corner_moved > 20 and corner_moved > centre_moved
    assert torch.equal(Reshoot(p=0.0)(photo), photo)


def recording_fit(monkeypatch) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """`fit` replaced by a recorder of the rows each call trains and validates on, (name, train, validation);
    nothing is trained: the untrained model still predicts, is calibrated and is scored like a trained one."""
    calls = []

    def fake_fit(model, train, config, val=None, name="fit", on_epoch=None, epochs=None, trace=None):
        calls.append((name, train.index.copy(), None if val is None else val.index.copy()))
        return [{"epoch": 1, "train_loss": 0.0, "best": True}]

    monkeypatch.setattr(experiment, "fit", fake_fit)
    return calls


@pytest.mark.parametrize("folds", [0, 2])
def test_training_never_fits_stops_or_calibrates_on_a_test_coin_type(monkeypatch, ocre_dir, tmp_path, folds):
    """Neither the hold-out nor K-fold (its folds and its refit) fit or validate on a test coin type; the
    calibration and the OOD reference leave them out; the served model is scored on exactly them once."""
    from coinyear.data import is_test_type, read_manifest

    calls = recording_fit(monkeypatch)
    # the hold-out serves the recipe's fixed ruler blend (the default); the folds fit it on their coins
    config = small_train_config(folds=folds, model={"pretrained": False, "ruler_blend": 0.3},
                                fit_ruler_blend=bool(folds))
    manifest = read_manifest(ocre_dir, limit=config.limit, seed=config.seed)
    rows = manifest.rows
    test = is_test_type(rows["group"])
    assert 0 < test.sum() < len(rows) / 3
    result = experiment.train_on_manifest(manifest, config, tmp_path / "cache")
    assert [name for name, _, _ in calls] == (["holdout"] if folds == 0 else ["fold1", "fold2", "final"])
    for name, fitted, validated in calls:
        assert not test[fitted].any(), name
        assert validated is None or (len(validated) and not test[validated].any()), name
    if folds:  # the refit trains on every coin outside the test types
        assert sorted(calls[-1][1]) == list(np.flatnonzero(~test))
    # the validation predictions (val_* metrics, the conformal calibration) hold no test coin
    assert not set(result.predictions["coin_id"]) & set(rows["coin_id"][test])
    assert len(result.quality.conformal.scores) == len(result.predictions) == result.metrics["val_count"]
    assert len(result.quality.ood.reference) == int((~test).sum())  # a test coin is nobody's neighbour
    # the test coins: scored by the served model, reported as test_*
    assert list(result.test_predictions["coin_id"]) == list(rows["coin_id"][test])
    assert result.metrics["test_count"] == test.sum()
    for key in ("test_mae", "test_within_10y", "test_interval90_coverage", "test_interval90_median_width",
                "test_ood_flagged", "test_portrait_top1", "test_portrait_top3", "test_mae_portrait_right",
                "test_mae_portrait_wrong"):
        assert key in result.metrics, key
    assert {"portrait_1", "portrait_2", "portrait_3", "low", "high"} <= set(result.test_predictions.columns)
    # the post-hoc levers (coinyear.calibrate), fitted on the validation coins and carried by the served model
    served = result.model.config
    assert served.portrait_temperature == result.metrics["portrait_temperature"] > 0
    assert served.ruler_blend == result.metrics["ruler_blend"]
    assert served.ruler_blend in BLENDS if folds else served.ruler_blend == 0.3
    assert served.ruler_pooled == bool(result.metrics["ruler_pooled"])
    assert result.metrics["val_mae"] == pytest.approx(result.metrics["val_mae_levers"])  # val_* as now served
    assert result.quality.conformal.by in SCALES
    # no portrait flag: off by default (it lost on era_shift.py), and fewer validation coins than
    # MIN_FLAG_CALIBRATION would give none either (a quantile of so few is noise)
    assert len(result.predictions) < experiment.MIN_FLAG_CALIBRATION
    assert result.quality.ood.portrait_floor == result.metrics["portrait_floor"] == 0
