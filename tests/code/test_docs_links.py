"""Every relative link and every repository path the docs and the README point at exists."""

from __future__ import annotations

import re

import pytest

from tests.conftest import REPO

DOCUMENTS = [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md"]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
REPO_PATH = re.compile(r"`((?:docs|notebooks|deploy|benchmarks|src|tests)/[\w./-]+)`")


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_links_and_paths_exist(document):
    text = document.read_text()
    missing = [target for target in LINK.findall(text)
               if "://" not in target and not (document.parent / target).exists()]
    missing += [path for path in REPO_PATH.findall(text) if not (REPO / path).exists()]
    assert not missing, f"{document.relative_to(REPO)} points at what does not exist: {missing}"
