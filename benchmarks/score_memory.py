"""What scoring image arrays costs on a CPU, per coin: the way training scores its validation, calibration and
test coins (`coinyear.fit.infer_arrays`: the served network with its 5-angle rotation TTA, features on), and the
packaged model's PyTorch fallback (`coinyear.runtime.torch_infer`, what a model without its ONNX graph scores
with) against `coinyear.model.infer` called on the whole request as the fallback did before.

Random photos at the recipe's size (speed does not depend on the pixels or the weights), one process; for each
batch size, scored as `infer_arrays` does now (freed memory kept by `reused_memory`) and with glibc's default
allocator (every large block a fresh mmap, unmapped on free: what scoring did before). Reported per coin: wall
milliseconds, CPU milliseconds in user space and in the kernel, minor page faults, and the process's peak
resident memory so far (it only grows: read it down the table).

    python benchmarks/score_memory.py --name lite0-192

About a minute on 2 cores.
"""

from __future__ import annotations

import contextlib
import resource
import time
from unittest import mock

import numpy as np
import torch

from coinyear import fit
from coinyear.config import setting_default
from coinyear.experiment import new_model
from coinyear.model import CoinEnsemble, ModelConfig, infer
from coinyear.recipe import TTA_ANGLES, TrainConfig
from coinyear.runtime import torch_infer

# isort: split
# this folder's modules: a script's own folder is first on sys.path when it runs
from common import results_parser, write_results

# The allocators compared, each as the context its scoring pass runs in: infer_arrays without its kept-memory
# block (glibc's defaults), and infer_arrays as it is.
ALLOCATORS = {"glibc default (before)": lambda: mock.patch.object(fit, "reused_memory", contextlib.nullcontext),
              "kept memory (infer_arrays now)": contextlib.nullcontext}


def usage() -> tuple[int, float, float, int]:
    """(minor faults, kernel seconds, user seconds, peak resident KB) of this process so far."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_minflt, own.ru_stime, own.ru_utime, own.ru_maxrss


def main() -> None:
    parser = results_parser(__doc__, "score_memory", name="lite0")
    parser.add_argument("--size", type=int, default=setting_default("image_size"))
    parser.add_argument("--coins", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    args = parser.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    fronts = rng.integers(0, 255, (args.coins, 3, args.size, args.size), dtype=np.uint8)
    backs = rng.integers(0, 255, (args.coins, 3, args.size, args.size), dtype=np.uint8)
    years = rng.integers(-20, 120, args.coins)
    model = new_model(TrainConfig(model=ModelConfig(image_size=args.size)), years, years + 5)
    served = CoinEnsemble([model], TTA_ANGLES)
    fit.infer_arrays(served, fronts[:4], backs[:4], batch_size=4)  # warm-up: one-time costs out of the rows
    rows = []
    lines = [f"## Scoring {args.coins} coins of {args.size} px with the {len(TTA_ANGLES)}-angle rotation TTA "
             "(`infer_arrays`), per coin", "",
             "| allocator | batch (coins) | wall ms | user ms | kernel ms | minor faults | peak RSS so far (GB) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for batch in args.batches:
        for allocator, context in ALLOCATORS.items():
            with context():
                faults, kernel, user, _ = usage()
                clock = time.perf_counter()
                fit.infer_arrays(served, fronts, backs, batch_size=batch, with_features=True)
                wall = time.perf_counter() - clock
            after = usage()
            row = {"allocator": allocator, "batch": batch, "wall_ms": 1000 * wall / args.coins,
                   "user_ms": 1000 * (after[2] - user) / args.coins,
                   "kernel_ms": 1000 * (after[1] - kernel) / args.coins,
                   "minor_faults": (after[0] - faults) / args.coins, "peak_rss_gb": after[3] / 1e6}
            rows.append(row)
            lines.append(f"| {allocator} | {batch} | {row['wall_ms']:.0f} | {row['user_ms']:.0f} | "
                         f"{row['kernel_ms']:.0f} | {row['minor_faults']:,.0f} | {row['peak_rss_gb']:.2f} |")
    fallback = fallback_rows(served, fronts, backs)
    lines += ["", f"## The PyTorch fallback, one request of 1 or 16 coins at {args.size} px, median of 5 (ms)", "",
              "| scoring call | 1 coin | 16 coins |", "|---|---:|---:|"]
    lines += [f"| {row['call']} | {row['ms_batch1']:.0f} | {row['ms_batch16']:.0f} |" for row in fallback]
    write_results(args.out, args.name, {"size": args.size, "coins": args.coins, "rows": rows,
                                        "fallback": fallback}, lines, started)


def fallback_rows(served: CoinEnsemble, fronts: np.ndarray, backs: np.ndarray) -> list[dict]:
    """Milliseconds of one scoring call on 1 and on 16 coins (features on; median of 5 after a warm-up): `infer`
    on the whole request in the model's ordinary layout (the fallback before), and `torch_infer` (now)."""
    calls = {"model.infer, whole request, ordinary layout (before)": infer,
             "runtime.torch_infer: channels-last, kept memory, 16-coin batches (now)": torch_infer}
    rows = []
    for call, run in calls.items():
        served.to(memory_format=torch.contiguous_format)  # each call starts from the layout a checkpoint loads in
        row: dict = {"call": call}
        for batch in (1, 16):
            front, back = (torch.from_numpy(side[:batch]).float() / 255 for side in (fronts, backs))
            run(served, front, back, True)
            times = []
            for _ in range(5):
                clock = time.perf_counter()
                run(served, front, back, True)
                times.append(1000 * (time.perf_counter() - clock))
            row[f"ms_batch{batch}"] = float(np.median(times))
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
