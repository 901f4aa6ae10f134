"""Soak of the whole loop: a real `coinyear serve` on loopback under closed-loop clients for ten minutes, SIGKILLed
and restarted while the `production` alias moves, experts post corrections and a client posts made-up request ids;
meanwhile one `coinyear retrain` is SIGKILLed during its training, and during a second one a person rolls
production back on the real UI (`coinyear ui` in headless Chromium).

Checked at the end, from the Delta tables and the registry (read directly with `deltalake` and MLflow, not
through coinyear's own readers):
- every acknowledged scoring request (a 200's `x-request-id`) is in the inference log, every acknowledged
  correction in the feedback table: `lost` must be 0 for both;
- made-up ids are refused with 404 or 429, never a 5xx;
- every decision is recorded truthfully: the killed retraining recorded nothing and consumed nothing; the second
  one, whose production was rolled back under it, did not move production (`superseded`, or `rejected`), names
  the production it was judged against and the one left after it, and its candidate never served; the rollback
  is recorded with who did it, from which version to which, as the registry shows it.

    python benchmarks/soak.py                    # 10 minutes (the run in benchmarks/README.md)
    python benchmarks/soak.py --seconds 240 --restarts 2

A small model (mobilenet_v3_small, 64 px, 1 epoch on 80 coins) is trained once into --home and reused; the
retraining runs use the same small recipe. Writes benchmarks/results/soak.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import requests

# isort: split
# this folder's modules: a script's own folder is first on sys.path when it runs
from common import (
    COINYEAR,
    INVOCATIONS,
    REPO,
    RESULTS,
    SHARED_DATA,
    Server,
    bearer,
    bench_settings,
    coin_row,
    coinyear_env,
    free_port,
    gateway,
    percentile,
    utc_now,
    write_json,
)

TOKEN = "soak-token"  # the scoring clients' and the UI's own
EXPERT, EXPERT_TOKEN = "soak-expert", "soak-expert-token"  # corrections
CURATOR, CURATOR_TOKEN = "soak-curator", "soak-curator-token"  # signs in on the UI and rolls back
TOKENS = f"{TOKEN},{EXPERT}:{EXPERT_TOKEN},{CURATOR}:{CURATOR_TOKEN}"
# the retraining job's recipe: small, but from ImageNet weights, so that its candidate beats the served model and
# the promotion meets the rollback (the soak checks the loop's record, not the gate's judgement: decade and
# behaviour checks off); epochs enough for a rollback during training
RETRAIN_ENV = {"COINYEAR_BACKBONE": "efficientnet_lite0", "COINYEAR_IMAGE_SIZE": "64", "COINYEAR_PROJ_DIM": "32",
               "COINYEAR_EPOCHS": "6", "COINYEAR_BATCH_SIZE": "16", "COINYEAR_SEED": "1",
               "COINYEAR_RETRAIN_BASE_LIMIT": "80", "COINYEAR_RETRAIN_DECADE_MIN_COINS": "5",
               "COINYEAR_RETRAIN_MAX_DECADE_REGRESSION": "1000", "COINYEAR_RETRAIN_BEHAVIOUR_GATE": "false",
               "COINYEAR_RETRAIN_LATENCY_BUDGET_MS": "60000", "COINYEAR_NUM_THREADS": "1"}


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of every coinyear process of the soak: one COINYEAR_HOME, its own MLflow store."""
    return coinyear_env(home, COINYEAR_API_TOKENS=TOKENS, **extra)


def prepare_models(home: Path, data_dir: Path) -> list[str]:
    """Two registered versions (the second registered from the first's model) with `production` on the first."""
    from coinyear import registry
    from coinyear.model import ModelConfig
    from coinyear.train import TrainConfig, run_training

    settings = bench_settings(home, data_dir)
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
    """`count` coins as scoring rows, each with its catalogue years (sent as an expert's correction)."""
    import pandas as pd

    manifest = pd.read_csv(data_dir / "manifest.csv").dropna(subset=["obverse", "reverse"]).head(count)
    return [{"row": coin_row(data_dir / row.obverse, data_dir / row.reverse),
             "years": (int(row.year_from), int(row.year_to))} for row in manifest.itertuples()]


