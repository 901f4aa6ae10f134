"""What the benchmark scripts share: where things are, servers, HTTP clients, timing, machine stamps, result files.

Each script runs from the repository root as `python benchmarks/<script>.py`, so this folder is first on
`sys.path` and a script imports this module as `from common import ...`. A benchmark home keeps its MLflow store
in `<home>/mlflow.db` (SQLite), the layout `coinyear` itself uses in a COINYEAR_HOME.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment's console scripts: coinyear, mlflow, uvicorn
COINYEAR = str(BIN / "coinyear")
RESULTS = REPO / "benchmarks" / "results"
SHARED_DATA = REPO.parent / "shared" / "data" / "ocre"
DATA_DIR = Path(os.environ.get("COINYEAR_DATA_DIR", SHARED_DATA))


# ------------------------------------------------------------------------------------------ MLflow store
def store_uri(home: Path) -> str:
    """The SQLite MLflow store (tracking and registry) of a benchmark home."""
    return f"sqlite:///{home / 'mlflow.db'}"


def bench_settings(home: Path, data_dir: Path):
    """coinyear Settings for a benchmark home: its own folder, data and MLflow store."""
    from coinyear.config import Settings

    return Settings(home=home, data_dir=data_dir, tracking_uri=store_uri(home), registry_uri=store_uri(home))


def load_production(home: Path):
    """The python model behind `models:/coinyear@production` of a benchmark home (this process's MLflow points
    at that home's store afterwards)."""
    import mlflow

    mlflow.set_tracking_uri(store_uri(home))
    mlflow.set_registry_uri(store_uri(home))
    return mlflow.pyfunc.load_model("models:/coinyear@production").unwrap_python_model()


def coinyear_env(home: Path, store: Path | None = None, **extra: str) -> dict[str, str]:
    """This process's environment for a coinyear command with its own COINYEAR_HOME and the MLflow store of
    `store` (default: `home`); `extra`: more variables. A lake URI set outside would send its tables elsewhere."""
    uri = store_uri(store or home)
    env = {**os.environ, "COINYEAR_HOME": str(home), "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri,
           **extra}
    for key in ("COINYEAR_TRACKING_URI", "COINYEAR_LAKE_URI"):
        env.pop(key, None)
    return env


# ----------------------------------------------------------------------------------------------- servers
def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A server subprocess (`coinyear serve`, `coinyear ui`, `mlflow models serve`) in its own session, its output
    in a log file; it can be started again after a kill (the same command, port and log)."""

    def __init__(self, name: str, command: list[str], env: dict, ready_url: str, log_path: Path,
                 append: bool = False):
        self.name, self.command, self.env, self.ready_url = name, command, env, ready_url
        self.log = open(log_path, "ab" if append else "wb")  # noqa: SIM115 - written to until stop() closes it
        self.process: subprocess.Popen | None = None

    def launch(self) -> Server:
        """Start the process without waiting for it to answer (several servers start side by side)."""
        self.process = subprocess.Popen(self.command, env=self.env, cwd=REPO, stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 180, poll: float = 0.5) -> None:
        """Until `ready_url` answers 200; raises when the process exits first or `timeout` passes."""
        assert self.process is not None, "launch() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log.name}")
            try:
                if requests.get(self.ready_url, timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(poll)
        raise RuntimeError(f"{self.name} not ready after {timeout}s; see {self.log.name}")

    def start(self, timeout: float = 180, poll: float = 0.5) -> float:
        """Launch and wait until ready; the seconds that took."""
        started = time.monotonic()
        self.launch().wait_ready(timeout, poll)
        return time.monotonic() - started

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 60) -> None:
        """Send `sig` to the whole session (uvicorn or Streamlit workers go too) and reap the process."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=timeout)

    def stop(self) -> None:
        """SIGTERM, SIGKILL after 30 s; then close the log."""
        try:
            self.kill(signal.SIGTERM, timeout=30)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
        self.log.close()


def gateway(name: str, env: dict, log_path: Path, append: bool = False) -> tuple[Server, str]:
    """`coinyear serve` on a free loopback port, ready at `/ready`; and its base URL."""
    url = f"http://127.0.0.1:{free_port()}"
    return Server(name, [COINYEAR, "serve", "--port", url.rsplit(":", 1)[1]], env, f"{url}/ready", log_path,
                  append), url


# ------------------------------------------------------------------------------------------------ clients
INVOCATIONS = "/serving-endpoints/coinyear/invocations"


def bearer(token: str) -> dict[str, str]:
    """The Authorization header of a gateway token."""
    return {"Authorization": f"Bearer {token}"}


def coin_row(front: Path, back: Path) -> dict[str, str]:
    """One scoring row: the two photos' bytes as base64, as every client sends them."""
    return {"front_image_base64": base64.b64encode(front.read_bytes()).decode("ascii"),
            "back_image_base64": base64.b64encode(back.read_bytes()).decode("ascii")}


class JsonPoster:
    """A keep-alive connection posting JSON bodies to one URL. A bare `http.client` connection keeps the load
    generator's own CPU use small (it shares the machine with the server it measures)."""

    def __init__(self, url: str, headers: dict, timeout: float = 120):
        self.target, self.timeout = urlsplit(url), timeout
        self.headers = {**headers, "Content-Type": "application/json"}
        self.connection = self._connect()

    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.target.hostname, self.target.port, timeout=self.timeout)

    def post(self, body: bytes) -> int:
        """POST one body and read the whole answer; its status code."""
        self.connection.request("POST", self.target.path, body=body, headers=self.headers)
        response = self.connection.getresponse()
        response.read()
        return response.status

    def reconnect(self) -> None:
        """A fresh connection after a failed request."""
        self.connection.close()
        self.connection = self._connect()

    def close(self) -> None:
        self.connection.close()


