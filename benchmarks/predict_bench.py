"""Collection scoring benchmark: coins/s of `coinyear predict` against the Spark path and the HTTP gateway.

The same photos (the first N OCRE coins, copied as `heads<id>.jpg` / `tails<id>.jpg` into a temporary folder)
are dated, for each model, by:

  * `coinyear predict --images DIR --out X.parquet` (one process: threaded decoding, batched forward passes);
  * `coinyear predict --images DIR --engine spark --out-table T` (local PySpark, `mlflow.pyfunc.spark_udf`);
  * `coinyear serve` on loopback (inference log on, as deployed): one coin per request from C concurrent clients,
    and B coins per request from 2 clients.

Each command is timed end to end (Python and model start included: what a user waits for); the one-coin
command `coinyear predict FRONT BACK` is timed too, which is that fixed start cost. The gateway is timed from
its first request (the server is already up and warm, as a deployed one is).

Models: "demo" = the recipe `make demo` uses (efficientnet_lite0, 128 px, 5-angle rotation TTA), trained for one
epoch on 200 coins (`coinyear train --epochs 1 --limit 200`: the same architecture and cost per coin, a weaker
fit); "light" = the test suite's model (mobilenet_v3_small, 64 px, 1 epoch on 80 coins). Both trained once into
--home and reused.

    python benchmarks/predict_bench.py                       # 300 coins, both models
    python benchmarks/predict_bench.py --coins 60 --models light

Writes benchmarks/results/predict_bench.{json,md}. Compare only numbers of one run (one machine, one load).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# isort: split
# this folder's modules: a script's own folder is first on sys.path when it runs
from common import COINYEAR, DATA_DIR, REPO, RESULTS, JsonPoster, coin_row, coinyear_env, utc_now, write_report
from serve_bench import machine, start_ours  # a sibling benchmark script


def prepare(home: Path, recipe: str, data: Path) -> None:
    """A production model of this recipe in `home`, trained once."""
    if (home / "mlflow.db").exists():
        return
    home.mkdir(parents=True, exist_ok=True)
    if recipe == "demo":
        flags = ["--epochs", "1", "--limit", "200"]
    else:
        flags = ["--backbone", "mobilenet_v3_small", "--image-size", "64", "--epochs", "1", "--limit", "80",
                 "--batch-size", "16", "--seed", "1", "--proj-dim", "32"]
    print(f"training the {recipe} model once: coinyear train {' '.join(flags)}", flush=True)
    subprocess.run([COINYEAR, "train", "--data", str(data), *flags, "--promote", "production"],
                   env=coinyear_env(home), check=True)


def timed(command: list[str], env: dict, cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def gateway(home: Path, logs: Path, bodies: list[bytes], clients: int) -> tuple[float, int]:
    """Seconds to send every body once over `clients` keep-alive connections; and the failed requests."""
    process, url, headers = start_ours(home, True, logs)
    try:
        process.wait_ready()
        queue, failed, lock = list(range(len(bodies))), [0], threading.Lock()

        def client():
            poster = JsonPoster(url, headers, timeout=300)
            while True:
                with lock:
                    if not queue:
                        break
                    index = queue.pop()
                if poster.post(bodies[index]) != 200:
                    with lock:
                        failed[0] += 1
            poster.close()

        warm = JsonPoster(url, headers, timeout=300)
        warm.post(bodies[0])
        warm.close()
        started = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return time.perf_counter() - started, failed[0]
    finally:
        process.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coins", type=int, default=300)
    parser.add_argument("--models", nargs="+", default=["demo", "light"], choices=["demo", "light"])
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 8], help="gateway: one coin per request")
    parser.add_argument("--batch", type=int, default=32, help="gateway: coins per batched request")
    parser.add_argument("--home", type=Path, default=REPO / ".coinyear" / "predict-bench")
    parser.add_argument("--data", type=Path, default=DATA_DIR)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import pandas as pd

    manifest = pd.read_csv(args.data / "manifest.csv").dropna(subset=["obverse", "reverse"]).iloc[:args.coins]
    work = Path(tempfile.mkdtemp(prefix="predict-bench-"))
    photos = work / "photos"
    photos.mkdir()
    for row in manifest.itertuples():
        shutil.copy(args.data / row.obverse, photos / f"heads{row.coin_id}.jpg")
        shutil.copy(args.data / row.reverse, photos / f"tails{row.coin_id}.jpg")
    pairs = [(photos / f"heads{c}.jpg", photos / f"tails{c}.jpg") for c in manifest["coin_id"]]

    singles = [json.dumps({"inputs": [coin_row(*pair)]}).encode() for pair in pairs]
    batches = [json.dumps({"inputs": [coin_row(*pair) for pair in pairs[i:i + args.batch]]}).encode()
               for i in range(0, len(pairs), args.batch)]
    report = {"date": utc_now(), "machine": machine(), "coins": len(pairs),
              "loadavg_start": os.getloadavg()[0], "models": []}
    n = len(pairs)
    for recipe in args.models:
        home = (args.home / recipe).resolve()
        prepare(home, recipe, args.data)
        env = coinyear_env(work / recipe, store=home)  # outputs and gateway state: not the model home
        (work / recipe).mkdir()
        rows = []

        def add(path: str, seconds: float, rows=rows, recipe=recipe, **extra):
            rows.append({"path": path, "seconds": seconds, "coins_per_s": n / seconds, **extra})
            print(f"  {recipe:<6} {path:<44} {seconds:7.1f} s  {n / seconds:7.1f} coins/s", flush=True)

        cli = [COINYEAR, "predict"]
        one = timed([*cli, str(pairs[0][0]), str(pairs[0][1])], env, work)
        rows.append({"path": "coinyear predict FRONT BACK (one coin: start cost)", "seconds": one})
        print(f"  {recipe:<6} one coin (start cost) {one:7.1f} s", flush=True)
        add("coinyear predict --images (local)", timed(
            [*cli, "--images", str(photos), "--out", str(work / recipe / "out.parquet")], env, work))
        add("coinyear predict --engine spark", timed(
            [*cli, "--images", str(photos), "--engine", "spark", "--out-table", f"bench_{recipe}"], env, work))
        logs = work / recipe / "logs"
        logs.mkdir()
        gateway_home = work / recipe / "gateway"
        gateway_home.mkdir()
        os.symlink(home / "mlflow.db", gateway_home / "mlflow.db")  # start_ours reads the registry from its home
        for clients in args.clients:
            seconds, failed = gateway(gateway_home, logs, singles, clients)
            add(f"gateway, 1 coin/request, {clients} clients", seconds, failed=failed)
        seconds, failed = gateway(gateway_home, logs, batches, 2)
        add(f"gateway, {args.batch} coins/request, 2 clients", seconds, failed=failed)
        report["models"].append({"recipe": recipe, "home": str(home), "results": rows})
    report["loadavg_end"] = os.getloadavg()[0]
    lines = [(f"{report['date']}, {report['machine']['cpu']}, {report['machine']['cores']} cores, {n} OCRE coins; "
              f"load average {report['loadavg_start']:.1f} at start, {report['loadavg_end']:.1f} at end"),
             "", "| model | path | seconds | coins/s |", "|---|---|---:|---:|"]
    for model in report["models"]:
        for row in model["results"]:
            rate = f"{row['coins_per_s']:.1f}" if "coins_per_s" in row else "–"
            lines.append(f"| {model['recipe']} | {row['path']} | {row['seconds']:.1f} | {rate} |")
    write_report(args.out, "predict_bench", report, "\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
