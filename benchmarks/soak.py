"""Bounded soak of the gateway: a real `coinyear serve` on loopback under N closed-loop clients for a few minutes,
SIGKILLed and restarted a few times while the `production` alias moves between two versions.

At the end every acknowledged request (a 200's `x-request-id`) is looked up in the Delta inference log: `lost`
must be 0. Reported: requests, acknowledged, lost, p50/p99 latency (of 200s), restarts, alias moves, answers by
status and error code, connection errors (requests in flight when the gateway was killed: never acknowledged).

    python benchmarks/soak.py                           # 3 minutes, 4 clients, 3 kills, 3 alias moves
    python benchmarks/soak.py --seconds 60 --clients 2 --restarts 2 --moves 2

A small model (mobilenet_v3_small, 64 px, 1 epoch on 80 coins) is trained once into --home and reused.
Writes benchmarks/results/soak.{json,md}.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
COINYEAR = str(Path(sys.executable).with_name("coinyear"))
TOKEN = "soak-token"
RESULTS = REPO / "benchmarks" / "results"


def settings_for(home: Path, data_dir: Path):
    from coinyear.config import Settings

    uri = f"sqlite:///{home / 'mlflow.db'}"
    return Settings(home=home, data_dir=data_dir, tracking_uri=uri, registry_uri=uri)


def prepare_models(home: Path, data_dir: Path) -> list[str]:
    """Two registered versions (the second registered from the first's model) with `production` on the first."""
    from coinyear import registry
    from coinyear.model import ModelConfig
    from coinyear.train import TrainConfig, run_training

    settings = settings_for(home, data_dir)
    versions = [v.version for v in registry.list_versions(settings)] if (home / "mlflow.db").exists() else []
    if len(versions) < 2:
        print("training a small model once (reused by later runs)", flush=True)
        model = ModelConfig(backbone="mobilenet_v3_small", image_size=64, proj_dim=32)
        outcome = run_training(settings, TrainConfig(model=model, epochs=1, batch_size=16, limit=80, seed=1))
        import mlflow

        source = mlflow.MlflowClient().get_model_version(settings.model_name, outcome.version).source
        mlflow.register_model(source, settings.model_name)
        versions = [v.version for v in registry.list_versions(settings)]
    versions = sorted(str(v) for v in versions)[:2]
    registry.promote(settings, versions[0], registry.PRODUCTION)
    return versions


def coin_rows(data_dir: Path, count: int) -> list[dict]:
    import pandas as pd

    manifest = pd.read_csv(data_dir / "manifest.csv").head(count)

    def b64(name: str) -> str:
        return base64.b64encode((data_dir / name).read_bytes()).decode("ascii")

    return [{"front_image_base64": b64(row.obverse), "back_image_base64": b64(row.reverse)}
            for row in manifest.itertuples()]


class Gateway:
    """`coinyear serve` as a subprocess on a fixed loopback port (kept across restarts, as a real service)."""

    def __init__(self, home: Path, timeout: float):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.home = home
        self.env = {**os.environ, "COINYEAR_HOME": str(home), "COINYEAR_API_TOKENS": TOKEN,
                    "COINYEAR_ALIAS_POLL_SECONDS": "1", "COINYEAR_REQUEST_TIMEOUT_SECONDS": str(timeout)}
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "COINYEAR_TRACKING_URI", "COINYEAR_LAKE_URI"):
            self.env.pop(key, None)
        self.process: subprocess.Popen | None = None
        self.log = open(home / "soak-serve.log", "ab")  # noqa: SIM115 - the gateway's output across restarts

    def start(self, timeout: float = 120) -> float:
        started = time.monotonic()
        self.process = subprocess.Popen([COINYEAR, "serve", "--port", str(self.port)], env=self.env, cwd=REPO,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}; see {self.log.name}")
            try:
                if requests.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"gateway not ready in {timeout}s; see {self.log.name}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=60)

    def wait_logged(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lake = requests.get(f"{self.url}/version", timeout=10).json()["lake"]
            if all(table is None or table["backlog"] == 0 for table in lake.values()):
                return
            time.sleep(0.3)
        raise RuntimeError("inference log backlog not committed in time")


def client(gateway: Gateway, rows: list[dict], seed: int, stop: threading.Event, answers: list) -> None:
    session = requests.Session()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    index = seed
    while not stop.is_set():
        body = {"inputs": [rows[index % len(rows)]]}
        if index % 3 == 0:
            body["params"] = {"interval": 0.9}  # as the UI asks
        index += 1
        started = time.perf_counter()
        try:
            response = session.post(f"{gateway.url}/serving-endpoints/coinyear/invocations", json=body,
                                    headers=headers, timeout=60)
        except requests.RequestException as error:  # killed under this request: never acknowledged
            answers.append({"status": f"connection:{type(error).__name__}", "seconds": time.perf_counter() - started})
            session = requests.Session()
            time.sleep(0.2)
            continue
        code = "" if response.status_code == 200 else response.json().get("error_code", "")
        answers.append({"status": str(response.status_code), "error_code": code,
                        "id": response.headers.get("x-request-id"), "seconds": time.perf_counter() - started,
                        "version": response.headers.get("served-model-version")})
        if response.status_code == 503:  # a restarted gateway has no model loaded yet: back off as clients do
            time.sleep(0.2)


def soak(args) -> dict:
    from coinyear import registry
    from coinyear.lake import Lake

    home = Path(args.home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data_dir).resolve()
    versions = prepare_models(home, data_dir)
    settings = settings_for(home, data_dir)
    rows = coin_rows(data_dir, 16)
    gateway = Gateway(home, args.request_timeout)
    startups = [gateway.start()]
    answers: list[dict] = []
    stop = threading.Event()
    threads = [threading.Thread(target=client, args=(gateway, rows, seed, stop, answers), daemon=True)
               for seed in range(args.clients)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    # kills and alias moves spread evenly over the run, interleaved
    events = sorted([(args.seconds * (i + 1) / (args.restarts + 1), "kill") for i in range(args.restarts)]
                    + [(args.seconds * (i + 0.5) / (args.moves + 0.5), "move") for i in range(args.moves)])
    moves = 0
    for at, kind in events:
        time.sleep(max(0.0, began + at - time.monotonic()))
        if kind == "kill":
            gateway.kill()
            startups.append(gateway.start())
            print(f"{time.monotonic() - began:6.1f}s  SIGKILL + restart ({startups[-1]:.1f}s to ready)", flush=True)
        else:
            moves += 1
            registry.promote(settings, versions[moves % 2], registry.PRODUCTION)
            print(f"{time.monotonic() - began:6.1f}s  production -> version {versions[moves % 2]}", flush=True)
        done = len(answers)
        print(f"{'':8}{done} answers so far", flush=True)
    time.sleep(max(0.0, began + args.seconds - time.monotonic()))
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    elapsed = time.monotonic() - began
    gateway.wait_logged()
    gateway.kill(signal.SIGTERM)
    logged = set(Lake(str(home / "lake")).read("inference_log", columns=["request_id"])["request_id"])
    acknowledged = [a["id"] for a in answers if a["status"] == "200"]
    ok_latency = sorted(a["seconds"] for a in answers if a["status"] == "200")
    by_status = Counter(a["status"] if not a.get("error_code") else f"{a['status']} {a['error_code']}"
                        for a in answers)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs, {platform.machine()}), load average at the end "
                   f"{os.getloadavg()[0]:.1f}",
        "seconds": round(elapsed, 1), "clients": args.clients, "request_timeout_seconds": args.request_timeout,
        "requests": len(answers), "acknowledged": len(acknowledged),
        "lost": len(set(acknowledged) - logged),
        "p50_ms": round(1000 * statistics.median(ok_latency), 1) if ok_latency else None,
        "p99_ms": round(1000 * ok_latency[int(0.99 * (len(ok_latency) - 1))], 1) if ok_latency else None,
        "max_ms": round(1000 * max(a["seconds"] for a in answers), 1) if answers else None,  # any answer
        "restarts": args.restarts, "alias_moves": moves,
        "restart_to_ready_seconds": [round(s, 1) for s in startups[1:]],
        "answers_by_status": dict(sorted(by_status.items())),
        "versions_served": dict(Counter(a.get("version") for a in answers if a["status"] == "200")),
    }


