"""Training stage: dataset tensors, augmentation, the fit loop, grouped K-fold, and the tracked training run.

`run_training` is what `coinyear train` calls: it validates the data, sets the test coin types aside
(`data.split_test`: a fixed hash of the coin type, the one evaluation split every model is compared on),
cross-validates (grouped K-fold) or holds out one grouped validation split of the other types, fits the model
to register, scores it once on the test types, logs everything to MLflow (params, per-epoch and per-fold
metrics, plots, dataset summary, the pyfunc model with signature and input example) and registers a new model
version.

Metric names: `val_*` are measured on validation coins (out-of-fold with K folds, else the validation hold-out),
the coins every choice is made on (the early-stopping epoch, the conformal calibration, the OOD threshold), so
they flatter the model a little; `test_*` (`evaluate.report_metrics`) are the served model's on the test coin
types, which no choice and no fit ever saw: the headline numbers.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm.auto import tqdm

from coinyear import evaluate
from coinyear.calibrate import Heads, fit_levers, fit_ranges, portrait_floor
from coinyear.config import AUX_COLUMNS, LOSSES, setting_default
from coinyear.data import ImageCache, Manifest, choice_splits, load_arrays, mapped_arrays
from coinyear.model import CoinEnsemble, DualImageRegressor, ModelConfig, as_ensemble, build_model, infer
from coinyear.quality import SCALES, Conformal, FeatureDistance, Quality
from coinyear.rulers import portrait_labels
from coinyear.years import training_span

log = logging.getLogger(__name__)

# Rotation TTA measured in benchmarks/quality.py: -0.7 years MAE, and its spread makes the conformal ranges
# adaptive (median 90% width 35 instead of 60 years at the same coverage). Costs 5 forward passes per coin.
TTA_ANGLES = (-20.0, -10.0, 0.0, 10.0, 20.0)
# Hold-out coins needed to calibrate the out-of-distribution flag on them alone (see fit_quality).
MIN_FLAG_CALIBRATION = 100


@dataclass
class TrainConfig:
    """How a model is trained. The fields that are settings take the settings' defaults (`config.Settings`, the
    one home of the recipe's defaults); the rest are fixed choices, each with its reason."""

    model: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = setting_default("epochs")
    batch_size: int = setting_default("batch_size")
    lr: float = setting_default("lr")
    weight_decay: float = 1e-4
    loss: str = setting_default("loss")
    patience: int = 3
    # Keep the epoch with the best validation MAE and stop when it stalls. Off = fixed epochs, last weights.
    # The epoch is chosen on validation coins, never on the test coin types (`data.split_test`), so the test
    # score is not flattered by the choice; the `val_*` metrics are.
    early_stopping: bool = True
    folds: int = setting_default("folds")
    # Without folds: the share of the non-test rows (whole coin types, seeded) held out for validation.
    holdout_fraction: float = 0.15
    rotation_degrees: float = 20.0
    color_jitter: float = 0.2
    horizontal_flip: bool = setting_default("horizontal_flip")
    reshoot: float = setting_default("reshoot")
    seed: int = setting_default("seed")
    limit: int | None = None
    # Rotation test-time augmentation: the served year is the mean over these rotations of both photos.
    tta_angles: tuple[float, ...] = TTA_ANGLES
    ensemble: bool = setting_default("ensemble")
    aux_weight: float = setting_default("aux_weight")
    aux_heads: tuple[str, ...] = tuple(setting_default("aux_heads"))
    # Classes beyond the most common `aux_top` of each auxiliary column share one "other" class.
    aux_top: int = 20
    # Conformal scores divided by the spread of the rotated predictions (needs >= 2 TTA angles).
    conformal_scaled: bool = True
    # Share of coins of unseen types (in the training span) the out-of-distribution flag may wrongly flag
    # is 1 - ood_quantile; benchmarks/era_shift.py measures what it then catches.
    ood_quantile: float = 0.95
    # Fit the post-hoc levers on the validation coins at the end of training (`coinyear.calibrate`): the portrait
    # temperature, the ruler mixture's pooling and weight, the range's scale and the portrait flag. Off: the
    # network serves as trained, the ranges divide by the rotation spread, no portrait flag.
    calibrate: bool = True
    # Share of validation coins (unseen in-span types) the portrait flag may flag (`calibrate.portrait_floor`;
    # 0 = no portrait flag): a false-alarm rate stated in advance, on top of the feature distance's. Off: it lost
    # on benchmarks/era_shift.py (portrait-levers: AUROC 0.568; at 5% it flagged 13.6% of in-span test types and
    # 11.9% of the out-of-span coins).
    portrait_flag_rate: float = 0.0
    device: str = "auto"  # "auto": CUDA when present, else CPU

    def __post_init__(self):
        """The checks that span fields or that a hand-built config needs (the settings check each value)."""
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose from {', '.join(LOSSES)}")
        self.tta_angles = tuple(float(a) for a in self.tta_angles)
        if self.ensemble and self.folds < 2:
            raise ValueError("ensemble needs folds >= 2 (COINYEAR_FOLDS or --folds)")
        self.aux_heads = tuple(self.aux_heads)
        unknown = sorted(set(self.aux_heads) - set(AUX_COLUMNS))
        if unknown:
            raise ValueError(f"unknown auxiliary column(s) {', '.join(unknown)}; "
                             f"choose from {', '.join(AUX_COLUMNS)}")

    def flat(self) -> dict:
        params = {k: v for k, v in asdict(self).items() if k != "model"}
        params.update(self.model.to_dict())
        return params


