"""Serving benchmark: the coinyear gateway against `mlflow models serve` on the same registered model.

Models: `default` is what `make demo` registers and users get (efficientnet_lite0, shared backbone, 192 px,
5-angle rotation TTA: 10 backbone passes per request), next to the light models (one pass per photo, no TTA).
Each is trained for one epoch on a small slice of the reference data (speed does not depend on the weights),
registered with its checked ONNX graph (coinyear.runtime) and promoted to production in a benchmark home
(reused on later runs). Then, on the same machine in the same run:

  * our gateway (`coinyear serve`) with the Delta inference log on, and with it off;
  * `mlflow models serve -m models:/coinyear@production --env-manager local` (MLflow's scoring server);

all three run at once and get closed-loop clients (1, 4, 16 at a time; every client sends its next request when
its last one is answered) posting the same real coin photo pair as `{"inputs": [...]}`, plain and with
`"params": {"interval": 0.9}` (year, range and OOD flag), in interleaved rounds. Reported: requests/s, p50 and p99
latency, errors. Next to them the compute bound: the model's FLOPs per request (one coin = two photos, all TTA
passes, counted with torch's FlopCounterMode) against this machine's float32 matmul GFLOP/s; the scoring call
alone in-process (PyTorch, ONNX Runtime and OpenVINO, batch 1 and 16); and how far each ONNX runtime's years
are from PyTorch's on hold-out coins (coins outside the training slice). The load average is recorded: the
machine may be shared.

    python benchmarks/serve_bench.py                                   # default + light models, 1/16 clients
    python benchmarks/serve_bench.py --seconds 3 --models default --name serve_bench-default
    python benchmarks/serve_bench.py --models default --sweep 1 1 --sweep 1 2 --sweep 2 1 --sweep 2 2 \
        --name serve_bench-threads      # our gateway per COINYEAR_NUM_THREADS x COINYEAR_BATCH_WORKERS

Writes benchmarks/results/serve_bench.{json,md,png}. Numbers depend on the machine: compare only rows of one run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import statistics
import sys
import threading
import time
from functools import partial
from pathlib import Path

# isort: split
# this folder's modules: a script's own folder is first on sys.path when it runs
from common import (
    BIN,
    DATA_DIR,
    INVOCATIONS,
    REPO,
    RESULTS,
    JsonPoster,
    Server,
    bearer,
    bench_settings,
    coin_row,
    coinyear_env,
    cpu_name,
    free_port,
    gateway,
    git_commit,
    load_production,
    loadavg,
    median_ms,
    percentile,
    store_uri,
    utc_minute,
    write_report,
)

TOKEN = "bench-token"


# ------------------------------------------------------------------------------------------------ model
# name -> (backbone, rotation TTA). `default` is TrainConfig's own recipe (make demo); the light models make one
# pass per photo, so the server's own costs (decoding, batching, logging) are the largest share.
MODELS = {"default": ("efficientnet_lite0", None), "mobilenet_v3_small": ("mobilenet_v3_small", ()),
          "resnet18": ("resnet18", ())}


def prepare_model(home: Path, name: str, image_size: int, limit: int, data_dir: Path) -> str:
    """A production model of this kind in `home` (trained once, reused afterwards); its version."""
    import mlflow

    from coinyear import registry
    from coinyear.model import ModelConfig
    from coinyear.train import TrainConfig, run_training

    settings = bench_settings(home, data_dir)
    version = registry.version_by_alias(settings, registry.PRODUCTION) if (home / "mlflow.db").exists() else None
    if version:
        mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
        run = mlflow.MlflowClient().get_run(mlflow.MlflowClient(registry_uri=settings.mlflow_registry_uri)
                                            .get_model_version(settings.model_name, version).run_id)
        size = run.data.params.get("image_size")
        if "openvino_max_abs_diff_years" in run.data.metrics and size in (None, str(image_size)):
            return version
        print(f"{home} holds a model logged before the OpenVINO check or at another size ({size} px, not "
              f"{image_size}): training a new one", flush=True)
        shutil.rmtree(home)
    home.mkdir(parents=True, exist_ok=True)  # sqlite creates the database file, not its folder
    backbone, tta = MODELS[name]
    print(f"training {name} ({backbone}) for 1 epoch on {limit} coins (once; reused by later runs)", flush=True)
    config = TrainConfig(model=ModelConfig(backbone=backbone, image_size=image_size), epochs=1, limit=limit,
                         batch_size=16, seed=1, **({} if tta is None else {"tta_angles": tta}))
    outcome = run_training(settings, config)
    registry.promote(settings, outcome.version, registry.PRODUCTION)
    return outcome.version


def trained_on(home: Path, version: str) -> str:
    """How the served version was trained, from its MLflow run (speed does not depend on it; honesty does)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=store_uri(home), registry_uri=store_uri(home))
    params = client.get_run(client.get_model_version("coinyear", version).run_id).data.params
    return f"{params.get('epochs', '?')} epoch(s) on {params.get('data_valid', '?')} coins"


