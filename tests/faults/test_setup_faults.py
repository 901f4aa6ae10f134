"""The set-up (`make setup`, `make setup-train`, what `make demo` and `make test` run first) on a full disk.

torch and its CUDA libraries need about 10 GB at the set-up's peak; a machine with less fails inside pip with
"[Errno 28] No space left on device" among hundreds of lines of pip's warnings. The Makefile then says in words
that the disk is full, how much the set-up needs and how much is free where it ran out. A stand-in interpreter
makes a virtual environment whose pip fails as pip does on a full disk, so the test needs no full disk.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

FULL_DISK_PIP = """#!/bin/sh
echo "WARNING: Location 'file:///opt/pypi/simple/torch/' is ignored: it is neither a file nor a directory."
echo "ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device"
exit 1
"""

STAND_IN_PYTHON = """#!/bin/sh
# python -m venv DIR: a virtual environment whose pip fails as on a full disk
[ "$1 $2" = "-m venv" ] || exit 2
mkdir -p "$3/bin" && cp "$(dirname "$0")/pip" "$3/bin/pip" && chmod +x "$3/bin/pip"
"""


def test_a_full_disk_is_named_with_the_space_needed_and_free(tmp_path):
    for name, text in {"pip": FULL_DISK_PIP, "python": STAND_IN_PYTHON}.items():
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    venv = tmp_path / "venv"
    done = subprocess.run(["make", "--no-print-directory", "setup-train", f"VENV={venv}",
                           f"PYTHON={tmp_path / 'python'}"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "No space left on device" in done.stderr  # pip's own line, from the end of the log
    assert "the disk is full; it needs about 10 GB free at its peak" in done.stderr
    assert "Filesystem" in done.stderr and "Avail" in done.stderr  # df of the venv's disk and the temporary one
    assert not (venv / "bin" / ".installed-train").exists()  # a failed set-up is not taken for a finished one


def test_another_failure_is_not_called_a_full_disk(tmp_path):
    (tmp_path / "pip").write_text("#!/bin/sh\necho 'ERROR: No matching distribution found for torch==2.14.1'\nexit 1\n")
    (tmp_path / "python").write_text(STAND_IN_PYTHON)
    for name in ("pip", "python"):
        (tmp_path / name).chmod(0o755)
    done = subprocess.run(["make", "--no-print-directory", "setup-train", f"VENV={tmp_path / 'venv'}",
                           f"PYTHON={tmp_path / 'python'}"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "No matching distribution" in done.stderr
    assert "set-up failed: the whole log is" in done.stderr and "disk is full" not in done.stderr
