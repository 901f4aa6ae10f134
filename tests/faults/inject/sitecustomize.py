"""Faults injected into a `coinyear serve` process started with this folder first on PYTHONPATH.

Each variable names a flag file; while the file exists, the step sleeps the seconds it holds first:
- COINYEAR_FAULT_SLOW_DECODE_FILE: each photo the gateway decodes (coinyear.serve.wire.preprocess), which also
  appends a line to `<flag>.decoded`, so a test sees how many photos a request's decode thread went on decoding;
- COINYEAR_FAULT_SLOW_LAKE_FILE: each Delta commit (coinyear.lake.DeltaLake.append): a slow remote store.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def _delay(flag: Path) -> bool:
    if not flag.is_file():
        return False
    time.sleep(float(flag.read_text() or 1))
    return True


if os.environ.get("COINYEAR_FAULT_SLOW_DECODE_FILE"):
    from coinyear.serve import wire

    decode_flag = Path(os.environ["COINYEAR_FAULT_SLOW_DECODE_FILE"])
    real_preprocess = wire.preprocess

    def slow_preprocess(*args, **kwargs):
        if _delay(decode_flag):
            with open(f"{decode_flag}.decoded", "a") as decoded:
                decoded.write("1\n")
        return real_preprocess(*args, **kwargs)

    wire.preprocess = slow_preprocess

if os.environ.get("COINYEAR_FAULT_SLOW_LAKE_FILE"):
    from coinyear.lake.delta import DeltaLake

    lake_flag = Path(os.environ["COINYEAR_FAULT_SLOW_LAKE_FILE"])
    real_append = DeltaLake.append

    def slow_append(self, *args, **kwargs):
        _delay(lake_flag)
        return real_append(self, *args, **kwargs)

    DeltaLake.append = slow_append  # type: ignore[method-assign]
