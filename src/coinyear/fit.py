"""The fit: the dataset a training reads, its loss, and the epoch loop with early stopping, in one process or as
one rank of DistributedDataParallel; also scoring image arrays with a model (`infer_arrays`), which the loop's
validation and the training run's calibration and test scores use."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from typing import cast

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from coinyear import evaluate
from coinyear.backbones import early_stages
from coinyear.model import CoinEnsemble, DualImageRegressor
from coinyear.recipe import TrainConfig
from coinyear.runtime import reused_memory, scored_batches

log = logging.getLogger(__name__)


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


# ------------------------------------------------------------------------------------------------- loss
def loss_fn(predicted, year_from, year_to, kind: str, scale: float) -> torch.Tensor:
    """Loss in standardised years. `interval`: zero inside the label range, Huber outside; `mse`: midpoint."""
    if kind == "mse":
        return torch.mean(((predicted - (year_from + year_to) / 2) / scale) ** 2)
    outside = torch.relu(year_from - predicted) + torch.relu(predicted - year_to)
    return nn.functional.smooth_l1_loss(outside / scale, torch.zeros_like(outside), beta=0.1)


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
                 batch_size: int = 16,
                 device: torch.device | str | None = None, with_features: bool = False,
                 index: np.ndarray | None = None, with_heads: bool = False) -> dict[str, np.ndarray]:
    """Years of uint8 image arrays (rows `index`, default all; memory-mapped arrays are read batch by batch);
    for an ensemble also the spread over rotations and (optionally) the embeddings and, for a model with a named
    portrait head, its probabilities and its rotated views' disagreement: {"year": [N], "spread": [N],
    "features": [N, D], "portraits": [N, classes], "disagreement": [N]};
    `with_heads` adds the heads' raw outputs "regression" and "logits" (`model.infer`)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    # `scored_batches` scores channels-last on a CPU (1.7x faster: 96 vs 57 photos/s, the demo model) with the
    # freed activations kept for the next batch (at 192 px with the rotation TTA, 73 instead of 205 ms per coin;
    # batches of 16 coins peak at 3.5 GB where 64 take 8: benchmarks/score_memory.py); the model goes back to the
    # layout it came in (fit's validation keeps channels-last)
    kernels = [p for p in model.parameters() if p.dim() == 4]
    came_ordinary = bool(kernels) and all(p.is_contiguous() for p in kernels)
    model.to(device)
    rows = np.arange(len(fronts)) if index is None else np.asarray(index, dtype=np.int64)

    def photos(side: np.ndarray, chosen: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(side[chosen])).to(device).float() / 255

    chunks = (rows[start:start + batch_size] for start in range(0, len(rows), batch_size))
    batches = ((photos(fronts, chosen), photos(backs, chosen)) for chosen in chunks)
    # every key `infer` answers is passed on, whatever it is (year and spread as they come, the rest as float32)
    parts: dict[str, list[np.ndarray]] = {}
    for scored in scored_batches(model, batches, with_features, with_heads):
        for key, value in scored.items():
            parts.setdefault(key, []).append((value if key in ("year", "spread") else value.float()).cpu().numpy())
    if came_ordinary:
        model.to(memory_format=torch.contiguous_format)
    out = {key: np.concatenate(values) for key, values in parts.items()}
    out.setdefault("year", np.zeros(0))  # no rows
    out.setdefault("spread", np.zeros_like(out["year"]))
    if with_features:
        out.setdefault("features", np.zeros((0, 0)))
    return out


def predict_arrays(model: DualImageRegressor | CoinEnsemble, fronts: np.ndarray, backs: np.ndarray,
                   batch_size: int = 16,
                   device: torch.device | str | None = None) -> np.ndarray:
    return infer_arrays(model, fronts, backs, batch_size, device)["year"]


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
    frozen = freeze_early_stages(model, config.frozen_blocks)
    try:
        with reused_memory() if device.type == "cpu" else contextlib.nullcontext():
            history = _fit_epochs(model, train, config, val, name, on_epoch, epochs, trace, device, memory_format,
                                  frozen)
    finally:
        for module in frozen:
            module.requires_grad_(True)
    model.to("cpu", memory_format=torch.contiguous_format)  # type: ignore[call-overload]  # as above
    return history