# ---------------------------------------------------------------------------------------------- dataset
class CoinDataset(Dataset):
    """uint8 images of both sides, read one sample at a time; augmentation (when given) applied per sample.

    `fronts`/`backs` are [N, C, H, W] arrays in memory or memory-mapped tensor files (`data.mapped_arrays`);
    `index` picks this dataset's rows among the N (default all), so a split is never copied and a process
    reads only the samples it is asked for. Years and `aux` (integer class labels per auxiliary head, -100 =
    unknown) are given for all N rows, like the images.
    """

    def __init__(self, fronts: np.ndarray, backs: np.ndarray, year_from, year_to, augment=None,
                 aux: dict[str, np.ndarray] | None = None, index: np.ndarray | None = None):
        self.fronts, self.backs = fronts, backs
        self.index = np.arange(len(fronts)) if index is None else np.asarray(index, dtype=np.int64)
        self.year_from = torch.as_tensor(np.asarray(year_from, dtype=np.float32)[self.index])
        self.year_to = torch.as_tensor(np.asarray(year_to, dtype=np.float32)[self.index])
        self.augment = augment
        self.aux = {name: torch.as_tensor(np.asarray(labels, dtype=np.int64)[self.index])
                    for name, labels in (aux or {}).items()}

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int):
        row = self.index[index]
        # np.array copies the row out of a read-only memory map (torch wants writable memory)
        front, back = torch.from_numpy(np.array(self.fronts[row])), torch.from_numpy(np.array(self.backs[row]))
        if self.augment is not None:
            front, back = self.augment(front), self.augment(back)
        labels = tuple(self.aux[name][index] for name in self.aux)
        return (front.float() / 255, back.float() / 255, self.year_from[index], self.year_to[index], *labels)


class Reshoot(nn.Module):
    """The same coin photographed by a collector instead of a museum, for a share `p` of the photos.

    OCRE's photos show the coin filling a white frame under even light; people photograph theirs smaller in the
    frame, on whatever lies under it, under a warm or cold lamp, not quite in focus. Each change is drawn at
    random: scale 0.6-1 of the frame (on the white background), the white background replaced by a random
    colour with noise (half the time), gamma 0.75-1.35 and each channel's gain 0.82-1.15, a Gaussian blur of
    sigma 0.3-1.6 px (40% of the time) and JPEG re-encoding at quality 40-95 (half the time). uint8 [C, H, W]
    in and out, before the rotation (whose black corners stay what the rotation TTA sees).
    benchmarks/photo_shift.py measures what it buys.
    """

    WHITE = 235  # OCRE backgrounds are brighter than this in every channel

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = p

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.p <= 0 or torch.rand(()) >= self.p:
            return image
        channels = image.shape[0]
        x = image.float().unsqueeze(0)
        scale = float(torch.empty(()).uniform_(0.6, 1.0))
        if scale < 0.97:
            x = shrink_in_frame(x, scale, 255.0)
        if torch.rand(()) < 0.5:
            background = (x > self.WHITE).all(dim=1, keepdim=True)
            colour = torch.rand(1, channels, 1, 1) * 255 * torch.empty(()).uniform_(0.1, 1.0)
            cloth = colour + torch.randn_like(x) * float(torch.empty(()).uniform_(0, 12))
            x = torch.where(background, cloth, x)
        gamma = float(torch.empty(()).uniform_(0.75, 1.35))
        gains = torch.empty(1, channels, 1, 1).uniform_(0.82, 1.15)
        x = 255 * ((x.clamp(0, 255) / 255) ** gamma) * gains
        if torch.rand(()) < 0.4:
            x = v2.functional.gaussian_blur(x, kernel_size=[5, 5], sigma=[float(torch.empty(()).uniform_(0.3, 1.6))])
        photo = x.squeeze(0).round().clamp(0, 255).to(torch.uint8)
        if torch.rand(()) < 0.5:
            photo = v2.functional.jpeg(photo, int(torch.randint(40, 96, ())))
        return photo


def shrink_in_frame(images: torch.Tensor, scale: float, fill: float) -> torch.Tensor:
    """Float images [N, C, H, W] with the picture shrunk to `scale` of the frame, centred on `fill` (the white
    of the photo's own background): a coin photographed from further away."""
    height, width = images.shape[-2:]
    inner_h, inner_w = round(height * scale), round(width * scale)
    shrunk = nn.functional.interpolate(images, size=(inner_h, inner_w), mode="bilinear", antialias=True)
    top, left = (height - inner_h) // 2, (width - inner_w) // 2
    out = torch.full_like(images, fill)
    out[..., top:top + inner_h, left:left + inner_w] = shrunk
    return out


def make_augmentation(config: TrainConfig) -> v2.Compose:
    """Collector-style re-shooting (`Reshoot`), rotation (coins are photographed at any angle) and light colour
    jitter; flips only when asked."""
    steps: list[nn.Module] = [Reshoot(config.reshoot)] if config.reshoot else []
    steps.append(v2.RandomRotation(config.rotation_degrees, interpolation=v2.InterpolationMode.BILINEAR))
    if config.color_jitter:
        jitter = config.color_jitter
        if config.model.grayscale:
            steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter))
        else:
            steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
    if config.horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


# ------------------------------------------------------------------------------------------------- loss
def loss_fn(predicted, year_from, year_to, kind: str, scale: float) -> torch.Tensor:
    """Loss in standardised years. `interval`: zero inside the label range, Huber outside; `mse`: midpoint."""
    if kind == "mse":
        return torch.mean(((predicted - (year_from + year_to) / 2) / scale) ** 2)
    outside = torch.relu(year_from - predicted) + torch.relu(predicted - year_to)
    return nn.functional.smooth_l1_loss(outside / scale, torch.zeros_like(outside), beta=0.1)


OTHER_CLASS = "other"  # the auxiliary class of every value outside the `top` commonest


