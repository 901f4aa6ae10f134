"""Put the coinyear wheel that `pip wheel` just built into each app's source folder.

A Databricks App installs its source folder's requirements.txt with pip and sees nothing outside that folder, and
coinyear is not on PyPI: each app folder gets the wheel under wheels/, which its requirements.txt names with
`--find-links ./wheels` and the exact version. The bundle's artifact build runs this from the repository root:

    python -m pip wheel --no-deps --wheel-dir dist . && python deploy/databricks/apps/vendor_wheel.py
"""

from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path

APPS = Path(__file__).resolve().parent
REPO = APPS.parents[2]


def vendor(dist: Path = REPO / "dist", apps: Path = APPS) -> list[Path]:
    """Copy dist/coinyear-<version>-py3-none-any.whl (the pyproject version) into every apps/<app>/wheels/,
    replacing older coinyear wheels there; return the copies. A missing wheel is an error, not an empty app."""
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    wheel = dist / f"coinyear-{version}-py3-none-any.whl"
    if not wheel.is_file():
        raise FileNotFoundError(f"{wheel} not found: build it first (python -m pip wheel --no-deps --wheel-dir "
                                f"{dist} .)")
    copies = []
    for requirements in sorted(apps.glob("*/requirements.txt")):
        target = requirements.parent / "wheels"
        target.mkdir(exist_ok=True)
        for old in target.glob("coinyear-*.whl"):
            old.unlink()
        copies.append(Path(shutil.copy2(wheel, target / wheel.name)))
    return copies


if __name__ == "__main__":
    for copy in vendor(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "dist"):
        print(f"vendored {copy.relative_to(REPO)}")
