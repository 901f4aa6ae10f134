"""Three more post-hoc levers for portrait recognition, tried on a registered model and kept only if they win.

`levers.py` fitted what changes no weight (temperature, where the ruler mixture is taken, its weight, the range's
scale). Issue 23 named three more that need no training, each measured here on the same split (the run's own
validation coin types choose, the test types `data.split_test` only report):

* **class balance by logit adjustment**: the portrait logits minus tau x log(the class's share of the training
  coins), so rare emperors are not out-voted by common ones; tau in 0-1, the levers refitted for each tau;
* **scale TTA**: the network also scores each coin zoomed in (the centre 1/1.15, resized back) and zoomed out
  (shrunk to 0.87, the border colour around it), and those answers join the rotations' (never horizontal flips:
  a portrait's direction is part of the type);
* **similar coins for the portrait**: the portraits of the k most similar training coins (cosine of the
  network's embedding, softmax-weighted), blended with the head's probabilities by weight a.

For every variant the figures are the served ones (`calibrate.Heads.served`, the function the network serves
with), with the network's levers refitted on the validation types (`calibrate.fit_levers`) and the 90% range
recalibrated there (`calibrate.fit_ranges`). The network's head outputs are computed once per set and scale and
kept in `--heads` (reused by a second run).

    COINYEAR_HOME=/tmp/q23home python benchmarks/post_hoc.py --name demo-2026-12-06

About 15 minutes on 2 cores under load (the training coins' embeddings take most of it).
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from coinyear.calibrate import Heads, fit_levers, fit_ranges
from coinyear.data import ImageCache, load_arrays
from coinyear.fit import infer_arrays
from coinyear.quality import interval_metrics

sys.path.insert(0, str(Path(__file__).parent))
from common import model_parser, write_results  # the benchmarks' shared helper
from levers import portrait_labels, registered_split  # a sibling benchmark script

ZOOMS = (1.0, 1.15, 0.87)
TAUS = (0.0, 0.25, 0.5, 0.75, 1.0)
NEIGHBOURS = ((10, 0.05), (10, 0.1), (30, 0.05), (30, 0.1))
WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def zoom(images: np.ndarray, scale: float) -> np.ndarray:
    """uint8 images [N, C, H, W] zoomed in (scale > 1: the centre 1/scale, resized back) or out (scale < 1: shrunk,
    the border colour around it), at the same size."""
    t = torch.from_numpy(np.asarray(images)).float()
    size = t.shape[-1]
    if scale > 1:
        keep = int(round(size / scale))
        edge = (size - keep) // 2
        t = F.interpolate(t[:, :, edge:edge + keep, edge:edge + keep], size=(size, size), mode="bilinear",
                          antialias=True, align_corners=False)
    elif scale < 1:
        keep = int(round(size * scale))
        edge = (size - keep) // 2
        small = F.interpolate(t, size=(keep, keep), mode="bilinear", antialias=True, align_corners=False)
        t = F.pad(small, (edge, size - keep - edge, edge, size - keep - edge), mode="replicate")
    return t.round().clamp(0, 255).to(torch.uint8).numpy()


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def with_probabilities(part: Heads, probabilities: np.ndarray | None) -> Heads:
    """`part` with its portrait head's answers replaced by `probabilities` [N, C] (the same for every member and
    rotation); `part` itself when there are none."""
    if probabilities is None:
        return part
    logits = np.log(np.maximum(probabilities, 1e-9))[:, None, None, :]
    return replace(part, logits=np.broadcast_to(logits, part.logits.shape).copy())


def served_figures(part: Heads, config) -> tuple[dict, dict]:
    """MAE, ±10 y and portrait top-1/top-3 (among coins whose portrait is a named class) of what the network serves
    under `config`."""
    answer = part.served(config)
    error = np.abs(answer["year"] - (part.year_from + part.year_to) / 2)
    named = (part.labels >= 0) & (part.labels < part.logits.shape[-1] - 1)
    order = np.argsort(-answer["portraits"][named], axis=1)
    truth = part.labels[named]
    return ({"mae": float(error.mean()), "within_10y": float((error <= 10).mean()),
             "portrait_top1": float((order[:, 0] == truth).mean()),
             "portrait_top3": float((order[:, :3] == truth[:, None]).any(axis=1).mean())}, answer)


def measure(validation: Heads, test: Heads, config, years, val_probs=None, test_probs=None) -> dict:
    """One variant: the levers refitted on the validation coins, then the served figures and the recalibrated 90%
    range on both sets; `val_probs`, `test_probs` replace the portrait head's answers."""
    validation, test = with_probabilities(validation, val_probs), with_probabilities(test, test_probs)
    levers = fit_levers([validation], config)
    fitted = replace(config, portrait_temperature=levers.temperature, ruler_pooled=levers.ruler_pooled,
                     ruler_blend=levers.ruler_blend)
    val, val_answer = served_figures(validation, fitted)
    tst, test_answer = served_figures(test, fitted)
    ranges, _ = fit_ranges(val_answer, years, validation.year_from, validation.year_to)
    tst.update({f"interval90_{k}": v for k, v in
                interval_metrics(*ranges.ranges(test_answer, 0.9, years), test.year_from, test.year_to).items()})
    return {"levers": {"temperature": levers.temperature, "ruler_pooled": levers.ruler_pooled,
                       "ruler_blend": levers.ruler_blend, "range_by": ranges.by},
            "validation": val, "test": tst}