def aux_labels(rows: pd.DataFrame, top: int, columns: tuple[str, ...] = AUX_COLUMNS,
               among: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """Class indices of the auxiliary `columns` present and each column's class names: the `top` most common
    values, then "other". "portrait" is read from `obverse_desc` when the rows have no such column (-100 = no
    label: ignored). `among` (row positions, default all) are the rows whose values pick the classes: the
    training run passes the non-test rows, so the test coin types do not choose the model's classes."""
    labels, classes = {}, {}
    for column in columns:
        if column == "portrait" and column not in rows.columns and "obverse_desc" in rows.columns:
            rows = rows.assign(portrait=portrait_labels(rows["obverse_desc"]).to_numpy())
        if column not in rows.columns:
            continue
        values = rows[column].fillna("").astype(str).str.strip()
        counted = values if among is None else values.iloc[among]
        common = [v for v in counted[counted != ""].value_counts().index[:top]]
        index = {value: i for i, value in enumerate(common)}
        labels[column] = np.array([-100 if v == "" else index.get(v, len(common)) for v in values])
        classes[column] = [*common, OTHER_CLASS]
    return labels, classes


# ---------------------------------------------------------------------------------------------- fitting
def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process in an initialised torch.distributed group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(name: str = "auto") -> torch.device:
    """The training device; under torchrun a CUDA device is this process's own GPU (LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


class _TrainStep(nn.Module):
    """The training forward pass as one module call, so DistributedDataParallel (which only hooks `forward`)
    sees the auxiliary heads too. Without DDP it is the same computation as calling the model directly."""

    def __init__(self, model: DualImageRegressor):
        super().__init__()
        self.model = model

    def forward(self, front: torch.Tensor, back: torch.Tensor, with_aux: bool):
        if with_aux:
            return self.model.forward_with_aux(front, back)
        return self.model(front, back), None


def shard_sampler(dataset: Dataset, rank: int, world: int, seed: int):
    """This rank's share of the training rows: a fresh disjoint shuffle every epoch (`set_epoch`). The few rows
    beyond a multiple of `world` are left out of that epoch, so shards never overlap."""
    from torch.utils.data import DistributedSampler

    return DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def validation_years(model: DualImageRegressor | CoinEnsemble, val: CoinDataset,
                     device: torch.device) -> np.ndarray:
    """Predicted years of every validation row. Under DDP each rank predicts every world-th row and the
    shares are gathered, so all ranks hold the same predictions (and take the same early-stopping decision)."""
    rank, world = process_rank()
    positions = np.arange(rank, len(val), world)
    years = infer_arrays(model, val.fronts, val.backs, device=device, index=val.index[positions])["year"]
    if world == 1:
        return years
    import torch.distributed as dist

    shares: list = [None] * world  # (positions, years) of every rank once gathered
    dist.all_gather_object(shares, (positions, years))
    predicted = np.empty(len(val))
    for share_positions, share_years in shares:
        predicted[share_positions] = share_years
    return predicted


@torch.inference_mode()
def infer_arrays(model: DualImageRegressor | CoinEnsemble, fronts: np.ndarray, backs: np.ndarray,
                 batch_size: int = 64,
                 device: torch.device | str | None = None, with_features: bool = False,
                 index: np.ndarray | None = None, with_heads: bool = False) -> dict[str, np.ndarray]:
    """Years of uint8 image arrays (rows `index`, default all; memory-mapped arrays are read batch by batch);
    for an ensemble also the spread over rotations and (optionally) the embeddings and, for a model with a named
    portrait head, its probabilities: {"year": [N], "spread": [N], "features": [N, D], "portraits": [N, classes]};
    `with_heads` adds the heads' raw outputs "regression" and "logits" (`model.infer`)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    # On a CPU, channels-last convolutions score 1.7x faster (96 vs 57 photos/s, the demo model): the layout
    # the trainer uses; the model goes back to the layout it came in (fit's validation keeps channels-last).
    layout = torch.channels_last if device.type == "cpu" else torch.preserve_format
    kernels = [p for p in model.parameters() if p.dim() == 4]
    came_ordinary = bool(kernels) and all(p.is_contiguous() for p in kernels)
    model.eval().to(device, memory_format=layout)  # type: ignore[call-overload]  # torch's stubs lack this form
    rows = np.arange(len(fronts)) if index is None else np.asarray(index, dtype=np.int64)
    years, spreads, features, portraits = [], [], [], []
    raw: dict[str, list[np.ndarray]] = {"regression": [], "logits": []}
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        front = (torch.from_numpy(np.asarray(fronts[batch])).to(device).float() / 255).contiguous(memory_format=layout)
        back = (torch.from_numpy(np.asarray(backs[batch])).to(device).float() / 255).contiguous(memory_format=layout)
        scored = infer(model, front, back, with_features, with_heads)
        years.append(scored["year"].cpu().numpy())
        for key, parts in raw.items():
            if key in scored:
                parts.append(scored[key].float().cpu().numpy())
        spreads.append(scored["spread"].cpu().numpy())
        if with_features:
            features.append(scored["features"].float().cpu().numpy())
        if "portraits" in scored:
            portraits.append(scored["portraits"].float().cpu().numpy())
    if came_ordinary:
        model.to(memory_format=torch.contiguous_format)
    out = {"year": np.concatenate(years) if years else np.zeros(0)}
    out["spread"] = np.concatenate(spreads) if spreads else np.zeros_like(out["year"])
    if with_features:
        out["features"] = np.concatenate(features) if features else np.zeros((0, 0))
    if portraits:
        out["portraits"] = np.concatenate(portraits)
    out.update({key: np.concatenate(parts) for key, parts in raw.items() if parts})
    return out


def predict_arrays(model: DualImageRegressor | CoinEnsemble, fronts: np.ndarray, backs: np.ndarray,
                   batch_size: int = 64,
                   device: torch.device | str | None = None) -> np.ndarray:
    return infer_arrays(model, fronts, backs, batch_size, device)["year"]


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


@contextlib.contextmanager
def reused_memory():
    """Keep freed memory in the process while training on a CPU, then hand it back.

    glibc serves every allocation above a few MB (the activations of a batch) with a fresh mmap and returns
    it on free, so each batch page-faults its whole working set in again: measured on 2 cores, 770k minor
    faults and 14% of the CPU time in the kernel per efficientnet_lite0 step. With mmap off and no trimming,
    the heap keeps those pages and the next batch reuses them (no faults). Elsewhere than glibc: nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        changed = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError):
        changed, libc = False, None
    try:
        yield
    finally:
        if changed:  # glibc's defaults again, and the kept memory back to the system
            libc.mallopt(_M_MMAP_MAX, 65536)
            libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
            libc.malloc_trim(0)


def fit(model: DualImageRegressor, train: CoinDataset, config: TrainConfig, val: CoinDataset | None = None,
        name: str = "fit", on_epoch=None, epochs: int | None = None, trace: list | None = None) -> list[dict]:
    """Train in place; with a validation set, stop early on validation MAE and keep the best weights.

    The same loop runs in one process or, inside an initialised torch.distributed group (TorchDistributor,
    torchrun), as one rank of DistributedDataParallel: each rank reads its own shard of `train` per epoch
    (batch `batch_size // world`, so the global batch and the learning-rate schedule match one process),
    the epoch loss and the validation predictions are combined over ranks, and every rank keeps the same
    weights and takes the same early-stopping decision. `on_epoch(record)` is called after every epoch
    (MLflow logging); returns the per-epoch history. `trace`, when given, receives per epoch the rows
    (indices into the arrays) this rank trained on.
    """
    epochs = config.epochs if epochs is None else epochs
    device = resolve_device(config.device)
    # channels-last convolutions: 10.7 -> 7.0 CPU-seconds per efficientnet_lite0 step on 2 loaded cores
    # (benchmarks/README.md, "Demo time"); not measured on a GPU, so not used there
    memory_format = torch.channels_last if device.type == "cpu" else torch.preserve_format
    model.to(device, memory_format=memory_format)  # type: ignore[call-overload]  # torch's stubs lack this form
    with reused_memory() if device.type == "cpu" else contextlib.nullcontext():
        history = _fit_epochs(model, train, config, val, name, on_epoch, epochs, trace, device, memory_format)
    model.to("cpu", memory_format=torch.contiguous_format)  # type: ignore[call-overload]  # as above
    return history


def _fit_epochs(model: DualImageRegressor, train: CoinDataset, config: TrainConfig, val: CoinDataset | None,
                name: str, on_epoch, epochs: int, trace: list | None, device: torch.device,
                memory_format: torch.memory_format) -> list[dict]:
    rank, world = process_rank()
    # On a GPU the per-sample augmentation on one CPU core is the bottleneck: spread it over workers (the
    # node's cores shared by the ranks on it).
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    workers = min(8, (os.cpu_count() or 1) // local_world - 1) if device.type == "cuda" else 0
    batch_size = max(1, config.batch_size // world)
    if world > 1:
        sampler = shard_sampler(train, rank, world, config.seed)
        loader = DataLoader(train, batch_size=batch_size, sampler=sampler, drop_last=len(sampler) > batch_size,
                            num_workers=max(workers, 0), persistent_workers=workers > 0,
                            pin_memory=device.type == "cuda")
    else:
        sampler = None
        generator = torch.Generator().manual_seed(config.seed)
        loader = DataLoader(train, batch_size=config.batch_size, shuffle=True, generator=generator,
                            drop_last=len(train) > config.batch_size, num_workers=max(workers, 0),
                            persistent_workers=workers > 0, pin_memory=device.type == "cuda")
    step: nn.Module = _TrainStep(model)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        step = DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)
    # A pretrained backbone needs gentler steps than the freshly initialised head.
    backbone_lr = config.lr * (0.3 if model.pretrained_loaded else 1.0)
    head_params = [*model.fusion.parameters(), *model.head.parameters(), *model.aux_heads.parameters()]
    head_ids = {id(p) for p in head_params}
    backbone_params = [p for p in model.parameters() if id(p) not in head_ids]
    optimizer = torch.optim.AdamW([{"params": backbone_params, "lr": backbone_lr},
                                   {"params": head_params, "lr": config.lr}], weight_decay=config.weight_decay)
    total_steps = max(1, epochs * len(loader))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[backbone_lr, config.lr], total_steps=total_steps, pct_start=0.15)
    scale = float(model.year_scale)
    with_aux = bool(model.aux_heads) and config.aux_weight > 0
    history, best_mae, best_state, stale = [], math.inf, None, 0
    for epoch in range(1, epochs + 1):
        if sampler is not None:
            sampler.set_epoch(epoch)
        if trace is not None:
            rows = list(sampler) if sampler is not None else []
            trace.append([int(train.index[i]) for i in rows[:len(loader) * batch_size]])
        step.train()
        started, losses = time.perf_counter(), []
        # The bar counts the batches of this epoch (rank 0 only: the other ranks run the same steps).
        bar = tqdm(loader, desc=f"{name} epoch {epoch}/{epochs}", unit="batch", leave=False, disable=rank != 0)
        for batch in bar:
            front, back, year_from, year_to, *aux = (t.to(device, non_blocking=True) for t in batch)
            front, back = front.contiguous(memory_format=memory_format), back.contiguous(memory_format=memory_format)
            optimizer.zero_grad(set_to_none=True)
            predicted, logits = step(front, back, with_aux and bool(aux))
            loss = loss_fn(predicted, year_from, year_to, config.loss, scale)
            if logits is not None:
                for labels, head in zip(aux, model.aux_heads):
                    loss = loss + config.aux_weight * nn.functional.cross_entropy(logits[head], labels,
                                                                                  ignore_index=-100)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.set_postfix(loss=round(losses[-1], 3))
        loss_sum, loss_count = float(np.sum(losses)), float(len(losses))
        if world > 1:
            loss_sum, loss_count = _all_sum([loss_sum, loss_count], device)
            # BatchNorm statistics are updated per rank: take rank 0's, so all ranks validate and keep one model.
            import torch.distributed as dist

            for buffer in model.buffers():
                dist.broadcast(buffer, 0)
        record = {"epoch": epoch, "train_loss": loss_sum / loss_count if loss_count else float("nan"),
                  "epoch_seconds": time.perf_counter() - started}
        if val is not None and len(val):
            predicted = validation_years(model, val, device)
            metrics = evaluate.regression_metrics(predicted, val.year_from.numpy(), val.year_to.numpy())
            record.update(val_mae=metrics["mae"], val_range_mae=metrics["range_mae"])
            if metrics["mae"] < best_mae:
                best_mae, stale = metrics["mae"], 0
                if config.early_stopping:
                    best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                record["best"] = True
            else:
                stale += 1
        history.append(record)
        log.info("%s epoch %d/%d %s", name, epoch, epochs,
                 " ".join(f"{k}={v:.3f}" for k, v in record.items() if isinstance(v, float)))
        if on_epoch:
            on_epoch(record)
        if val is not None and config.early_stopping and stale >= config.patience:
            log.info("%s: early stop after epoch %d (best val MAE %.2f)", name, epoch, best_mae)
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return history


def best_epoch(history: list[dict]) -> int:
    marked = [h["epoch"] for h in history if h.get("best")]
    return marked[-1] if marked else history[-1]["epoch"]


def year_normalisation(year_from, year_to) -> tuple[float, float]:
    midpoint = (np.asarray(year_from, float) + np.asarray(year_to, float)) / 2
    return float(np.median(midpoint)), float(max(np.std(midpoint), 1.0))


def new_model(config: TrainConfig, year_from, year_to, aux: dict[str, np.ndarray] | None = None,
              index: np.ndarray | None = None) -> DualImageRegressor:
    """A fresh model for training on `year_from`/`year_to` (the training rows' years). With a portrait head,
    each portrait class gets the median year of its training coins (`aux` labels of all rows, `index` = the
    training rows), the ruler mixture the served year blends in (ModelConfig.ruler_blend)."""
    torch.manual_seed(config.seed)
    center, scale = year_normalisation(year_from, year_to)
    model = build_model(config.model, year_center=center, year_scale=scale)
    if aux and "portrait" in aux and "portrait" in model.aux_heads:
        labels = aux["portrait"] if index is None else aux["portrait"][index]
        midpoints = (np.asarray(year_from, float) + np.asarray(year_to, float)) / 2
        overall = float(np.median(midpoints))
        years = [float(np.median(midpoints[labels == c])) if (labels == c).any() else overall
                 for c in range(len(model.portrait_years))]
        model.portrait_years.copy_(torch.tensor(years))
    return model


# ----------------------------------------------------------------------------------------- experiments
@dataclass
class TrainingResult:
    model: DualImageRegressor | CoinEnsemble | None  # what is served; None when no final model was asked for
    metrics: dict[str, float]
    histories: dict[str, list[dict]]
    # coin_id, year_from, year_to, predicted, spread, fold (out-of-fold or validation); predicted_no_tta with TTA
    predictions: pd.DataFrame
    seconds: float
    fold_models: list[DualImageRegressor] = field(default_factory=list)
    quality: Quality | None = None
    # the served model on the test coin types: coin_id, year_from, year_to, predicted, spread, low, high (its 90%
    # range), portrait (the catalogue's, "" when none) and portrait_1..3 (its likeliest classes, with a portrait
    # head); empty without a final model or without test rows
    test_predictions: pd.DataFrame = field(default_factory=pd.DataFrame)


def serving_model(members: list[DualImageRegressor], tta_angles: tuple[float, ...]):
    """One plain regressor when there is nothing to average, else the ensemble over members and rotations."""
    if len(members) == 1 and tta_angles in ((), (0.0,)):
        return members[0].eval()
    return CoinEnsemble(members, tta_angles or (0.0,)).eval()


def fit_quality(model, fronts, backs, groups, predictions: pd.DataFrame, config: TrainConfig,
                device: torch.device, unseen=None, index: np.ndarray | None = None,
                portraits: np.ndarray | None = None) -> Quality:
    """Interval calibration from the out-of-fold (or validation) predictions; the OOD reference and threshold
    from the served model's out-of-distribution features of every coin, or of the rows `index` (positions in
    the arrays): the training run passes the non-test rows, so a test coin is never its own neighbour.

    Those features are member 0's on the unrotated photos (what the served model compares), so one plain
    pass per coin gives them: scoring every coin with the rotation TTA as well would cost 5 passes more for
    years nobody reads. `unseen` (rows the served model never trained on: the validation hold-out) calibrate
    the flag's threshold when given; it and `groups` count the reference rows (those of `index`).

    `portraits` (the served portrait probabilities of the `predictions` rows), with `config.calibrate`, let the
    range's scale be chosen among SCALES (`calibrate.fit_ranges`; the portrait years are the served model's) and
    set the portrait flag's floor at `config.portrait_flag_rate` of those coins."""
    scaled = config.conformal_scaled and len(config.tta_angles) >= 2
    years = np.array([year for _, year in as_ensemble(model).portrait_classes()])
    if scaled and config.calibrate and portraits is not None and len(years) == portraits.shape[1]:
        scored = {"year": predictions["predicted"].to_numpy(float), "spread": predictions["spread"].to_numpy(float),
                  "portraits": portraits}
        conformal, _ = fit_ranges(scored, years, predictions["year_from"], predictions["year_to"], SCALES)
    else:
        conformal = Conformal.fit(predictions["predicted"], predictions["year_from"], predictions["year_to"],
                                  predictions["spread"] if scaled else None)
    plain = model.regressors[0] if isinstance(model, CoinEnsemble) else model
    features = infer_arrays(plain, fronts, backs, device=device, with_features=True, index=index)["features"]
    ood = FeatureDistance.fit(features, groups, quantile=config.ood_quantile, calibration=unseen)
    if config.calibrate and portraits is not None and len(portraits) >= MIN_FLAG_CALIBRATION:
        # as the distance's threshold: a quantile of fewer coins is mostly noise, then no portrait flag
        ood.portrait_floor = portrait_floor(portraits, config.portrait_flag_rate)
    model.cpu()
    return Quality(conformal, ood)


