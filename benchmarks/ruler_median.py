"""The ruler mixture's median against its mean, on the served model's test coin types.

The served year blends the regression head with the ruler mixture, sum over portraits of p(portrait) x that
portrait's median training year (`ModelConfig.ruler_blend`). A mixture's mean is pulled between portraits; its
weighted median is the year that minimises the expected absolute error under the head's probabilities (the
frozen-stage benchmark found it 3.3 years better than the mean). The blend is applied at inference only (the
loss trains the regression head), so every estimate below comes from one scoring pass of the registered model,
photos as served (rotation TTA, probabilities averaged over rotations):

* served: (1 - w) x regression + w x mixture mean (what the model answers today);
* regression: the regression head alone, recovered from the served year (the mean is linear in p);
* mixture mean, mixture median;
* (1 - w) x regression + w x mixture median, and the median alone where the head is confident;
* what the network itself serves with `ModelConfig.ruler_statistic = "median"` (the median per rotation, then
  the rotations' mean), scored with PyTorch.

    COINYEAR_HOME=.coinyear python benchmarks/ruler_median.py --name demo

A few minutes on 2 cores (one pass over the ~400 test-type coins).
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import torch

from coinyear import evaluate
from coinyear.data import read_manifest, split_test
from coinyear.model import mixture_median
from coinyear.pyfunc import decode_pair, pair_tensors

# isort: split
# this folder's modules: a script's own folder is first on sys.path when it runs
from common import model_run, write_results


def main(argv=None) -> int:
    args, settings, started = model_run(__doc__, "ruler_median", argv)
    model = mlflow.pyfunc.load_model(args.model).unwrap_python_model()
    rows = read_manifest(settings.data_dir, settings.min_year, settings.max_year).rows
    rows = rows.iloc[split_test(rows)[1]].reset_index(drop=True)
    names = [name for name, _ in model.portraits]
    years = np.array([year for _, year in model.portraits], dtype=float)
    blend = model.model.config.ruler_blend

    config = model.model.config
    model.onnx = None  # PyTorch for every row below: the statistic is switched on the loaded network
    served, portraits, served_median = [], [], []
    for start in range(0, len(rows), 32):
        chunk = rows.iloc[start:start + 32]
        # decoded exactly as the served model decodes a request's photos
        fronts, backs = pair_tensors([decode_pair(Path(front).read_bytes(), Path(back).read_bytes(), model.size,
                                                  model.grayscale)
                                      for front, back in zip(chunk["obverse_path"], chunk["reverse_path"])])
        config.ruler_statistic = "mean"
        scored = model.score_tensors(fronts, backs, with_features=True)
        served.append(scored["year"])
        portraits.append(scored["portraits"])
        config.ruler_statistic = "median"  # what the network serves with ModelConfig.ruler_statistic = "median"
        served_median.append(model.score_tensors(fronts, backs)["year"])
    year, p = np.concatenate(served), np.concatenate(portraits)
    mean = p @ years
    regression = (year - blend * mean) / (1 - blend)
    median = mixture_median(torch.from_numpy(p), torch.from_numpy(years)).numpy()  # what the network computes
    confident = p.max(axis=1) >= 0.5
    estimates = {
        "served: (1 - w) regression + w mixture mean": year,
        "regression head": regression,
        "mixture mean": mean,
        "mixture median": median,
        "(1 - w) regression + w mixture median": (1 - blend) * regression + blend * median,
        "served with ruler_statistic = median (per rotation, then averaged)": np.concatenate(served_median),
        "median where top portrait >= 50%, else served": np.where(confident, median, year),
    }
    year_from, year_to = rows["year_from"].to_numpy(float), rows["year_to"].to_numpy(float)
    config.ruler_statistic = "mean"
    results = {label: evaluate.regression_metrics(values, year_from, year_to) for label, values in estimates.items()}
    report = {"model": args.model, "coins": len(rows), "ruler_blend": blend, "portrait_classes": names,
              "confident_share": float(confident.mean()), "estimates": results}
    lines = [f"## {args.name}: {args.model}, {len(rows)} test-type coins, ruler blend w = {blend}", "",
             "| estimate | MAE | range MAE | within ±10 y |", "|---|---:|---:|---:|"]
    lines += [f"| {label} | {m['mae']:.2f} | {m['range_mae']:.2f} | {100 * m['within_10y']:.1f}% |"
              for label, m in results.items()]
    lines.append(f"\nTop portrait at least 50% likely for {100 * confident.mean():.0f}% of the coins.")
    write_results(args.out, args.name, report, lines, started)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
