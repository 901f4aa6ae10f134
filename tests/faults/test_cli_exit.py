"""A finished command exits with its own status through the interpreter's normal teardown.

`coinyear` once aborted after its work was done and recorded ("terminate called without an active exception",
exit 134) in a skipped retraining over Delta tables holding rows, under CPU load: native Arrow/delta-rs threads
torn down at interpreter exit (see `coinyear.cli.run`). The console command no longer hides that teardown with an
`os._exit`, so this runs that command, as installed, over such a lake, a few times while another process keeps
the cores busy.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from coinyear.lake import open_lake
from coinyear.lake.tables import FEEDBACK, INFERENCE_LOG
from tests.conftest import make_settings

pytestmark = pytest.mark.slow

RUNS = 3
BUSY = "import time\nend = time.time() + 120\nwhile time.time() < end:\n    sum(range(10000))\n"


def test_a_skipped_retraining_over_a_lake_with_rows_exits_cleanly(tmp_path, ocre_dir):
    settings = make_settings(tmp_path / "home")
    lake = open_lake(settings)
    now, ids = datetime.now(UTC), [str(uuid.uuid4()) for _ in range(30)]
    lake.append(INFERENCE_LOG, [{"request_id": i, "http_request_id": i, "row_index": 0, "timestamp": now,
                                 "date": now.date(), "status_code": 200, "prediction": 80.0,
                                 "model_name": "coinyear", "model_version": "1"} for i in ids])
    lake.append(FEEDBACK, [{"request_id": i, "year_from": 70, "year_to": 80, "timestamp": now, "source": "expert",
                            "actor": "curator"} for i in ids[:15]])
    command = Path(sys.executable).with_name("coinyear")
    assert command.is_file(), f"the console command is not installed beside {sys.executable}"
    env = {**os.environ, "COINYEAR_HOME": str(settings.home), "COINYEAR_DATA_DIR": str(ocre_dir),
           "COINYEAR_TRACKING_URI": settings.tracking_uri,
           "COINYEAR_REGISTRY_URI": settings.registry_uri}
    busy = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        for _ in range(RUNS):
            done = subprocess.run([str(command), "retrain", "--dry-run"], env=env, capture_output=True, text=True,
                                  timeout=300)
            assert "DRY_RUN" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
            assert "terminate called" not in done.stderr, done.stderr[-2000:]
            assert done.returncode == 0, done.stderr[-2000:]
    finally:
        busy.kill()
        busy.wait()