def score_test_rows(model, quality: Quality, rows: pd.DataFrame, fronts, backs, index: np.ndarray,
                    device: torch.device) -> pd.DataFrame:
    """The served model (`model` with its `quality`) on the rows `index`, as `evaluate.table_report` reads it:
    coin_id, year_from, year_to, predicted, spread, low and high (the 90% range), out_of_distribution,
    portrait (the catalogue's) and, with a named portrait head, portrait_1..3 (the likeliest classes)."""
    scored = infer_arrays(model, fronts, backs, device=device, index=index, with_features=True)
    model.cpu()
    years = np.array([year for _, year in as_ensemble(model).portrait_classes()])
    low, high = quality.conformal.ranges(scored, evaluate.INTERVAL_LEVEL, years)
    chosen = rows.iloc[index]
    table = pd.DataFrame({"coin_id": chosen["coin_id"].to_numpy(), "year_from": chosen["year_from"].to_numpy(),
                          "year_to": chosen["year_to"].to_numpy(), "predicted": scored["year"],
                          "spread": scored["spread"], "low": low, "high": high,
                          "out_of_distribution": quality.ood.flag(scored["features"],
                                                                  portraits=scored.get("portraits")),
                          "portrait": evaluate.catalogue_portraits(chosen).to_numpy()})
    if "portraits" in scored:
        names = [name for name, _ in as_ensemble(model).portrait_classes()]
        order = np.argsort(-scored["portraits"], axis=1, kind="stable")[:, :evaluate.PORTRAIT_RANKS]
        for rank in range(order.shape[1]):
            table[f"portrait_{rank + 1}"] = [names[c] for c in order[:, rank]]
    return table