def markdown(result: dict) -> str:
    lines = [f"# Gateway soak ({result['date']})", "",
             (f"{result['machine']}; {result['clients']} closed-loop clients for {result['seconds']} s (a third "
              f"asking for intervals), {result['restarts']} SIGKILL + restart, {result['alias_moves']} alias moves, "
              f"deadline {result['request_timeout_seconds']} s."), "",
             "| requests | acknowledged (200) | lost | p50 ms | p99 ms | restarts | restart to ready (s) |",
             "| --- | --- | --- | --- | --- | --- | --- |",
             (f"| {result['requests']} | {result['acknowledged']} | {result['lost']} | {result['p50_ms']} | "
              f"{result['p99_ms']} | {result['restarts']} | "
              f"{', '.join(map(str, result['restart_to_ready_seconds']))} |"),
             "", "| answer | count |", "| --- | --- |"]
    lines += [f"| {status} | {count} |" for status, count in result["answers_by_status"].items()]
    lines += ["", (f"Versions that answered: {result['versions_served']}. A 503 is a restarted gateway that has "
                   "not loaded its model yet (clients back off 0.2 s); a connection error is a request in flight at "
                   "a kill or sent while the gateway was down (never acknowledged; clients retry after 0.2 s)."), ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--moves", type=int, default=3)
    parser.add_argument("--request-timeout", type=float, default=30)
    parser.add_argument("--home", default=str(REPO / ".coinyear" / "soak"))  # git-ignored
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "ocre"))
    parser.add_argument("--out", default=str(RESULTS / "soak"))
    args = parser.parse_args()
    result = soak(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 1 if result["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