# ------------------------------------------------------------------------------------------------- timing
def percentile(ordered: list[float], p: float) -> float:
    """The nearest-rank `p` quantile of sorted values (NaN when there are none)."""
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else float("nan")


def median_ms(call: Callable[[], Any], repeats: int) -> float:
    """Median milliseconds of `repeats` timed calls, after one untimed call (first-call allocations)."""
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


# -------------------------------------------------------------------------------------- machine and date
def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, e.g. "1.2 0.9 0.8": the machine may be shared."""
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def utc_now() -> str:
    """Now, UTC, to the second (ISO 8601)."""
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec="seconds")


def utc_minute() -> str:
    """Now, UTC, to the minute, as the reports print it ("2026-12-06 13:05 UTC")."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def git_commit() -> str:
    """The commit measured, with `+dirty` when the working tree had uncommitted changes (a shared checkout)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_stamp(started: float) -> dict:
    """Where, when and how a run ran: its seconds since `started` (perf_counter), load, machine, date, command."""
    import torch

    return {"seconds": round(time.perf_counter() - started, 1), "load_average": os.getloadavg(),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
                       f"{torch.__version__}",
            "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", *sys.argv])}


# ------------------------------------------------------------------------------------------- result files
def results_parser(doc: str, folder: str, name: str = "demo") -> argparse.ArgumentParser:
    """The command line of a measurement script: its docstring as help, and `--name` / `--out`, which name its
    result files `<out>/<name>.{json,md}` (default `benchmarks/results/<folder>/<name>`, see `write_results`)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default=name)
    parser.add_argument("--out", default=f"benchmarks/results/{folder}")
    return parser


def model_parser(doc: str, folder: str) -> argparse.ArgumentParser:
    """`results_parser` with `--model`, the registered model a script measures (default: production)."""
    parser = results_parser(doc, folder)
    parser.add_argument("--model", default="models:/coinyear@production")
    return parser


def model_run(doc: str, folder: str, argv=None) -> tuple[argparse.Namespace, Any, float]:
    """A measurement of a registered model: its command line (`model_parser`), the settings with MLflow set up
    from them, and the start time (perf_counter)."""
    from coinyear.config import configure_mlflow, get_settings

    args = model_parser(doc, folder).parse_args(argv)
    started = time.perf_counter()
    settings = get_settings()
    configure_mlflow(settings)
    return args, settings, started


def write_json(path: Path, data: dict) -> None:
    """`data` as indented JSON (values JSON cannot hold written as text), its folder made if need be."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def write_report(folder: Path | str, name: str, report: dict, markdown: str) -> None:
    """`<folder>/<name>.json` (the report) and `<folder>/<name>.md` (its table), and the table on stdout."""
    folder = Path(folder)
    write_json(folder / f"{name}.json", report)
    (folder / f"{name}.md").write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    print(markdown)


def write_results(out: str, name: str, report: dict, lines: list[str], started: float) -> None:
    """`write_report` of a measurement script: the report stamped with `run_stamp`, the table's lines."""
    report.update(run_stamp(started))
    write_report(out, name, report, "\n".join(lines))