def train_on_manifest(manifest: Manifest, config: TrainConfig, cache_dir: Path, on_metrics=None,
                      final_model: bool = True, tensor_dir: Path | None = None,
                      trace: list | None = None) -> TrainingResult:
    """Set the test coin types aside, cross-validate (folds >= 2) or hold out one grouped validation split of
    the rest, then produce the model to register and score it on the test types.

    The splits are `data.choice_splits`: no fold, no refit, no early stopping, calibration or class choice
    ever sees a test coin type. With K folds, the `val_*` metrics are the out-of-fold ones and the final model
    is fit on all non-test rows for the median best epoch (or, with `ensemble`, is the K fold models
    averaged); with a hold-out, the final model is the one early-stopped on the validation rows. Predictions
    use the rotation TTA of the served model, and the interval calibration and OOD detector are fitted for it
    on validation rows. The final model is then scored once on the test rows: `test_*` metrics
    (`evaluate.report_metrics`) and `TrainingResult.test_predictions`. `final_model=False` stops after the
    folds (benchmarks; no test metrics). `on_metrics(dict, step)` receives every metric as it is produced
    (MLflow logging).

    With `tensor_dir` the images are read from memory-mapped tensor files there (built once, see
    `data.mapped_arrays`) instead of being loaded into memory. Inside a torch.distributed group every rank
    calls this: the hold-out model is trained by all ranks (`fit`), and rank 0 alone goes on to predict,
    calibrate and return the model (the other ranks return no model). K-fold is refused there: the folds
    and the refit would be K+1 distributed fits in a row, which this path does not do.
    """
    from coinyear.quality import cross_conformal, interval_metrics

    started = time.perf_counter()
    rows = manifest.rows
    if len(rows) < 4:
        raise ValueError(f"only {len(rows)} valid rows: too few to train")
    rank, world = process_rank()
    if world > 1 and config.folds >= 2:
        raise ValueError("distributed training runs one grouped hold-out; K-fold (folds >= 2) runs in one "
                         "process: drop --folds or --distributed")
    device = resolve_device(config.device)
    splits, test_index = choice_splits(rows, config.folds, config.holdout_fraction, config.seed)
    usable = np.setdiff1d(np.arange(len(rows)), test_index)  # every non-test row, in row order
    aux, classes = (aux_labels(rows, config.aux_top, config.aux_heads, among=usable) if config.aux_weight > 0
                    else ({}, {}))
    if classes:
        config = replace(config, model=replace(config.model, aux_names=classes,
                                               aux_classes={name: len(names) for name, names in classes.items()}))
    cache = ImageCache(cache_dir, config.model.image_size, config.model.grayscale)
    if tensor_dir is not None:
        fronts, backs = mapped_arrays(rows, cache, tensor_dir, progress=rank == 0)
    else:
        fronts, backs = load_arrays(rows, cache, progress=True)
    year_from, year_to = rows["year_from"].to_numpy(), rows["year_to"].to_numpy()
    augment = make_augmentation(config)
    emit = on_metrics or (lambda metrics, step=None: None)

    def subset(index, with_augment):
        return CoinDataset(fronts, backs, year_from, year_to, augment if with_augment else None, aux, index=index)

    predictions, spread, plain = (np.full(len(rows), np.nan) for _ in range(3))
    fold_of = np.full(len(rows), -1)
    heads: list[tuple[np.ndarray, Heads]] = []  # per fold: its validation rows' raw head outputs (the levers)
    val_portraits: dict[int, np.ndarray] = {}  # row -> the served portrait probabilities
    histories, fold_metrics, fold_models = {}, [], []
    best_epochs: list[int] = []
    for fold, (train_index, val_index) in enumerate(tqdm(splits, desc="folds", unit="fold", disable=len(splits) == 1)):
        name = f"fold{fold + 1}" if len(splits) > 1 else "holdout"  # "holdout": the validation rows
        model = new_model(config, year_from[train_index], year_to[train_index], aux, train_index)
        history = fit(model, subset(train_index, True), config, subset(val_index, False), name=name,
                      on_epoch=lambda r, n=name: emit({f"{n}/{k}": v for k, v in r.items()
                                                       if isinstance(v, float)}, r["epoch"]), trace=trace)
        histories[name], best_epochs = history, [*best_epochs, best_epoch(history)]
        if rank != 0:
            continue
        served = serving_model([model], config.tta_angles)
        inferred = infer_arrays(served, fronts, backs, device=device, index=val_index, with_heads=True)
        predictions[val_index], spread[val_index] = inferred["year"], inferred["spread"]
        if "logits" in inferred:
            heads.append((val_index, Heads(inferred["regression"], inferred["logits"],
                                           as_ensemble(served).portrait_years().numpy(),
                                           aux["portrait"][val_index], year_from[val_index], year_to[val_index])))
        if config.tta_angles:
            plain[val_index] = infer_arrays(model, fronts, backs, device=device, index=val_index)["year"]
        model.cpu()
        fold_of[val_index] = fold + 1
        metrics = evaluate.regression_metrics(predictions[val_index], year_from[val_index], year_to[val_index])
        fold_metrics.append(metrics)
        emit({f"{name}/{k}": v for k, v in metrics.items()})
        log.info("%s: MAE %.2f, within 10y %.1f%%", name, metrics["mae"], 100 * metrics["within_10y"])
        fold_models.append(model)
    if rank != 0:
        return TrainingResult(None, {}, histories, pd.DataFrame(), time.perf_counter() - started)

    metrics = {}
    if heads and config.calibrate:
        # the post-hoc levers, on the validation coins (`coinyear.calibrate`); every model shares config.model
        levers = fit_levers([part for _, part in heads], config.model)
        levers.apply(config.model)
        metrics.update({"portrait_temperature": levers.temperature, "ruler_pooled": float(levers.ruler_pooled),
                        "ruler_blend": levers.ruler_blend, **levers.validation})
        log.info("levers fitted on the validation coins: temperature %.2f, ruler %s, blend %.1f (val MAE %.2f -> "
                 "%.2f)", levers.temperature, "pooled" if levers.ruler_pooled else "per rotation",
                 levers.ruler_blend, levers.validation["val_mae_as_trained"], levers.validation["val_mae_levers"])
    for val_index, part in heads:  # the validation answers as now served
        answer = part.served(config.model)
        predictions[val_index], spread[val_index] = answer["year"], answer["spread"]
        val_portraits.update(zip(val_index.tolist(), answer["portraits"]))
    evaluated = fold_of > 0
    overall = evaluate.regression_metrics(predictions[evaluated], year_from[evaluated], year_to[evaluated])
    metrics.update({f"val_{k}": v for k, v in overall.items()})
    if config.tta_angles:
        metrics["val_mae_no_tta"] = evaluate.regression_metrics(
            plain[evaluated], year_from[evaluated], year_to[evaluated])["mae"]
    table = pd.DataFrame({"coin_id": rows["coin_id"], "year_from": year_from, "year_to": year_to,
                          "predicted": predictions, "spread": spread, "fold": fold_of})
    if config.tta_angles:
        table["predicted_no_tta"] = plain
    table = table[evaluated].reset_index(drop=True)
    if len(splits) > 1:
        metrics.update(evaluate.summarize_folds(fold_metrics))
        scaled = config.conformal_scaled and len(config.tta_angles) >= 2
        low, high = cross_conformal(table["predicted"], table["year_from"], table["year_to"], table["fold"], 0.9,
                                    table["spread"] if scaled else None)
        metrics.update({f"val_interval90_{k}": v for k, v in
                        interval_metrics(low, high, table["year_from"], table["year_to"]).items()})

    final, quality, test_table = None, None, pd.DataFrame()
    if final_model:
        if len(splits) > 1 and not config.ensemble:
            final_epochs = int(np.median(best_epochs)) if config.early_stopping else config.epochs
            refit = new_model(config, year_from[usable], year_to[usable], aux, usable)
            histories["final"] = fit(refit, subset(usable, True), config, None, name="final",
                                     epochs=final_epochs,
                                     on_epoch=lambda r: emit({f"final/{k}": v for k, v in r.items()
                                                              if isinstance(v, float)}, r["epoch"]))
            metrics["final_epochs"] = float(final_epochs)
            members = [refit]
        else:
            members = fold_models
        final = serving_model(members, config.tta_angles)
        # what the served model knows, recorded with it (/version, MLmodel metadata, the out-of-span words)
        trained = usable if len(splits) > 1 else splits[0][0]
        final.config.span = training_span(year_from[trained], year_to[trained],
                                          [(name, year) for name, year in as_ensemble(final).portrait_classes()
                                           if name != OTHER_CLASS])
        # a hold-out model never saw its validation coins: they calibrate the flag (K-fold finals saw every
        # non-test coin); a quantile of fewer than MIN_FLAG_CALIBRATION scores is mostly noise: then every
        # reference coin's. The reference is the non-test coins (positions below count those rows).
        unseen = (np.searchsorted(usable, splits[0][1])
                  if len(splits) == 1 and len(splits[0][1]) >= MIN_FLAG_CALIBRATION else None)
        portraits = (np.stack([val_portraits[int(i)] for i in np.flatnonzero(evaluated)])
                     if val_portraits and len(val_portraits) == int(evaluated.sum()) else None)
        quality = fit_quality(final, fronts, backs, rows["group"].to_numpy()[usable], table, config, device, unseen,
                              index=usable, portraits=portraits)
        metrics["portrait_floor"] = quality.ood.portrait_floor
        metrics["conformal_q90"] = quality.conformal.quantile(0.9)
        metrics["ood_threshold"] = quality.ood.threshold
        if len(test_index):
            test_table = score_test_rows(final, quality, rows, fronts, backs, test_index, device)
            names = [name for name, _ in as_ensemble(final).portrait_classes()]
            metrics.update({f"test_{k}": v for k, v in evaluate.table_report(test_table, names).items()})
            log.info("test coin types: MAE %.2f, within 10y %.1f%% (%d coins)", metrics["test_mae"],
                     100 * metrics["test_within_10y"], len(test_index))
        else:
            log.warning("no row of a test coin type: this run reports no test_* metrics")
    metrics["train_seconds"] = time.perf_counter() - started
    emit(metrics)
    return TrainingResult(final, metrics, histories, table, metrics["train_seconds"], fold_models, quality,
                          test_table)