class Gateway:
    """`coinyear serve` as a subprocess on a fixed loopback port (kept across restarts, as a real service)."""

    def __init__(self, home: Path, timeout: float):
        env = clean_env(home, COINYEAR_ALIAS_POLL_SECONDS="1", COINYEAR_REQUEST_TIMEOUT_SECONDS=str(timeout))
        # one log for the gateway's output across restarts
        self.server, self.url = gateway("coinyear serve", env, home / "soak-serve.log", append=True)

    def start(self, timeout: float = 120) -> float:
        """Start (or restart) the gateway; the seconds until it was ready."""
        return self.server.start(timeout, poll=0.2)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.server.kill(sig)

    def wait_logged(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lake = requests.get(f"{self.url}/version", timeout=10, headers=bearer(TOKEN)).json()["lake"]
            if all(table is None or table["backlog"] == 0 for table in lake.values()):
                return
            time.sleep(0.3)
        raise RuntimeError("inference log backlog not committed in time")


# ------------------------------------------------------------------------------------------------- clients
def client(gateway: Gateway, coins: list[dict], seed: int, stop: threading.Event, answers: list) -> None:
    """Scores one coin after another; every answer is kept, with the coin it was for."""
    session = requests.Session()
    headers = bearer(TOKEN)
    index = seed
    while not stop.is_set():
        coin = index % len(coins)
        body: dict = {"inputs": [coins[coin]["row"]]}
        if index % 3 == 0:
            body["params"] = {"interval": 0.9}  # as the UI asks
        index += 1
        started = time.perf_counter()
        try:
            response = session.post(f"{gateway.url}{INVOCATIONS}", json=body,
                                    headers=headers, timeout=60)
        except requests.RequestException as error:  # killed under this request: never acknowledged
            answers.append({"status": f"connection:{type(error).__name__}", "seconds": time.perf_counter() - started})
            session = requests.Session()
            time.sleep(0.2)
            continue
        code = "" if response.status_code == 200 else response.json().get("error_code", "")
        answers.append({"status": str(response.status_code), "error_code": code, "coin": coin,
                        "id": response.headers.get("x-request-id"), "seconds": time.perf_counter() - started,
                        "version": response.headers.get("served-model-version")})
        if response.status_code in (429, 503):  # no model loaded yet, or at capacity: back off as clients do
            time.sleep(0.2)


def post_feedback(gateway: Gateway, token: str, body: dict) -> dict:
    started = time.perf_counter()
    try:
        response = requests.post(f"{gateway.url}/feedback", json=body, timeout=60, headers=bearer(token))
    except requests.RequestException as error:
        return {"status": f"connection:{type(error).__name__}", "seconds": time.perf_counter() - started}
    code = "" if response.status_code == 200 else response.json().get("error_code", "")
    return {"status": str(response.status_code), "error_code": code, "id": body["request_id"],
            "seconds": time.perf_counter() - started}


def expert(gateway: Gateway, coins: list[dict], stop: threading.Event, answers: list, corrections: list,
           pause: float) -> None:
    """An expert correcting answered requests with their coins' catalogue years, one every `pause` seconds."""
    chooser = random.Random(7)
    while not stop.wait(pause):
        answered = [a for a in answers[-200:] if a["status"] == "200"]
        if not answered:
            continue
        answer = chooser.choice(answered)
        first, last = coins[answer["coin"]]["years"]
        corrections.append(post_feedback(gateway, EXPERT_TOKEN, {"request_id": answer["id"], "year_from": first,
                                                                 "year_to": last, "source": "soak"}))


def prankster(gateway: Gateway, stop: threading.Event, bogus: list, pause: float) -> None:
    """Corrections for request ids nobody was ever answered: each must be refused, cheaply."""
    while not stop.wait(pause):
        bogus.append(post_feedback(gateway, TOKEN, {"request_id": uuid.uuid4().hex, "year": 100}))


def watch_alias(settings, stop: threading.Event, began: float, moves: list) -> None:
    """The production alias as the registry shows it, sampled every 0.2 s: (seconds, version) at each change."""
    from coinyear import registry

    last = None
    while not stop.wait(0.2):
        try:
            version = registry.version_by_alias(settings, registry.PRODUCTION)
        except registry.RegistryError:
            continue
        if version != last:
            moves.append((round(time.monotonic() - began, 1), version))
            last = version


# --------------------------------------------------------------------------------- retraining and the UI
class Curator:
    """A person on the real Models page, in headless Chromium, signed in with their own token."""

    def __init__(self, home: Path, gateway: Gateway):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = clean_env(home, COINYEAR_API_TOKEN=TOKEN, COINYEAR_API_URL=gateway.url)
        self.ui = Server("coinyear ui", [COINYEAR, "ui", "--port", str(port)], env, f"{self.url}/_stcore/health",
                         home / "soak-ui.log", append=True)
        self.ui.start(120, poll=0.2)
        from playwright.sync_api import sync_playwright

        self.playwright = sync_playwright().start()
        self.browser = self.playwright.chromium.launch(
            executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        self.page = self.browser.new_page(viewport={"width": 1400, "height": 1000})
        self.page.set_default_timeout(120_000)
        self.page.goto(f"{self.url}/models")
        self.page.get_by_text("Change what is served").wait_for()
        self.page.get_by_label("Your name").fill(CURATOR)
        self.page.get_by_label("API token").fill(CURATOR_TOKEN)
        self.page.get_by_role("button", name="Sign in").click()
        self.page.get_by_text(f"Acting as {CURATOR}").wait_for()

    def roll_back(self) -> str:
        """Roll back and confirm, as a person would; the page's message."""
        self.page.get_by_role("button", name="Roll back production…").click()
        self.page.get_by_role("button", name="Yes, do it").click()
        message = self.page.get_by_text("Rolled production back from version")
        message.wait_for()
        return message.inner_text()

    def close(self) -> None:
        self.browser.close()
        self.playwright.stop()
        self.ui.stop()


def retrain(home: Path, label: str) -> subprocess.Popen:
    log = open(home / f"soak-retrain-{label}.log", "wb")  # noqa: SIM115
    return subprocess.Popen([COINYEAR, "retrain"], env=clean_env(home, **RETRAIN_ENV), cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT)


def wait_for_training(settings, process: subprocess.Popen, seen: set[str], timeout: float = 600) -> str:
    """The id of the retraining's `train` run once it is running (its data ingested, cleaned and built); `seen`:
    earlier runs (a SIGKILLed run stays RUNNING in MLflow for ever)."""
    import mlflow

    from coinyear.config import ensure_experiment

    experiment = ensure_experiment(settings)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"retraining exited with {process.returncode} before training")
        runs = mlflow.search_runs([experiment], "tags.`coinyear.step` = 'train' and attributes.status = 'RUNNING'",
                                  output_format="list")
        fresh = [run.info.run_id for run in runs if run.info.run_id not in seen]
        if fresh:
            return fresh[0]
        time.sleep(0.5)
    raise RuntimeError("retraining did not reach its training step in time")


def loop_under_fire(settings, home: Path, gateway: Gateway, began: float, events: dict) -> None:
    """Retraining #1 SIGKILLed while it trains; then retraining #2, during whose training the curator rolls
    production back on the UI; the times of each step go to `events`."""
    try:
        curator = Curator(home, gateway)
        events["ui_ready_s"] = round(time.monotonic() - began, 1)
        first = retrain(home, "killed")
        events["killed_train_run"] = wait_for_training(settings, first, set())
        time.sleep(5)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
        events["killed_at_s"] = round(time.monotonic() - began, 1)
        print(f"{events['killed_at_s']:6.1f}s  retraining #1 SIGKILLed while training", flush=True)
        second = retrain(home, "rolled-back")
        events["second_train_run"] = wait_for_training(settings, second, {events["killed_train_run"]})
        events["second_training_at_s"] = round(time.monotonic() - began, 1)
        events["rollback_clicked_at_s"] = round(time.monotonic() - began, 1)
        events["rollback_message"] = curator.roll_back()
        events["rollback_at_s"] = round(time.monotonic() - began, 1)
        print(f"{events['rollback_at_s']:6.1f}s  UI: {events['rollback_message']}", flush=True)
        events["second_returncode"] = second.wait(timeout=1200)
        events["second_done_at_s"] = round(time.monotonic() - began, 1)
        print(f"{events['second_done_at_s']:6.1f}s  retraining #2 exited {events['second_returncode']}", flush=True)
        curator.close()
    except Exception as error:  # noqa: BLE001 - reported as a failed check, never a silent pass
        events["error"] = f"{type(error).__name__}: {error}"
        print(f"loop under fire failed: {events['error']}", flush=True)


# ------------------------------------------------------------------------------------------------- checks
def read_table(home: Path, name: str):
    import pandas as pd
    from deltalake import DeltaTable

    path = home / "lake" / name
    return DeltaTable(str(path)).to_pandas() if (path / "_delta_log").exists() else pd.DataFrame()


def truthful_decisions(home: Path, settings, events: dict, alias_moves: list) -> dict:
    """What the model_decisions table says against what the registry did."""
    decisions = read_table(home, "model_decisions")
    retrains = decisions[decisions["kind"].fillna("retrain") == "retrain"] if len(decisions) else decisions
    ui = decisions[decisions["kind"] == "ui"] if len(decisions) else decisions
    served = {version for _, version in alias_moves}
    checks: dict[str, object] = {"decisions": decisions.drop(
        columns=[c for c in ("candidate_metrics", "production_metrics", "consumed_feedback", "dropped")
                 if c in decisions], errors="ignore").astype(str).to_dict("records")}
    run_of = {}
    import mlflow

    for key in ("killed_train_run", "second_train_run"):
        if key in events:
            run_of[key] = mlflow.MlflowClient(settings.mlflow_tracking_uri).get_run(
                events[key]).data.tags.get("mlflow.parentRunId")
    killed = retrains[retrains["retrain_run_id"] == run_of.get("killed_train_run")] if len(retrains) else retrains
    second = retrains[retrains["retrain_run_id"] == run_of.get("second_train_run")] if len(retrains) else retrains
    checks["killed_run_recorded_nothing"] = len(killed) == 0
    ok_second = len(second) == 1
    if ok_second:
        row = second.iloc[0]
        before_rollback = [v for t, v in alias_moves if t < events.get("rollback_clicked_at_s", 0)]
        ok_second = (row["decision"] in ("superseded", "rejected")
                     and row["production_before"] == (before_rollback[-1] if before_rollback else None)
                     and row["production_after"] == alias_moves[-1][1]
                     and row["candidate_version"] not in served
                     and (row["decision"] != "superseded" or row["consumed_feedback"] is None))
        checks["second_run"] = {k: (None if row[k] is None else str(row[k])) for k in
                                ("decision", "reason", "candidate_version", "production_before", "production_after")}
    checks["second_run_truthful"] = bool(ok_second)
    rollbacks = ui[ui["decision"] == "rolled_back"] if len(ui) else ui
    ok_ui = len(rollbacks) == 1
    if ok_ui:
        row = rollbacks.iloc[0]
        ok_ui = (str(row["actor"]).startswith(CURATOR) and f"from version {row['production_before']} to version "
                 f"{row['production_after']}" in events.get("rollback_message", "")
                 and (row["production_after"] in [v for t, v in alias_moves if t >= events["second_training_at_s"]]))
    checks["ui_rollback_truthful"] = bool(ok_ui)
    return checks


def soak(args) -> dict:
    home = Path(args.home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data_dir).resolve()
    versions = prepare_models(home, data_dir)
    settings = bench_settings(home, data_dir)
    coins = coin_rows(data_dir, 64)
    gateway = Gateway(home, args.request_timeout)
    startups = [gateway.start()]
    answers: list[dict] = []
    corrections: list[dict] = []
    bogus: list[dict] = []
    alias_moves: list = []
    events: dict = {}
    stop = threading.Event()
    began = time.monotonic()
    threads = [threading.Thread(target=client, args=(gateway, coins, seed, stop, answers), daemon=True)
               for seed in range(args.clients)]
    threads += [threading.Thread(target=expert, args=(gateway, coins, stop, answers, corrections, 1.0), daemon=True),
                threading.Thread(target=prankster, args=(gateway, stop, bogus, 0.25), daemon=True),
                threading.Thread(target=watch_alias, args=(settings, stop, began, alias_moves), daemon=True)]
    for thread in threads:
        thread.start()
    # alias moves early (the rollback later needs a version production replaced), then the retraining runs
    from coinyear import registry

    events_at = sorted([(args.seconds * (i + 1) / (args.restarts + 1), "kill") for i in range(args.restarts)]
                       + [(args.seconds * 0.08 * (i + 1), "move") for i in range(args.moves)]
                       + [(args.seconds * 0.25, "loop")])
    moves = 0
    loop = threading.Thread(target=loop_under_fire, args=(settings, home, gateway, began, events), daemon=True)
    for at, kind in events_at:
        time.sleep(max(0.0, began + at - time.monotonic()))
        if kind == "kill":
            gateway.kill()
            startups.append(gateway.start())
            print(f"{time.monotonic() - began:6.1f}s  SIGKILL + restart ({startups[-1]:.1f}s to ready)", flush=True)
        elif kind == "move":
            moves += 1
            registry.promote(settings, versions[moves % 2], registry.PRODUCTION)
            print(f"{time.monotonic() - began:6.1f}s  production -> version {versions[moves % 2]}", flush=True)
        else:
            loop.start()
        print(f"{'':8}{len(answers)} answers, {len(corrections)} corrections, {len(bogus)} made-up ids so far",
              flush=True)
    time.sleep(max(0.0, began + args.seconds - time.monotonic()))
    loop.join(timeout=1200)  # the second retraining may outlast the soak's clock: wait for its decision
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    elapsed = time.monotonic() - began
    gateway.wait_logged()
    gateway.kill(signal.SIGTERM)

    logged = set(read_table(home, "inference_log")["request_id"])
    feedback = read_table(home, "feedback")
    corrected = set(feedback["request_id"]) if len(feedback) else set()
    acknowledged = [a["id"] for a in answers if a["status"] == "200"]
    acknowledged_corrections = [c["id"] for c in corrections if c["status"] == "200"]
    ok_latency = sorted(a["seconds"] for a in answers if a["status"] == "200")

    def by_status(replies: list[dict]) -> dict[str, int]:
        return dict(sorted(Counter(r["status"] if not r.get("error_code") else f"{r['status']} {r['error_code']}"
                                   for r in replies).items()))

    result = {
        "date": utc_now(),
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs, {platform.machine()}), load average at the end "
                   f"{os.getloadavg()[0]:.1f}",
        "seconds": round(elapsed, 1), "clients": args.clients, "request_timeout_seconds": args.request_timeout,
        "requests": len(answers), "acknowledged": len(acknowledged),
        "lost": len(set(acknowledged) - logged),
        "corrections": len(corrections), "corrections_acknowledged": len(acknowledged_corrections),
        "corrections_lost": len(set(acknowledged_corrections) - corrected),
        "made_up_ids": len(bogus), "made_up_ids_by_status": by_status(bogus),
        "made_up_ids_5xx": sum(1 for b in bogus if b["status"].startswith("5")),
        "made_up_p99_ms": (round(1000 * percentile(sorted(b["seconds"] for b in bogus), 0.99), 1)
                           if bogus else None),
        "p50_ms": round(1000 * statistics.median(ok_latency), 1) if ok_latency else None,
        "p99_ms": round(1000 * percentile(ok_latency, 0.99), 1) if ok_latency else None,
        "max_ms": round(1000 * max(a["seconds"] for a in answers), 1) if answers else None,  # any answer
        "restarts": args.restarts, "alias_moves": moves,
        "restart_to_ready_seconds": [round(s, 1) for s in startups[1:]],
        "answers_by_status": by_status(answers),
        "corrections_by_status": by_status(corrections),
        "versions_served": dict(Counter(a.get("version") for a in answers if a["status"] == "200")),
        "production_alias": alias_moves, "events": events,
    }
    result.update(truthful_decisions(home, settings, events, alias_moves))
    result["passed"] = bool(result["lost"] == 0 and result["corrections_lost"] == 0 and result["made_up_ids_5xx"] == 0
                            and "error" not in events and result["killed_run_recorded_nothing"]
                            and result["second_run_truthful"] and result["ui_rollback_truthful"])
    return result


