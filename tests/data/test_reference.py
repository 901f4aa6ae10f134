"""The reference set shipped with the package (coinyear.reference) is the project's reference data: its manifest
is ../shared/data/ocre/manifest.csv byte for byte, and its SHA256SUMS match the photos there, one line each."""

from __future__ import annotations

import os

import pytest

from coinyear.reference import SHIPPED_MANIFEST, load_reference, verify_copy
from tests.conftest import REPO

SHARED = REPO.parent / "shared" / "data" / "ocre"


@pytest.fixture(scope="module")
def shared():
    """The project's own copy; missing, the test fails under CI=true (the check must run there) and skips elsewhere."""
    if not (SHARED / "manifest.csv").is_file():
        message = f"{SHARED} is missing: the shipped reference cannot be compared with it"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return SHARED


def test_the_shipped_reference_is_the_shared_data(shared):
    assert SHIPPED_MANIFEST.read_bytes() == (shared / "manifest.csv").read_bytes()
    reference = load_reference()  # also: SHA256SUMS names exactly the photos the manifest names
    assert len(reference.checksums) == len(list((shared / "images").iterdir())) == 5755
    verify_copy(shared, reference)