# ------------------------------------------------------------------------------------------ tracked run
@dataclass
class RunOutcome:
    run_id: str
    version: str | None
    metrics: dict[str, float]


def _log_plots(result: TrainingResult) -> None:
    import matplotlib.pyplot as plt
    import mlflow

    table = result.predictions
    figures = {
        "plots/loss_curves.png": evaluate.plot_loss_curves(result.histories),
        "plots/predicted_vs_true.png": evaluate.plot_predicted_vs_true(table["predicted"], table["year_from"],
                                                                       table["year_to"]),
        "plots/decade_confusion.png": evaluate.plot_decade_confusion(
            evaluate.decade_confusion(table["predicted"], table["year_from"], table["year_to"])),
        "plots/decade_mae.png": evaluate.plot_decade_mae(
            evaluate.per_decade_mae(table["predicted"], table["year_from"], table["year_to"])),
    }
    for path, figure in figures.items():
        mlflow.log_figure(figure, path)
        plt.close(figure)
    mlflow.log_table(evaluate.per_decade_mae(table["predicted"], table["year_from"], table["year_to"]),
                     "evaluation/decade_mae.json")
    mlflow.log_text(table.to_csv(index=False), "evaluation/predictions.csv")
    test = result.test_predictions
    if len(test):  # the served model on the test coin types: what the test_* metrics were computed from
        figure = evaluate.plot_predicted_vs_true(test["predicted"], test["year_from"], test["year_to"],
                                                 title="test coin types: predicted vs true")
        mlflow.log_figure(figure, "plots/test_predicted_vs_true.png")
        plt.close(figure)
        mlflow.log_text(test.to_csv(index=False), "evaluation/test_predictions.csv")


