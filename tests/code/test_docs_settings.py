"""Every `COINYEAR_*` variable the docs and the README name is a real setting, and every default they
state for one is its actual default."""

from __future__ import annotations

import re

import pytest

from tests.conftest import REPO

DOCUMENTS = [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md"]
NOT_SETTINGS = {"COINYEAR_NOTEBOOK_SMALL"}  # read by the notebook itself
ROW = re.compile(r"^\| `(COINYEAR_[A-Z0-9_]+)` \| `([^`]+)` \|", flags=re.M)


def fields() -> dict:
    from coinyear.config import Settings

    return {name: info.default for name, info in Settings.model_fields.items()}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_named_variables_are_settings(document):
    known = fields()
    named = set(re.findall(r"\bCOINYEAR_[A-Z0-9_]*[A-Z0-9]\b", document.read_text())) - NOT_SETTINGS
    unknown = sorted(v for v in named if v.removeprefix("COINYEAR_").lower() not in known)
    assert not unknown, f"{document.relative_to(REPO)} names settings that do not exist: {unknown}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_stated_defaults_are_the_defaults(document):
    known = fields()
    wrong = []
    for variable, stated in ROW.findall(document.read_text()):
        actual = known.get(variable.removeprefix("COINYEAR_").lower())
        if isinstance(actual, bool) or not isinstance(actual, (int, float, str)):
            continue  # paths and computed defaults are described in words
        try:
            same = float(stated) == float(actual) if isinstance(actual, (int, float)) else stated == actual
        except ValueError:
            same = False
        if not same:
            wrong.append(f"{variable}: documented `{stated}`, actual {actual!r}")
    assert not wrong, f"{document.relative_to(REPO)} states wrong defaults: {wrong}"
