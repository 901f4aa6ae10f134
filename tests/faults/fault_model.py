"""A CoinYearModel that misbehaves on request, for the gateway fault tests (logged as a registered version).

mode "raise": every scoring pass raises, so the gateway's smoke request fails and the version is not swapped in.
mode "slow":  a scoring pass sleeps while the file named by COINYEAR_FAULT_SLOW_FILE exists (its content: the
              seconds), so the version loads and warms quickly and turns slow only when a test says so.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from coinyear.pyfunc import CoinYearModel


class FaultyModel(CoinYearModel):
    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def score_tensors(self, fronts, backs, with_features=False, batch_size=32):
        if self.mode == "raise":
            raise RuntimeError("injected fault: this version cannot score")
        flag = Path(os.environ.get("COINYEAR_FAULT_SLOW_FILE", "/nonexistent"))
        if self.mode == "slow" and flag.is_file():
            time.sleep(float(flag.read_text() or 5))
        return super().score_tensors(fronts, backs, with_features, batch_size)
