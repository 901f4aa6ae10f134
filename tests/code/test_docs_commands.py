"""Every `coinyear ...` command that the docs and the README quote exists: each subcommand is listed by
`coinyear [...] --help`, and each `--flag` quoted with it is in that command's --help."""

from __future__ import annotations

import re
import subprocess
import sys
from functools import cache

import pytest

from tests.conftest import REPO

DOCUMENTS = [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md"]
CODE = re.compile(r"```.*?```|`[^`\n]+`", flags=re.S)
COMMAND = re.compile(r"(?:^|(?<=[\s/(]))coinyear\s+(?=[a-z-])")


@cache
def help_text(path: tuple[str, ...]) -> str:
    result = subprocess.run([sys.executable, "-m", "coinyear.cli", *path, "--help"], capture_output=True,
                            text=True, timeout=60, cwd=REPO)
    if result.returncode != 0:
        raise LookupError(f"`coinyear {' '.join(path)} --help` failed: {result.stderr.strip()[-300:]}")
    return result.stdout


def subcommands(path: tuple[str, ...]) -> set[str]:
    """The choices of the command's subparser, from the `{a,b,c}` of its usage line."""
    usage = help_text(path).split("\n\n")[0]
    match = re.search(r"\{([a-z0-9_,-]+)\}\s+\.\.\.", usage)  # a subparser, not an option choice
    return set(match.group(1).split(",")) if match else set()


def command_lines(text: str) -> list[str]:
    """What follows each `coinyear ` inside code (fenced blocks and inline spans), to the end of its line."""
    found = []
    for block in CODE.findall(text):
        for line in block.strip("`").splitlines():
            line = line.split(" #", 1)[0]  # shell comments
            for match in COMMAND.finditer(line):
                found.append(line[match.end():])
    return found


def check(rest: str) -> list[str]:
    """Problems with one quoted command line (the text after `coinyear `); [] when it exists."""
    pieces = [piece.strip() for piece in re.split(r"\\?\|", rest.replace("[", " ").replace("]", " "))]
    problems, path = [], ()
    for index, piece in enumerate(pieces):
        tokens = piece.split()
        if not tokens:
            continue
        if index == 0:
            prefix = ()
        elif path and tokens[0] in subcommands(path[:-1]):
            prefix = path[:-1]  # `models list | promote ...`: an alternative of the same parent
        else:
            continue  # a shell pipe or an alternative value (`shared|dual`): not ours to check
        path = prefix
        for token in tokens:
            options = subcommands(path)
            if not options or token.startswith("-"):
                break
            if token not in options:
                problems.append(f"`coinyear {' '.join((*path, token))}`: no such command "
                                f"(choose from {', '.join(sorted(options))})")
                break
            path = (*path, token)
        usage = help_text(path)
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", piece):
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", usage):
                problems.append(f"`coinyear {' '.join(path)} {flag}`: no such option")
    return problems


def test_checker_catches_unknown_commands_and_options():
    assert check("models promote 3 --to production") == []
    assert check("models list \\| promote VERSION --to staging\\|production \\| rollback") == []
    assert check("frobnicate --now")[0].startswith("`coinyear frobnicate`: no such command")
    assert check("models destroy")[0].startswith("`coinyear models destroy`: no such command")
    assert check("train --epochs 3 --warp-speed") == ["`coinyear train --warp-speed`: no such option"]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_quoted_commands_exist(document):
    lines = command_lines(document.read_text())
    problems = [f"{problem}  (quoted as `coinyear {line.strip()}`)" for line in lines for problem in check(line)]
    assert not problems, f"{document.relative_to(REPO)} quotes commands the CLI does not have:\n" + "\n".join(problems)


def test_the_docs_quote_the_main_commands():
    quoted = {" ".join(line.split()[:1]) for document in DOCUMENTS for line in command_lines(document.read_text())}
    for command in ("train", "evaluate", "models", "data", "serve", "retrain", "ui"):
        assert command in quoted, f"no document shows `coinyear {command}`"
