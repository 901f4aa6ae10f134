"""CPU cost of one training step (efficientnet_lite0 by default, 32 coins = 64 photos of 128 px, forward +
backward + AdamW) under the options issue 13 asked about: CPU seconds (user, sys), minor page faults and wall
time per step, appended as one JSON line to --out. Run each option in its own process, interleaved, on the
same machine state (load average is recorded):

    for o in "" "--reuse-memory" "--channels-last" "--bf16" "--reuse-memory --channels-last"; do
        .venv/bin/python benchmarks/train_step.py $o; done
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import time

import numpy as np
import torch

from coinyear.experiment import new_model
from coinyear.fit import freeze_early_stages, loss_fn
from coinyear.model import ModelConfig
from coinyear.recipe import TrainConfig
from coinyear.runtime import reused_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--reuse-memory", action="store_true", help="glibc mmap off while training (train.py)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--freeze-early", type=int, default=0,
                        help="freeze the stem and this many first stages (as --frozen-blocks trains)")
    parser.add_argument("--freeze-backbone", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/train_step.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = TrainConfig(model=ModelConfig(backbone=args.backbone, image_size=args.size), epochs=1)
    model = new_model(config, [-100, 100], [0, 200])
    # the trainer's own freezing (TrainConfig.frozen_blocks): the stem and the first N stages, BatchNorm in eval
    frozen = freeze_early_stages(model, args.freeze_early)
    if args.freeze_backbone:
        model.front_net.requires_grad_(False)
        frozen = [model.front_net]
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    front = torch.rand(32, 3, args.size, args.size).contiguous(memory_format=layout)
    back = torch.rand(32, 3, args.size, args.size).contiguous(memory_format=layout)
    year_from, year_to = torch.full((32,), -10.0), torch.full((32,), 10.0)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            predicted = model(front, back)
        loss_fn(predicted.float(), year_from, year_to, "interval", 50.0).backward()
        optimizer.step()

    def usage() -> np.ndarray:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return np.array([r.ru_utime, r.ru_stime, r.ru_minflt, time.perf_counter()])

    with reused_memory() if args.reuse_memory else contextlib.nullcontext():
        model.train()
        for module in frozen:
            module.eval()
        step()  # warm-up: first-call allocations and oneDNN primitive creation
        start = usage()
        for _ in range(args.steps):
            step()
        per_step = (usage() - start) / args.steps
    record = {"options": {k: v for k, v in vars(args).items() if v and k not in ("out", "steps")},
              "cpu_s": round(per_step[0] + per_step[1], 2), "user_s": round(per_step[0], 2),
              "sys_s": round(per_step[1], 2), "minor_faults_k": round(per_step[2] / 1e3, 1),
              "wall_s": round(per_step[3], 2), "load": round(os.getloadavg()[0], 1)}
    print(json.dumps(record))
    with open(args.out, "a") as handle:
        handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