def run_training(settings, config: TrainConfig, manifest: Manifest | None = None, register: bool = True,
                 run_name: str | None = None, tags: dict | None = None, tensor_dir: Path | None = None,
                 trace: list | None = None) -> RunOutcome:
    """Validate the data, train, and log the whole run to MLflow; register a new model version.

    Under TorchDistributor this is what rank 0 runs (`coinyear.distributed`), the other ranks running only
    `train_on_manifest`; `tensor_dir` and `trace` are passed on to it."""
    import tempfile

    import mlflow
    from mlflow.data.pandas_dataset import from_pandas

    from coinyear.config import ensure_experiment
    from coinyear.data import TEST_SPLIT_RULE, read_manifest, split_test
    from coinyear.neighbours import reference_file
    from coinyear.pyfunc import input_example, log_model

    experiment_id = ensure_experiment(settings)
    if manifest is None:
        manifest = read_manifest(settings.data_dir, settings.min_year, settings.max_year,
                                 limit=config.limit, seed=config.seed)
    log.info(manifest.report())
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
        mlflow.log_params({**config.flat(), "test_split": TEST_SPLIT_RULE})
        summary = manifest.summary()
        mlflow.log_params({f"data_{k}": v for k, v in summary.items() if not isinstance(v, dict)})
        mlflow.log_dict(summary, "dataset/summary.json")
        if len(manifest.dropped):
            mlflow.log_text(manifest.dropped.to_csv(index=False), "dataset/dropped_rows.csv")
        columns = [c for c in ("coin_id", "year_from", "year_to", "group") if c in manifest.rows.columns]
        usable, test_index = split_test(manifest.rows)
        logged = manifest.rows[columns].assign(test=np.isin(np.arange(len(manifest.rows)), test_index))
        mlflow.log_input(from_pandas(logged, source=str(manifest.source), name="coins"), context="training")

        result = train_on_manifest(manifest, config, settings.cache_dir,
                                   on_metrics=lambda metrics, step=None: mlflow.log_metrics(metrics, step=step),
                                   tensor_dir=tensor_dir, trace=trace)
        model, quality = result.model, result.quality
        assert model is not None and quality is not None, "train_on_manifest gives rank 0 the served model"
        mlflow.set_tag("pretrained_weights", str(model.pretrained_loaded))
        _log_plots(result)
        with tempfile.TemporaryDirectory() as folder:
            from coinyear.model import save_checkpoint

            checkpoint = Path(folder) / "model.pt"
            save_checkpoint(model, checkpoint)
            info = log_model(checkpoint, input_example(manifest.rows),
                             registered_model_name=settings.model_name if register else None,
                             quality={**quality.save(Path(folder) / "quality"),
                                      # the OOD reference's coins, in its order: the non-test rows
                                      **reference_file(manifest.rows.iloc[usable], settings.cache_dir,
                                                       Path(folder) / "quality")},
                             torch_index=settings.model_torch_index)
        version = str(info.registered_model_version) if register and info.registered_model_version else None
        return RunOutcome(run.info.run_id, version, result.metrics)