def holdout_tensors(data_dir: Path, skip: int, count: int, size: int, grayscale: bool):
    """`count` coins after the first `skip` rows of the manifest (the training slice), decoded as served."""
    import numpy as np
    import pandas as pd
    import torch

    from coinyear.pyfunc import InvalidCoinInput, decode_pair

    rows = pd.read_csv(data_dir / "manifest.csv").iloc[skip:].dropna(subset=["obverse", "reverse"])
    pairs = []
    for row in rows.itertuples():
        if len(pairs) == count:
            break
        try:
            pairs.append(decode_pair((data_dir / row.obverse).read_bytes(), (data_dir / row.reverse).read_bytes(),
                                     size, grayscale))
        except (OSError, InvalidCoinInput):  # the reference data has a few unreadable photos: not coins to time
            continue
    return tuple(torch.from_numpy(np.stack([pair[side] for pair in pairs])).float() / 255 for side in (0, 1))


def runtime_check(home: Path, data_dir: Path, skip: int, count: int) -> dict:
    """In-process: the scoring call's time with each runtime (PyTorch, ONNX Runtime, OpenVINO; batch 1 and 16,
    median of repeats), and each ONNX runtime's largest year difference from PyTorch on `count` hold-out coins."""
    import torch

    from coinyear.model import infer
    from coinyear.runtime import OnnxScorer, OpenVinoScorer

    model = load_production(home)
    fronts, backs = holdout_tensors(data_dir, skip, count, model.size, model.grayscale)
    out = {"engine": model.engine, "holdout_coins": len(fronts)}
    runs = {"pytorch": lambda f, b: infer(model.model, f, b, True)}
    if model.onnx_path is not None:
        runs.update({name: scorer(model.onnx_path).infer for name, scorer in
                     (("onnxruntime", OnnxScorer), ("openvino", OpenVinoScorer))})
        # in batches of 16: 200 coins x 10 rotated photos at once take ~20 GB
        plain = torch.cat([infer(model.model, fronts[i:i + 16], backs[i:i + 16])["year"]
                           for i in range(0, len(fronts), 16)])
        for name in ("onnxruntime", "openvino"):
            years = torch.cat([runs[name](fronts[i:i + 16], backs[i:i + 16])["year"]
                               for i in range(0, len(fronts), 16)])
            out[f"{name}_holdout_max_abs_diff_years"] = float((years - plain).abs().max())
    for batch in (1, 16):
        f, b = fronts[:batch], backs[:batch]
        for name, run in runs.items():
            out[f"{name}_ms_batch{batch}"] = median_ms(partial(run, f, b), max(3, 24 // batch))
    return out


def flops_per_request(home: Path) -> float:
    """FLOPs of scoring one coin (front + back, every TTA rotation and member) with the production model."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = load_production(home)
    channels = 1 if model.grayscale else 3
    fronts = backs = torch.rand(1, channels, model.size, model.size)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.model(fronts, backs)
    return float(counter.get_total_flops())


def matmul_gflops(tries: int = 8, seconds: float = 0.4, n: int = 1024) -> float:
    """Float32 matrix-multiply GFLOP/s on this machine with torch's default threads: the best of several short
    tries, i.e. what the cores give when nothing else runs on them (the bound is a best case too)."""
    import torch

    a, b = torch.rand(n, n), torch.rand(n, n)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(tries):
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            a @ b
            count += 1
        best = max(best, 2 * n ** 3 * count / (time.perf_counter() - started) / 1e9)
    return best


# ---------------------------------------------------------------------------------------------- servers
def start_ours(home: Path, logging_on: bool, out: Path, threads: int | None = None,
               workers: int | None = None) -> tuple[Server, str, dict]:
    """Our gateway; with `threads`/`workers` (the sweep) COINYEAR_NUM_THREADS / COINYEAR_BATCH_WORKERS, and its
    own home and name."""
    tuned = threads is not None or workers is not None
    name = f"coinyear-t{threads}-w{workers}" if tuned else f"coinyear-log-{'on' if logging_on else 'off'}"
    # each gateway needs its own COINYEAR_HOME (one spool writer per folder); all read the same registry
    own_home = home / name if tuned else home if logging_on else home / "log-off"
    env = coinyear_env(own_home, store=home, COINYEAR_API_TOKENS=TOKEN,
                       COINYEAR_INFERENCE_LOG=str(logging_on).lower(),
                       **({"COINYEAR_NUM_THREADS": str(threads)} if threads else {}),
                       **({"COINYEAR_BATCH_WORKERS": str(workers)} if workers else {}))
    server, url = gateway(name, env, out / f"{home.name}-{name}.log")
    return server.launch(), url + INVOCATIONS, bearer(TOKEN)


def start_mlflow(home: Path, out: Path) -> tuple[Server, str, dict]:
    """`mlflow models serve` of the home's production model (MLflow's scoring server), launched."""
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": store_uri(home), "MLFLOW_REGISTRY_URI": store_uri(home),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # it runs `uvicorn` from PATH
    server = Server("mlflow-models-serve",
                    [str(BIN / "mlflow"), "models", "serve", "-m", "models:/coinyear@production",
                     "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                    env, f"http://127.0.0.1:{port}/ping", out / f"{home.name}-mlflow.log")
    return server.launch(), f"http://127.0.0.1:{port}/invocations", {}


# ------------------------------------------------------------------------------------------------- load
def run_load(url: str, body: bytes, headers: dict, clients: int, seconds: float, warmup: float = 1.0) -> dict:
    """Closed loop: `clients` threads, each posting the next request as soon as the last is answered.

    One keep-alive `JsonPoster` per client.
    """
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    start_at = time.perf_counter() + 0.2
    measure_from, stop_at = start_at + warmup, start_at + warmup + seconds

    def client():
        poster = JsonPoster(url, headers)
        while time.perf_counter() < start_at:
            time.sleep(0.001)
        while (now := time.perf_counter()) < stop_at:
            try:
                ok = poster.post(body) == 200
            except (OSError, http.client.HTTPException):
                ok = False
                poster.reconnect()
            done = time.perf_counter()
            if now >= measure_from:
                with lock:
                    if ok:
                        latencies.append(done - now)
                    else:
                        errors[0] += 1
        poster.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"clients": clients, "seconds": seconds, "errors": errors[0], "latencies": latencies}


def aggregate(server: str, clients: int, interval: bool, runs: list[dict]) -> dict:
    """Pool the rounds of one (server, clients) point: throughput over all measured time, pooled latencies."""
    ordered = sorted(latency for run in runs for latency in run["latencies"])
    seconds = sum(run["seconds"] for run in runs)

    return {"server": server, "clients": clients, "interval": interval, "requests": len(ordered),
            "errors": sum(run["errors"] for run in runs), "rps": len(ordered) / seconds,
            "rps_rounds": [len(run["latencies"]) / run["seconds"] for run in runs],
            "p50_ms": 1000 * percentile(ordered, 0.50), "p99_ms": 1000 * percentile(ordered, 0.99),
            "mean_ms": 1000 * statistics.fmean(ordered) if ordered else float("nan")}


def bench_servers(starts, bodies: dict[bool, bytes], clients: list[int], seconds: float,
                  rounds: int) -> tuple[list[dict], list[str]]:
    """(results, the load average after each round). All servers up at once; rounds interleave them point by
    point (clients x interval off/on x server), so drifting background load on a shared machine hits every
    server alike instead of whichever happened to run during a busy minute."""
    servers = [start() for start in starts]
    try:
        for process, url, headers in servers:
            process.wait_ready()
            for body in bodies.values():  # warm caches, allocator, connection handling
                run_load(url, body, headers, 4, 2.0, warmup=0.5)
        runs: dict[tuple[str, int, bool], list[dict]] = {}
        loads = []
        for round_index in range(rounds):
            for count in clients:
                for interval, body in bodies.items():
                    for process, url, headers in servers:
                        runs.setdefault((process.name, count, interval), []).append(
                            run_load(url, body, headers, count, seconds))
            loads.append(loadavg())
            print(f"  round {round_index + 1}/{rounds} done (load {loads[-1]})", flush=True)
        results = []
        for (name, count, interval), point in runs.items():
            result = aggregate(name, count, interval, point)
            print(f"  {name:<22} {count:>2} clients interval {'on ' if interval else 'off'}: {result['rps']:7.1f} "
                  f"req/s  p50 {result['p50_ms']:7.1f} ms  p99 {result['p99_ms']:7.1f} ms  errors {result['errors']}",
                  flush=True)
            results.append(result)
        return results, loads
    finally:
        for process, _, _ in servers:
            process.stop()


# ----------------------------------------------------------------------------------------------- report
def machine() -> dict:
    from importlib.metadata import version

    import torch

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "onnxruntime": version("onnxruntime"),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [(f"Machine: {m['cpu']}, {m['cores']} cores (torch threads {m['torch_threads']}), "
             f"torch {m['torch']}, onnxruntime {m.get('onnxruntime', '-')}, Python {m['python']}; measured matmul "
             f"{report['matmul_gflops']:.1f} GFLOP/s (float32, 1024x1024). {report['date']}. {report['rounds']} "
             f"interleaved rounds x {report['seconds']:.0f} s per point, closed-loop clients on the same machine, "
             f"one real coin pair ({report['body_bytes'] // 1024} KiB JSON) per request, plain or with "
             f"`params.interval` 0.9. Load average (1/5/15 min) at start: {report['loadavg']}, "
             f"at end: {report['loadavg_end']}. Speed does not depend on the weights; `default` = efficientnet_lite0, "
             "shared, 128 px, 5-angle rotation TTA (as make demo). "
             + " ".join(f"{model['name']} (version {model['version']}, trained {model.get('trained', '?')}; "
                        f"commit {model.get('git_commit', '?')}): load after each round "
                        f"{' / '.join(model.get('loadavg_rounds', []))}." for model in report["models"])), "",
             "| model | server | clients | interval | req/s | req/s per round | p50 ms | p99 ms | errors |",
             "|---|---|---:|---|---:|---|---:|---:|---:|"]
    for model in report["models"]:
        for row in model["results"]:
            rounds = " ".join(f"{value:.0f}" for value in row["rps_rounds"])
            lines.append(f"| {model['name']} | {row['server']} | {row['clients']} | "
                         f"{'on' if row['interval'] else 'off'} | {row['rps']:.1f} | {rounds} | "
                         f"{row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {row['errors']} |")
    if not any(model["summary"] for model in report["models"]):  # the thread sweep: no MLflow to compare with
        return "\n".join(lines) + "\n"
    lines += ["", ("| model | interval | GFLOP/request | compute bound req/s | ours/mlflow @16 "
                   "| p99 ours vs mlflow @16 | p50 ours vs mlflow @1 | logging cost @16 |"),
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for model in report["models"]:
        for key, s in model["summary"].items():
            lines.append(f"| {model['name']} | {key} | {model['gflop_per_request']:.3f} | "
                         f"{s['compute_bound_rps']:.0f} | {s['speedup_16']:.2f}x | "
                         f"{s['p99_ours_16']:.0f} vs {s['p99_mlflow_16']:.0f} ms | "
                         f"{s['p50_ours_1']:.0f} vs {s['p50_mlflow_1']:.0f} ms | {100 * s['logging_cost_16']:.1f}% |")
    lines += ["", ("Scoring call in-process (ms, median; OOD features included), and each ONNX runtime's largest "
                   "year difference from PyTorch on hold-out coins:"), "",
              ("| model | served with | PyTorch b=1 | ONNX Runtime b=1 | OpenVINO b=1 | PyTorch b=16 "
               "| ONNX Runtime b=16 | OpenVINO b=16 | hold-out coins | max abs year diff (ORT / OpenVINO) |"),
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for model in report["models"]:
        r = model["runtime"]
        cell = {f"{engine}{batch}": f"{r[f'{engine}_ms_batch{batch}']:.1f}" if f"{engine}_ms_batch{batch}" in r
                else "-" for engine in ("pytorch", "onnxruntime", "openvino") for batch in (1, 16)}
        diff = " / ".join(f"{r[key]:.1e}" if key in r else "-" for key in
                          ("onnxruntime_holdout_max_abs_diff_years", "openvino_holdout_max_abs_diff_years"))
        lines.append(f"| {model['name']} | {r['engine']} | {cell['pytorch1']} | {cell['onnxruntime1']} "
                     f"| {cell['openvino1']} | {cell['pytorch16']} | {cell['onnxruntime16']} | {cell['openvino16']} "
                     f"| {r['holdout_coins']} | {diff} |")
    return "\n".join(lines) + "\n"


def summarise(results: list[dict], gflop: float, matmul: float) -> dict:
    """Per interval off/on: ours (log on) against MLflow at the most and at the fewest clients."""
    most, fewest = max(r["clients"] for r in results), min(r["clients"] for r in results)
    summary = {}
    for interval in sorted({row["interval"] for row in results}):
        rows = [row for row in results if row["interval"] == interval]
        at16 = {row["server"]: row for row in rows if row["clients"] == most}
        at1 = {row["server"]: row for row in rows if row["clients"] == fewest}
        ours, off, theirs = at16["coinyear-log-on"], at16["coinyear-log-off"], at16["mlflow-models-serve"]
        summary["on" if interval else "off"] = {
            "compute_bound_rps": matmul / gflop, "speedup_16": ours["rps"] / theirs["rps"],
            "p99_ours_16": ours["p99_ms"], "p99_mlflow_16": theirs["p99_ms"],
            "p50_ours_1": at1["coinyear-log-on"]["p50_ms"], "p50_mlflow_1": at1["mlflow-models-serve"]["p50_ms"],
            "logging_cost_16": 1 - ours["rps"] / off["rps"]}
    return summary


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        series = list(dict.fromkeys((row["server"], row["interval"]) for row in model["results"]))
        clients = sorted({row["clients"] for row in model["results"]})
        width = 0.8 / len(series)
        for i, (server, interval) in enumerate(series):
            values = [next(r["rps"] for r in model["results"] if r["server"] == server and r["clients"] == c
                           and r["interval"] == interval) for c in clients]
            ax.bar([x + i * width for x in range(len(clients))], values, width,
                   label=f"{server}{', interval' if interval else ''}", hatch="//" if interval else None)
        ax.axhline(model["gflop_per_request"] and report["matmul_gflops"] / model["gflop_per_request"],
                   color="gray", linestyle="--", label="compute bound")
        ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(clients))], [str(c) for c in clients])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("requests / s")
        ax.set_yscale("log")
        ax.set_title(model["name"])
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per point and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all servers")
    from coinyear.config import setting_default

    parser.add_argument("--image-size", type=int, default=setting_default("image_size"),
                        help="input size of the 1-epoch models (default: the recipe's, what make demo trains)")
    parser.add_argument("--limit", type=int, default=96, help="coins to train the 1-epoch model on")
    parser.add_argument("--holdout", type=int, default=200, help="coins after the training slice for the ONNX check")
    parser.add_argument("--home", type=Path, default=REPO / ".coinyear" / "bench", help="benchmark state")
    parser.add_argument("--data", type=Path, default=DATA_DIR)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="serve_bench", help="result files: <out>/<name>.{json,md,png}")
    parser.add_argument("--sweep", nargs=2, type=int, action="append", metavar=("THREADS", "WORKERS"),
                        help="instead of the three servers: our gateway (log on) once per given COINYEAR_NUM_THREADS "
                             "and COINYEAR_BATCH_WORKERS pair (repeat the flag), interleaved the same way")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import pandas as pd

    manifest = pd.read_csv(args.data / "manifest.csv")
    first = manifest.iloc[0]
    pair = coin_row(args.data / first["obverse"], args.data / first["reverse"])
    bodies = {False: json.dumps({"inputs": [pair]}).encode(),
              True: json.dumps({"inputs": [pair], "params": {"interval": 0.9}}).encode()}

    matmul = matmul_gflops()
    print(f"matmul: {matmul:.1f} GFLOP/s float32; request body {len(bodies[False]) / 1024:.0f} KiB", flush=True)
    report = {"machine": machine(), "matmul_gflops": matmul, "seconds": args.seconds, "rounds": args.rounds,
              "date": utc_minute(), "loadavg": loadavg(), "clients": args.clients,
              "body_bytes": len(bodies[False]), "models": []}
    for name in args.models:
        home = (args.home / name).resolve()
        version = prepare_model(home, name, args.image_size, args.limit, args.data)
        gflop = flops_per_request(home) / 1e9
        runtime = runtime_check(home, args.data, args.limit, args.holdout)
        print(f"{name} (version {version}, {runtime['engine']}): {gflop:.3f} GFLOP per request -> compute bound "
              f"{matmul / gflop:.0f} req/s; {runtime}", flush=True)
        for state in ("lake", "spool", "log-off", *(f"coinyear-t{t}-w{w}" for t, w in args.sweep or ())):
            shutil.rmtree(home / state, ignore_errors=True)
        logs = home / "logs"  # server output, kept out of the results folder
        logs.mkdir(exist_ok=True)
        starts = (partial(start_ours, home, True, logs), partial(start_ours, home, False, logs),
                  partial(start_mlflow, home, logs))
        if args.sweep:
            starts = tuple(partial(start_ours, home, True, logs, t, w) for t, w in args.sweep)
        load_start = loadavg()
        results, loads = bench_servers(starts, bodies, args.clients, args.seconds, args.rounds)
        report["models"].append({"name": name, "backbone": MODELS[name][0], "version": version,
                                 "gflop_per_request": gflop, "runtime": runtime, "loadavg_start": load_start,
                                 "trained": trained_on(home, version),
                                 "loadavg_rounds": loads, "git_commit": git_commit(),
                                 "loadavg_end": loadavg(),
                                 "results": results,
                                 "summary": {} if args.sweep else summarise(results, gflop, matmul)})
    report["loadavg_end"] = loadavg()
    print()
    write_report(args.out, args.name, report, markdown(report))
    plot(report, args.out / f"{args.name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
