"""Distributed training benchmark: `coinyear train --distributed 2` against one process, same slice and recipe.

Two measurements, on this machine, in one run:

  * time: a one-process training run (`coinyear.train.run_training`, in a fresh interpreter; once with torch's
    default threads, once with 1 thread like each worker) and a distributed
    run (`coinyear.distributed.run_distributed_training`, 2 gloo processes under TorchDistributor local_mode)
    on the same slice, recipe and seed, each logging and registering into its own MLflow store. Reported: wall
    time (interpreter start to registered model), the training time rank 0 logged (`train_seconds`), hold-out
    MAE, peak resident memory of each process (VmHWM).
  * data memory on a larger slice, without a model (so it fits in minutes on 2 cores): what one epoch of data
    loading keeps in a process. "before" = the loading before distributed training existed (`load_arrays`
    stacks every image in memory, then each split was copied out of it); "rank r" = one of 2 ranks mapping the
    tensor files and reading its DistributedSampler shard for one epoch. Reported per process: VmHWM (counts
    the mapped file pages it read: they are shared page cache, reclaimable) and RssAnon (private memory).

    PYTHONPATH=src python benchmarks/distributed_bench.py
    PYTHONPATH=src python benchmarks/distributed_bench.py --limit 80 --memory-limit 200 --out /tmp/d.json  # smoke

Wall times on a machine shared with other jobs measure the load as much as the code: the CPU seconds (user +
system of the training processes, from getrusage) are the steadier number.

Writes benchmarks/results/distributed_bench.json (machine: CPU model name, cores; date; load average).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# isort: split
# this folder's modules: a script's own folder is first on sys.path when it runs
from common import REPO, RESULTS, SHARED_DATA, bench_settings, cpu_name, utc_now, write_json

sys.path.insert(0, str(REPO / "src"))


def machine() -> dict:
    """CPU model name, logical cores, torch version."""
    import torch

    return {"cpu_model": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__}


def recipe(args):
    from coinyear.model import ModelConfig
    from coinyear.recipe import TrainConfig

    model = ModelConfig(backbone=args.backbone, mode="shared", image_size=args.image_size, proj_dim=32)
    return TrainConfig(model=model, epochs=args.epochs, batch_size=args.batch_size, limit=args.limit, seed=1,
                       early_stopping=False)


# ------------------------------------------------------------------------------------------------ children
def child_one_process(args) -> None:
    """A one-process training run in this fresh interpreter; prints its result as JSON."""
    from coinyear.config import set_torch_threads
    from coinyear.data import read_manifest
    from coinyear.distributed import memory_mb
    from coinyear.train import run_training

    settings = bench_settings(Path(args.home), Path(args.data))
    set_torch_threads(settings)
    config = recipe(args)
    manifest = read_manifest(settings.data_dir, settings.min_year, settings.max_year, limit=config.limit,
                             seed=config.seed)
    outcome = run_training(settings, config, manifest)
    print(json.dumps({"metrics": outcome.metrics, "version": outcome.version, "memory_mb": memory_mb()}))


def child_data_epoch(args) -> None:
    """One epoch of data loading, as before (`--rank -1`) or as one of `--world` ranks; prints memory as JSON."""
    import numpy as np
    from torch.utils.data import DataLoader

    from coinyear.augment import make_augmentation
    from coinyear.data import ImageCache, choice_splits, load_arrays, mapped_arrays, read_manifest
    from coinyear.distributed import memory_mb
    from coinyear.fit import CoinDataset, shard_sampler

    config = recipe(args)
    rows = read_manifest(args.data, limit=args.limit, seed=config.seed).rows
    cache = ImageCache(Path(args.cache), config.model.image_size, grayscale=False)
    train, holdout = choice_splits(rows, 0, config.holdout_fraction, config.seed)[0][0]
    year_from, year_to = rows["year_from"].to_numpy(), rows["year_to"].to_numpy()
    augment = make_augmentation(config)
    if args.rank < 0:
        fronts, backs = load_arrays(rows, cache)
        # the code before this change copied each split out of the stacked arrays
        data = CoinDataset(fronts[train], backs[train], year_from[train], year_to[train], augment)
        held = (fronts[holdout], backs[holdout])
        loader = DataLoader(data, batch_size=config.batch_size, shuffle=True)
    else:
        fronts, backs = mapped_arrays(rows, cache, args.tensors)
        data = CoinDataset(fronts, backs, year_from, year_to, augment, index=train)
        held = None
        loader = DataLoader(data, batch_size=config.batch_size // args.world,
                            sampler=shard_sampler(data, args.rank, args.world, config.seed))
    seen = 0
    for front, *_ in loader:
        seen += len(front)
    if held is not None:
        seen += 0 * int(np.sum(held[0][:1]))  # keep the hold-out copy alive like the training run did
    print(json.dumps({"rows": len(rows), "samples": seen, "memory_mb": memory_mb()}))


def cpu_seconds_of_children() -> float:
    """User + system CPU time of every finished descendant (the TorchDistributor workers included)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_child(mode: str, args, env: dict | None = None, **extra) -> tuple[dict, float]:
    command = [sys.executable, __file__, "--child", mode, "--data", str(args.data), "--limit", str(extra.get(
        "limit", args.limit)), "--image-size", str(extra.get("image_size", args.image_size)), "--epochs",
        str(args.epochs), "--batch-size", str(args.batch_size), "--backbone", args.backbone]
    for key in ("home", "cache", "tensors", "rank", "world"):
        if key in extra:
            command += [f"--{key}", str(extra[key])]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src"), **(env or {})})
    if done.returncode:
        raise RuntimeError(f"{mode} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), time.perf_counter() - started


# ---------------------------------------------------------------------------------------------- benchmarks
def time_runs(args, work: Path) -> dict:
    from coinyear.data import read_manifest
    from coinyear.distributed import run_distributed_training
    from coinyear.spark import spark_session

    cpu = cpu_seconds_of_children()
    one, one_wall = run_child("one-process", args, home=work / "one")
    one_cpu, cpu = cpu_seconds_of_children() - cpu, cpu_seconds_of_children()
    # The same run with one torch thread, as each distributed worker has: separates the effect of splitting
    # the work from that of fewer OpenMP threads contending for the cores.
    single, single_wall = run_child("one-process", args, env={"COINYEAR_NUM_THREADS": "1"}, home=work / "single")
    single_cpu, cpu = cpu_seconds_of_children() - cpu, cpu_seconds_of_children()
    spark_session("coinyear-bench", master=f"local[{os.cpu_count() or 1}]")
    settings = bench_settings(work / "dist", args.data)
    config = recipe(args)
    manifest = read_manifest(settings.data_dir, settings.min_year, settings.max_year, limit=config.limit,
                             seed=config.seed)
    started = time.perf_counter()
    outcome = run_distributed_training(settings, config, manifest, processes=args.processes)
    dist_wall = time.perf_counter() - started
    dist_cpu = cpu_seconds_of_children() - cpu  # the workers (reaped by torchrun), not this process
    return {
        "one_process": {"wall_seconds": one_wall, "cpu_seconds": one_cpu,
                        "train_seconds": one["metrics"]["train_seconds"], "val_mae": one["metrics"]["val_mae"],
                        "peak_rss_mb": one["memory_mb"].get("VmHWM")},
        "one_process_1_thread": {"wall_seconds": single_wall, "cpu_seconds": single_cpu,
                                 "train_seconds": single["metrics"]["train_seconds"],
                                 "val_mae": single["metrics"]["val_mae"],
                                 "peak_rss_mb": single["memory_mb"].get("VmHWM")},
        "distributed": {"processes": outcome.processes, "wall_seconds": dist_wall, "cpu_seconds": dist_cpu,
                        "train_seconds": outcome.metrics["train_seconds"], "val_mae": outcome.metrics["val_mae"],
                        "peak_rss_mb": outcome.peak_rss_mb, "version": outcome.version},
    }


def memory_runs(args, work: Path) -> dict:
    extra = {"limit": args.memory_limit, "image_size": args.memory_image_size, "cache": work / "cache"}
    before, _ = run_child("data-epoch", args, rank=-1, **extra)  # also fills the image cache for the ranks
    ranks = [run_child("data-epoch", args, rank=r, world=args.processes, tensors=work / "tensors", **extra)[0]
             for r in range(args.processes)]
    row_mb = 2 * 3 * args.memory_image_size ** 2 / 2 ** 20
    return {"rows": before["rows"], "image_size": args.memory_image_size,
            "decoded_images_mb": round(before["rows"] * row_mb, 1),
            "before": before["memory_mb"], "ranks": [r["memory_mb"] for r in ranks],
            "samples": {"before": before["samples"], "ranks": [r["samples"] for r in ranks]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED_DATA)
    parser.add_argument("--limit", type=int, default=240, help="coins of the timing slice")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backbone", default="mobilenet_v3_small")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--memory-limit", type=int, default=1500, help="coins of the data-memory slice")
    parser.add_argument("--memory-image-size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS / "distributed_bench.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    for hidden in ("home", "cache", "tensors"):
        parser.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "one-process":
        return child_one_process(args)
    if args.child == "data-epoch":
        return child_data_epoch(args)

    result = {"date": utc_now(),
              "machine": machine(), "load_average_before": os.getloadavg(),
              "recipe": {"backbone": args.backbone, "image_size": args.image_size, "epochs": args.epochs,
                         "batch_size": args.batch_size, "limit": args.limit, "early_stopping": False}}
    with tempfile.TemporaryDirectory(prefix="distributed-bench-") as folder:
        work = Path(folder)
        print("timing: one process, then distributed ...", flush=True)
        result["time"] = time_runs(args, work)
        print(json.dumps(result["time"], indent=2), flush=True)
        print("data memory ...", flush=True)
        result["data_memory"] = memory_runs(args, work)
    result["load_average_after"] = os.getloadavg()
    write_json(args.out, result)
    print(json.dumps(result["data_memory"], indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