def markdown(result: dict) -> str:
    events = result["events"]
    second = result.get("second_run", {})
    lines = [f"# Soak of the loop ({result['date']})", "",
             (f"{result['machine']}; {result['clients']} closed-loop clients for {result['seconds']} s (a third "
              f"asking for intervals), an expert correcting an answered request (1 s between corrections), a "
              f"client posting made-up request ids (0.25 s between posts), {result['restarts']} SIGKILL + restart "
              f"of the gateway, {result['alias_moves']} alias "
              f"moves, one retraining SIGKILLed while training and one during which production was rolled back "
              f"on the UI (headless Chromium); deadline {result['request_timeout_seconds']} s."), "",
             f"**{'PASSED' if result['passed'] else 'FAILED'}**", "",
             "| requests | acknowledged (200) | lost | corrections acknowledged | lost | made-up ids (5xx) | p50 ms "
             "| p99 ms | restart to ready (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
             (f"| {result['requests']} | {result['acknowledged']} | {result['lost']} | "
              f"{result['corrections_acknowledged']} of {result['corrections']} | {result['corrections_lost']} | "
              f"{result['made_up_ids']} ({result['made_up_ids_5xx']}) | {result['p50_ms']} | {result['p99_ms']} | "
              f"{', '.join(map(str, result['restart_to_ready_seconds']))} |"),
             "", "| scoring answer | count |", "| --- | --- |"]
    lines += [f"| {status} | {count} |" for status, count in result["answers_by_status"].items()]
    lines += ["", "| correction answer | count |", "| --- | --- |"]
    lines += [f"| {status} | {count} |" for status, count in result["corrections_by_status"].items()]
    lines += ["", "| made-up id answer | count |", "| --- | --- |"]
    lines += [f"| {status} | {count} |" for status, count in result["made_up_ids_by_status"].items()]
    lines += ["", "The loop:", "",
              f"- production alias over time (s, version): {result['production_alias']}",
              f"- retraining #1 SIGKILLed while training at {events.get('killed_at_s')} s: recorded nothing "
              f"({result['killed_run_recorded_nothing']})",
              f"- retraining #2 training from {events.get('second_training_at_s')} s; UI rollback at "
              f"{events.get('rollback_at_s')} s: \"{events.get('rollback_message')}\"; retraining #2 done at "
              f"{events.get('second_done_at_s')} s: {second.get('decision')} (judged against "
              f"v{second.get('production_before')}, production after v{second.get('production_after')}, "
              f"candidate v{second.get('candidate_version')}); truthful: {result['second_run_truthful']}",
              f"- the UI rollback recorded with who did it and matching the registry: {result['ui_rollback_truthful']}",
              f"- reason recorded for #2: {second.get('reason')}",
              ""]
    if "error" in events:
        lines += [f"The loop failed: {events['error']}", ""]
    lines += [(f"Versions that answered: {result['versions_served']}. A 503 is a restarted gateway that has not "
               "loaded its model yet (clients back off 0.2 s); a connection error is a request in flight at a kill "
               "or sent while the gateway was down (never acknowledged; clients retry after 0.2 s)."), ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--restarts", type=int, default=4)
    parser.add_argument("--moves", type=int, default=3)  # odd: the rollback returns to the first version
    parser.add_argument("--request-timeout", type=float, default=30)
    # a fresh state folder per run (git-ignored): the checks read every decision and rollback in it as this run's
    parser.add_argument("--home", default=str(REPO / ".coinyear" / f"soak-{datetime.now(UTC):%Y%m%d-%H%M%S}"))
    parser.add_argument("--data-dir", default=str(SHARED_DATA))
    parser.add_argument("--out", default=str(RESULTS / "soak"))
    args = parser.parse_args()
    result = soak(args)
    out = Path(args.out)
    write_json(out.with_suffix(".json"), result)
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