def freeze_early_stages(model: DualImageRegressor, blocks: int) -> list[nn.Module]:
    """Stop training the stem and the first `blocks` stages of the model's backbone(s) (`backbones.early_stages`):
    no gradient, and the epoch loop keeps them in eval mode so their BatchNorm statistics stay the pretrained
    ones. Returns the frozen modules (none for 0). At 192 px, efficientnet_lite0 steps take 1.31 instead of 1.59
    s with 2 stages frozen, 1.04 with 3 (benchmarks/train_step.py --freeze-early, 2-core AMD EPYC VM): the
    early stages see the most pixels. A backbone without its ImageNet weights trains whole: freezing random
    weights would only cripple it."""
    if blocks <= 0:
        return []
    if not model.pretrained_loaded:
        log.info("frozen_blocks %d ignored: the backbone has no pretrained weights, every weight is trained", blocks)
        return []
    frozen: list[nn.Module] = []
    for net in dict.fromkeys([model.front_net, model.back_net]):  # a shared backbone once
        stages = early_stages(net)
        if blocks >= len(stages):
            raise ValueError(f"frozen_blocks {blocks}: the {model.config.backbone} backbone has {len(stages) - 1} "
                             "stages after its stem; freeze fewer")
        frozen += [module for stage in stages[:blocks + 1] for module in stage]
    for module in frozen:
        module.requires_grad_(False)
    return frozen


def _fit_epochs(model: DualImageRegressor, train: CoinDataset, config: TrainConfig, val: CoinDataset | None,
                name: str, on_epoch, epochs: int, trace: list | None, device: torch.device,
                memory_format: torch.memory_format, frozen: list[nn.Module]) -> list[dict]:
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
    backbone_params = [p for p in model.parameters() if id(p) not in head_ids and p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": backbone_params, "lr": backbone_lr},
                                   {"params": head_params, "lr": config.lr}], weight_decay=config.weight_decay)
    total_steps = max(1, epochs * len(loader))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[backbone_lr, config.lr], total_steps=total_steps, pct_start=0.15)
    scale = float(model.year_scale)
    with_aux = bool(model.aux_heads) and config.aux_weight > 0
    # the weights' moving average (BatchNorm statistics included), validated and kept in place of the weights
    averaged = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
                if config.ema_decay > 0 else None)
    judged = cast(DualImageRegressor, averaged.module) if averaged is not None else model
    history, best_mae, best_state, stale = [], math.inf, None, 0
    for epoch in range(1, epochs + 1):
        size = config.early_size(epoch, epochs)
        if sampler is not None:
            sampler.set_epoch(epoch)
        if trace is not None:
            rows = list(sampler) if sampler is not None else []
            trace.append([int(train.index[i]) for i in rows[:len(loader) * batch_size]])
        step.train()
        for module in frozen:  # pretrained BatchNorm statistics, not this batch's
            module.eval()
        started, losses = time.perf_counter(), []
        # The bar counts the batches of this epoch (rank 0 only: the other ranks run the same steps).
        bar = tqdm(loader, desc=f"{name} epoch {epoch}/{epochs}", unit="batch", leave=False, disable=rank != 0)
        for batch in bar:
            front, back, year_from, year_to, *aux = (t.to(device, non_blocking=True) for t in batch)
            if size is not None:  # progressive resizing: an early epoch, at the cheap size
                front, back = (nn.functional.interpolate(t, size=(size, size), mode="bilinear", antialias=True,
                                                         align_corners=False) for t in (front, back))
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
            if averaged is not None:
                averaged.update_parameters(model)
            losses.append(loss.item())
            bar.set_postfix(loss=round(losses[-1], 3))
        loss_sum, loss_count = float(np.sum(losses)), float(len(losses))
        if world > 1:
            loss_sum, loss_count = _all_sum([loss_sum, loss_count], device)
            # BatchNorm statistics are updated per rank: take rank 0's, so all ranks validate and keep one model.
            import torch.distributed as dist

            for buffer in [*model.buffers(), *(judged.buffers() if averaged is not None else ())]:
                dist.broadcast(buffer, 0)
        record = {"epoch": epoch, "train_loss": loss_sum / loss_count if loss_count else float("nan"),
                  "epoch_seconds": time.perf_counter() - started,
                  "train_image_size": float(size or model.config.image_size)}
        if val is not None and len(val):
            predicted = validation_years(judged, val, device)
            metrics = evaluate.regression_metrics(predicted, val.year_from.numpy(), val.year_to.numpy())
            record.update(val_mae=metrics["mae"], val_range_mae=metrics["range_mae"])
            if metrics["mae"] < best_mae:
                best_mae, stale = metrics["mae"], 0
                if config.early_stopping:
                    best_state = {k: v.detach().cpu().clone() for k, v in judged.state_dict().items()}
                record["best"] = True
            elif size is None:  # an early epoch is validated at the served size it has not trained at
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
    elif averaged is not None:
        model.load_state_dict(averaged.module.state_dict())
    return history


def best_epoch(history: list[dict]) -> int:
    marked = [h["epoch"] for h in history if h.get("best")]
    return marked[-1] if marked else history[-1]["epoch"]
