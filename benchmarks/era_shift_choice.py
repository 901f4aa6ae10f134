"""Choose the out-of-span signal on one era-shift run and read it on another, without retraining.

`era_shift.py --arrays DIR` keeps every coin's embeddings, portrait logits and signals. This script computes
further candidate signals from them (the fused embedding's k nearest for several k, the same distance divided by
the neighbours' own (local outlier factor style, Breunig et al. 2000), the distance to the training coins of the
portrait the head names, and mean ranks of two or three signals), reports each one's AUROC on every run given,
and names the best on the first (the choice set: `--cutoff 98`, Trajan and Hadrian out of span). A signal is
chosen there and only then read on the others (`--cutoff 117`, Hadrian's coins): keeping the best row of the
second table would choose on the set that reports.

    python benchmarks/era_shift_choice.py /tmp/esarr98 /tmp/esarr117 --name choice-seed42

A few seconds per run.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from coinyear.quality import leave_type_out, nearest_mean

# isort: split
from common import results_parser, write_results
from era_shift import VIEWS, cosine_distances, ranks, signal_report

IN, OUT = "in_span_holdout", "out_of_span"


def candidate_signals(coins: dict, name: str) -> dict[str, np.ndarray]:
    """Every candidate signal of the coins of set `name` (higher = more likely out of span)."""
    reference = coins["reference_fused"].astype(np.float32)
    groups = coins["reference_groups"]
    fused = coins[f"{name}/fused"].astype(np.float32)
    distance = cosine_distances(reference, fused)
    out = {f"fused {k} nearest": nearest_mean(distance, k) for k in (1, 5, 10, 20, 50)}
    # the reference rows' own 10-nearest distances, their own coin type left out (a new type's view of them)
    own = leave_type_out(cosine_distances(reference, reference), groups, groups)
    own_k = nearest_mean(own, 10)
    nearest = np.argpartition(distance, 9, axis=1)[:, :10]
    out["fused 10 nearest / theirs (LOF)"] = out["fused 10 nearest"] / own_k[nearest].mean(axis=1)
    logits = coins[f"{name}/logits"].astype(np.float64)  # [N, members, angles, classes]
    probabilities = torch.softmax(torch.from_numpy(logits), -1).mean(dim=(1, 2)).numpy()
    energy = -torch.logsumexp(torch.from_numpy(logits), -1).mean(dim=(1, 2))
    out["portrait energy (rotations averaged)"] = energy.numpy()
    out["portrait uncertainty (rotations averaged)"] = 1 - probabilities.max(axis=1)
    # the distance to the training coins of the portrait the head names (all of them when it names none of them)
    # (the head's classes: the commonest catalogue portraits of the reference coins, then "other", as
    # `experiment.aux_labels` picks them from the same rows)
    portraits = coins["reference_portraits"].astype(str)
    known = pd.Series(portraits[portraits != ""])
    classes = np.array([*known.value_counts().index[:logits.shape[-1] - 1], "other"])
    same = portraits[None, :] == classes[probabilities.argmax(axis=1)][:, None]
    same[~same.any(axis=1)] = True
    out["fused 10 nearest of the named portrait"] = nearest_mean(np.where(same, distance, np.inf), 10)
    out[VIEWS] = coins[f"{name}/signal: {VIEWS}"]
    return out


def with_mean_ranks(signals: dict[str, dict[str, np.ndarray]]) -> None:
    """Adds, in place, the mean rank (among the in-span coins' values) of every pair and triple of a few
    signals."""
    parts = ["fused 10 nearest", "fused 10 nearest / theirs (LOF)", VIEWS, "portrait energy (rotations averaged)",
             "portrait uncertainty (rotations averaged)"]
    parts = [p for p in parts if p in signals[IN]]
    for size in (2, 3):
        for chosen in itertools.combinations(parts, size):
            label = "mean rank: " + " + ".join(chosen)
            for name in signals:
                signals[name][label] = np.mean([ranks(signals[IN][p], signals[name][p]) for p in chosen], axis=0)


def report(folder: Path) -> dict[str, dict]:
    with np.load(folder / "coins.npz", allow_pickle=False) as data:
        coins = {key: data[key] for key in data.files}
    signals = {name: candidate_signals(coins, name) for name in (IN, OUT)}
    with_mean_ranks(signals)
    return {label: {**signal_report(signals[IN][label], signals[OUT][label]),
                    **signal_report(signals[IN][label], signals[OUT][label], 0.10)} for label in signals[IN]}


def main(argv=None) -> int:
    parser = results_parser(__doc__, "era_shift", "choice")
    parser.add_argument("runs", nargs="+", help="era_shift.py --arrays folders; the first is the choice set")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    runs = {str(folder): report(Path(folder)) for folder in args.runs}
    choice = max(runs[args.runs[0]], key=lambda label: runs[args.runs[0]][label]["auroc"])
    lines = [f"## {args.name}: the best on the choice set {args.runs[0]}: **{choice}**", "",
             "| signal | " + " | ".join(f"AUROC {Path(r).name}" for r in args.runs) + " |",
             "|---|" + "---|" * len(args.runs)]
    for label in runs[args.runs[0]]:
        lines.append(f"| {label} | " + " | ".join(f"{runs[r][label]['auroc']:.3f}" for r in args.runs) + " |")
    lines += ["", "That signal, out-of-span flagged at 5% / 10% in-span false alarms:"]
    lines += [f"* {Path(r).name}: {100 * runs[r][choice]['flagged_at_5pct_false_alarms']:.1f}% / "
              f"{100 * runs[r][choice]['flagged_at_10pct_false_alarms']:.1f}%" for r in args.runs]
    write_results(args.out, args.name, {"choice": choice, "runs": runs}, lines, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
