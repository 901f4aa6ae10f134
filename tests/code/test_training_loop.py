"""The CPU training loop: freed memory is reused (no page-fault churn), the trained model comes back in the
ordinary memory layout, and the final calibration scores every coin once, not with the rotation TTA."""

from __future__ import annotations

import resource

import numpy as np
import torch

from coinyear import train as train_module
from coinyear.model import CoinEnsemble, infer
from coinyear.train import CoinDataset, fit, fit_quality, new_model, reused_memory
from tests.conftest import small_train_config


def _faults_of_big_allocations(times: int = 8) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(times):
        torch.empty(64 << 20, dtype=torch.uint8).fill_(1)  # 64 MiB touched, then freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_reused_memory_stops_the_page_fault_churn():
    plain = _faults_of_big_allocations()
    with reused_memory():
        _faults_of_big_allocations(2)  # the heap grows to fit the block
        reused = _faults_of_big_allocations()
    assert plain > 8 * 10_000  # 64 MiB = 16k pages faulted in at every allocation
    # kept pages are reused (an occasional small object on top of the heap can still make it grow once)
    assert reused <= plain / 4


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


def test_final_calibration_scores_every_coin_once(monkeypatch):
    config = small_train_config()
    fronts, backs, year_from, year_to = _tiny_data(count=12)
    member = new_model(config, year_from, year_to).eval()
    served = CoinEnsemble([member], config.tta_angles)
    expected = infer(served, torch.from_numpy(fronts).float() / 255, torch.from_numpy(backs).float() / 255,
                     with_features=True)["features"]
    calls = []
    original = CoinEnsemble.scores

    def counted(self, front, back, with_features=False):
        calls.append(len(self.tta_angles))
        return original(self, front, back, with_features)

    monkeypatch.setattr(CoinEnsemble, "scores", counted)
    table = {"predicted": year_from + 3.0, "year_from": year_from, "year_to": year_to,
             "spread": np.ones(len(year_from))}
    quality = fit_quality(served, fronts, backs, np.arange(len(year_from)) % 3, table, config, torch.device("cpu"))
    # one plain pass (a one-angle ensemble) per batch, never the 5 rotations, and the features the server compares
    assert calls and set(calls) == {1}
    assert len(config.tta_angles) == 5
    reference = train_module.infer_arrays(member, fronts, backs, with_features=True)["features"]
    assert np.allclose(reference, expected.numpy(), atol=1e-5)
    assert np.isfinite(quality.ood.threshold)