def main(argv=None) -> int:
    parser = model_parser(__doc__, "post_hoc")
    parser.add_argument("--heads", default=None, help="where the head outputs are kept (default COINYEAR_HOME)")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    registered = registered_split(args.model)
    settings, split, pyfunc, names, years, rows = (registered.settings, registered.split, registered.pyfunc,
                                                    registered.names, registered.years, registered.rows)
    train_index, val_index, test_index = registered.train_index, registered.val_index, registered.test_index
    network = pyfunc.model
    config = replace(network.config)
    classes = len(names)
    cache = ImageCache(settings.cache_dir, network.config.image_size, network.config.grayscale)
    kept = Path(args.heads or settings.home_dir / "post_hoc" / f"v{split['version']}")
    kept.mkdir(parents=True, exist_ok=True)

    def outputs(label: str, index: np.ndarray, scales) -> dict[float, dict[str, np.ndarray]]:
        chosen, found = rows.iloc[index], {}
        arrays = None
        for scale in scales:
            path = kept / f"{label}-{scale}.npz"
            if not path.exists():
                arrays = arrays or load_arrays(chosen, cache)
                t0 = time.perf_counter()
                out = infer_arrays(network, zoom(arrays[0], scale), zoom(arrays[1], scale), with_features=True,
                                   with_heads=True)
                np.savez(path, **{k: out[k] for k in ("regression", "logits", "features")})
                print(f"{label} x{scale}: {len(index)} coins in {time.perf_counter() - t0:.0f} s", flush=True)
            found[scale] = dict(np.load(path))
        return found

    portrait_years = network.portrait_years().numpy()

    def heads(label: str, index: np.ndarray, scales, tau: float = 0.0, log_prior=None) -> Heads:
        found = outputs(label, index, scales)
        chosen = rows.iloc[index]
        logits = np.concatenate([found[s]["logits"] for s in scales], axis=2)
        if tau:
            logits = logits - tau * log_prior
        return Heads(np.concatenate([found[s]["regression"] for s in scales], axis=2), logits, portrait_years,
                     portrait_labels(chosen, names), chosen["year_from"].to_numpy(float),
                     chosen["year_to"].to_numpy(float))

    train_labels = portrait_labels(rows.iloc[train_index], names)
    counts = np.bincount(train_labels[train_labels >= 0], minlength=classes) + 1.0
    log_prior = np.log(counts / counts.sum())
    results: dict = {"balance": {}, "zoom": {}, "neighbours": {}}
    for tau in TAUS:
        results["balance"][f"tau {tau}"] = measure(heads("validation", val_index, (1.0,), tau, log_prior),
                                                   heads("test", test_index, (1.0,), tau, log_prior), config, years)
    for scales in ((1.0,), (1.0, 1.15), (1.0, 0.87), ZOOMS):
        results["zoom"][" + ".join(f"x{s}" for s in scales)] = measure(
            heads("validation", val_index, scales), heads("test", test_index, scales), config, years)

    train = outputs("train", train_index, (1.0,))[1.0]
    known = train_labels >= 0
    bank = train["features"][known] / np.linalg.norm(train["features"][known], axis=1, keepdims=True)
    votes = np.eye(classes)[train_labels[known]]

    def neighbour_probs(features: np.ndarray, k: int, temperature: float) -> np.ndarray:
        similarity = (features / np.linalg.norm(features, axis=1, keepdims=True)) @ bank.T
        nearest = np.argsort(-similarity, axis=1)[:, :k]
        weights = softmax(np.take_along_axis(similarity, nearest, axis=1) / temperature)
        return 0.98 * (weights[:, :, None] * votes[nearest]).sum(axis=1) + 0.02 / classes

    validation, test = heads("validation", val_index, (1.0,)), heads("test", test_index, (1.0,))
    val_out, test_out = outputs("validation", val_index, (1.0,))[1.0], outputs("test", test_index, (1.0,))[1.0]
    val_head, test_head = softmax(val_out["logits"]).mean(axis=(1, 2)), softmax(test_out["logits"]).mean(axis=(1, 2))
    for k, temperature in NEIGHBOURS:
        val_near = neighbour_probs(val_out["features"], k, temperature)
        test_near = neighbour_probs(test_out["features"], k, temperature)
        for weight in WEIGHTS[1:]:
            results["neighbours"][f"k {k}, T {temperature}, a {weight}"] = measure(
                validation, test, config, years, (1 - weight) * val_head + weight * val_near,
                (1 - weight) * test_head + weight * test_near)

    lines = [f"## {args.name}: {args.model} (version {split['version']}); chosen on {len(val_index)} validation-type "
             f"coins, reported on {len(test_index)} test-type coins", ""]
    for family, variants in results.items():
        lines += [f"### {family}", "", "| variant | val MAE | val top-1 | test MAE | test ±10 y | test top-1 | "
                  "top-3 | 90% coverage | median width |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for label, m in variants.items():
            v, t = m["validation"], m["test"]
            lines.append(f"| {label} | {v['mae']:.2f} | {100 * v['portrait_top1']:.1f}% | {t['mae']:.2f} | "
                         f"{100 * t['within_10y']:.1f}% | {100 * t['portrait_top1']:.1f}% | "
                         f"{100 * t['portrait_top3']:.1f}% | {100 * t['interval90_coverage']:.1f}% | "
                         f"{t['interval90_median_width']:.1f} y |")
        best = min(variants, key=lambda label: variants[label]["validation"]["mae"])
        lines += ["", f"Chosen on validation MAE: **{best}** (test MAE {variants[best]['test']['mae']:.2f}).", ""]
    report = {"model": args.model, "version": split["version"], "split": split,
              "coins": {"train": len(train_index), "validation": len(val_index), "test": len(test_index)},
              **results}
    write_results(args.out, args.name, report, lines, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
