"""Each install imports only what it installs: pyproject.toml's slim core and its extras ([train], [serve], [ui],
[spark]) against what the UI app, the gateway app and the bundle's jobs import.

Every check runs the imports in a fresh interpreter with an import hook (a `sys.meta_path` finder) that refuses a
module of a package the install lacks: a package of an extra the install does not name, unless the core's own
dependencies bring it (fastapi and uvicorn come with mlflow). For the UI the gateway's web stack is refused even
then, when coinyear's own code asks for it: the UI's closure is free of torch, torchvision, fastapi and uvicorn.
Jobs on Databricks Runtime ML have the runtime's torch, torchvision and pyspark, and the [train] packages the
bundle adds to the tasks that train or score.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from coinyear import cli

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
EXTRAS = {name: [Requirement(r) for r in reqs] for name, reqs in PROJECT["optional-dependencies"].items()
          if name != "dev"}
CORE = [Requirement(r) for r in PROJECT["dependencies"]]
RUNTIME_ML = {"torch", "torchvision", "pyspark"}  # what Databricks Runtime ML ships of our extras' packages
BUNDLE = yaml.safe_load((REPO / "deploy" / "databricks" / "databricks.yml").read_text())
APPS = REPO / "deploy" / "databricks" / "apps"

HOOK = textwrap.dedent('''
    import ast, importlib.abc, json, sys
    absent, not_ours = (set(names) for names in json.loads(sys.argv[1]))

    def importer():
        frame = sys._getframe(2)
        while frame is not None and (frame.f_code.co_filename.startswith("<frozen importlib")
                                     or frame.f_globals.get("__name__") == __name__):
            frame = frame.f_back
        return "" if frame is None else frame.f_globals.get("__name__", "")

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            top = fullname.partition(".")[0]
            who = importer()
            if top in absent or (top in not_ours and who.partition(".")[0] == "coinyear"):
                raise ImportError(f"REFUSED {fullname} (imported by {who})")
            return None

    def module_level_imports(tree):
        """The top-level names a module imports when it is imported (not inside functions or TYPE_CHECKING)."""
        todo = list(tree.body)
        while todo:
            node = todo.pop()
            if isinstance(node, ast.Import):
                yield from (alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                yield node.module.partition(".")[0]
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                todo += node.body + node.orelse
            elif isinstance(node, ast.Try):
                todo += node.body + node.orelse + node.finalbody

    sys.meta_path.insert(0, Refuse())
    for statement in json.loads(sys.argv[2]):
        exec(statement, {})
    # a package already imported by someone else (mlflow imports fastapi) reaches no finder: read our modules
    for name, module in sorted(sys.modules.items()):
        if name.partition(".")[0] == "coinyear" and getattr(module, "__file__", None):
            for top in module_level_imports(ast.parse(open(module.__file__).read())):
                if top in not_ours:
                    raise ImportError(f"REFUSED {top} (imported by {name})")
    print("imported")
''')


def dist_name(requirement: Requirement) -> str:
    return re.sub(r"[-_.]+", "-", requirement.name).lower()


def modules_of(distributions: set[str]) -> set[str]:
    """The top-level import names of installed distributions."""
    return {module for module, dists in md.packages_distributions().items()
            if any(re.sub(r"[-_.]+", "-", d).lower() in distributions for d in dists)}


def closure(requirements: list[Requirement]) -> set[str]:
    """Every distribution these requirements install, as the installed metadata says (extras followed)."""
    seen: set[str] = set()
    todo = [(r, set(r.extras)) for r in requirements]
    while todo:
        requirement, extras = todo.pop()
        name = dist_name(requirement)
        key = name + "[" + ",".join(sorted(extras)) + "]"
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for line in requires:
            child = Requirement(line)
            if child.marker is None or any(child.marker.evaluate({"extra": e}) for e in extras | {""}):
                todo.append((child, set(child.extras)))
    return {key.partition("[")[0] for key in seen}


def refused(installed_extras: set[str], also: set[str] = frozenset(), strict_web: bool = False,
            also_missing: set[str] = frozenset()) -> tuple[set, set]:
    """(absent, not_ours) module names for an install of the core, `installed_extras` and the distributions
    `also`, without those of the other extras and the distributions `also_missing`."""
    missing = {dist_name(r) for name, reqs in EXTRAS.items() if name not in installed_extras for r in reqs}
    present = closure(CORE + [r for name in installed_extras for r in EXTRAS[name]]) | also
    # a namespace two distributions share (databricks: the SDK's and the bundles') stays when one is installed
    absent = modules_of((missing | also_missing) - present) - modules_of(present)
    not_ours = modules_of({dist_name(r) for r in EXTRAS["serve"]} & present) if strict_web else set()
    return absent, not_ours


def run_imports(statements: list[str], absent: set[str], not_ours: set[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HOOK, json.dumps([sorted(absent), sorted(not_ours)]),
                           json.dumps(statements)], capture_output=True, text=True, timeout=300, cwd=REPO)


def test_the_hook_refuses_what_an_install_lacks():
    absent, not_ours = refused({"ui"}, strict_web=True)
    assert {"torch", "torchvision", "timm", "openvino", "prometheus_client"} <= absent
    assert {"fastapi", "uvicorn"} <= not_ours and "streamlit" not in absent | not_ours
    result = run_imports(["import torch"], absent, not_ours)
    assert result.returncode != 0 and "REFUSED torch" in result.stderr
    result = run_imports(["import coinyear.serve.app"], absent, not_ours)  # our code asks for fastapi
    assert result.returncode != 0 and "REFUSED fastapi" in result.stderr
    assert run_imports(["import mlflow"], absent, not_ours).stdout.strip() == "imported"  # mlflow's own fastapi


def test_the_ui_imports_without_the_model_or_the_gateway():
    """Every page of `coinyear ui` as the UI app installs it (requirements.txt: the core and [ui])."""
    modules = sorted(f"coinyear.ui.{path.stem}" for path in (REPO / "src" / "coinyear" / "ui").glob("*.py"))
    assert "coinyear.ui.app" in modules and "coinyear.ui.review" in modules
    absent, not_ours = refused({"ui"}, strict_web=True)
    result = run_imports([f"import {module}" for module in modules], absent, not_ours)
    assert result.stdout.strip() == "imported", result.stderr[-3000:]


def requirement_lines(app: str) -> list[Requirement]:
    lines = (APPS / app / "requirements.txt").read_text().splitlines()
    return [Requirement(line) for line in lines if line and not line.startswith(("#", "-"))]


def test_the_apps_install_only_what_they_import():
    """The UI app installs the core and [ui]; the gateway app (a forwarding gateway: `coinyear serve` with
    COINYEAR_SERVING_BACKEND=databricks) the core and [serve], and its command's closure needs nothing else: no
    torch, no model runtime."""
    (ui,) = requirement_lines("ui")
    assert ui.name == "coinyear" and ui.extras == {"ui"}
    (gateway,) = requirement_lines("gateway")
    assert gateway.name == "coinyear" and gateway.extras == {"serve"}
    env = BUNDLE["resources"]["apps"]["gateway"]["config"]["env"]
    assert {"name": "COINYEAR_SERVING_BACKEND", "value": "databricks"} in env
    absent, not_ours = refused({"serve"})
    assert {"torch", "torchvision", "openvino"} <= absent
    backend = ("from coinyear.config import Settings\nfrom coinyear.targets import gateway_backend\n"
               "gateway_backend(Settings(serving_backend='databricks'))")  # RemoteBackend and what it imports
    result = run_imports(["import coinyear.serve.app", backend, *command_imports(["serve"])], absent, not_ours)
    assert result.stdout.strip() == "imported", result.stderr[-3000:]


def command_imports(parameters: list[str]) -> list[str]:
    """The import statements inside the CLI function a job task's parameters run (the commands import lazily)."""
    function = cli.build_parser().parse_args(parameters).func
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    return ["import coinyear.cli"] + [ast.unparse(node) for node in ast.walk(tree)
                                       if isinstance(node, ast.Import | ast.ImportFrom)]


def tasks():
    for job_key, job in BUNDLE["resources"]["jobs"].items():
        for task in job["tasks"]:
            yield pytest.param(task, id=f"{job_key}.{task['task_key']}")


@pytest.mark.parametrize("task", tasks())
def test_each_job_task_installs_the_slim_wheel_and_imports_with_it(task):
    """A task installs our wheel (no extras: a whl library takes none) and, where it trains or scores, the [train]
    packages the runtime lacks, exactly as pyproject lists them; never torch, the apps' extras or Spark."""
    wheels = [library["whl"] for library in task["libraries"] if "whl" in library]
    pypi = [Requirement(library["pypi"]["package"]) for library in task["libraries"] if "pypi" in library]
    assert wheels == ["../../dist/*.whl"] and len(wheels) + len(pypi) == len(task["libraries"])
    expected = sorted(str(r) for r in EXTRAS["train"] if dist_name(r) not in RUNTIME_ML)
    assert sorted(str(r) for r in pypi) in ([], expected)
    also = RUNTIME_ML | {dist_name(r) for r in pypi}
    absent, not_ours = refused(set(), also=also, strict_web=True)  # mlflow brings fastapi; our jobs never ask
    variables = {name: str(spec.get("default", "x")) for name, spec in BUNDLE["variables"].items()}
    parameters = [re.sub(r"\$\{var\.([^}]+)\}", lambda m: variables[m.group(1)], p)
                  for p in task["python_wheel_task"]["parameters"]]
    result = run_imports(command_imports(parameters), absent, not_ours)
    assert result.stdout.strip() == "imported", result.stderr[-3000:]


def test_jobs_that_train_or_score_get_the_train_packages():
    needs = {"retrain", "predict", "train"}  # the CLI commands that build, evaluate or score a model
    for job in BUNDLE["resources"]["jobs"].values():
        for task in job["tasks"]:
            has = any("pypi" in library for library in task["libraries"])
            assert has == (task["python_wheel_task"]["parameters"][0] in needs), task["task_key"]


def test_make_demo_installs_enough_for_the_demo(tmp_path):
    """`make demo` sets up the core and [train] only (Makefile: no gateway, UI, Spark, browser or lint tools, a
    shorter cold set-up). A small `coinyear demo`, run to the end with every module those leave out made
    unimportable, as if not installed (`None` in sys.modules, so an optional import's probe also finds nothing)."""
    makefile = (REPO / "Makefile").read_text()
    demo = makefile.split("\ndemo:\n", 1)[1].split("\n\n", 1)[0]
    assert "setup-train" in demo and "$(call install,train)" in makefile.split("$(BIN)/.installed-train:", 1)[1]
    tools = {dist_name(r) for r in map(Requirement, PROJECT["optional-dependencies"]["dev"])} - {"coinyear"}
    absent = sorted(refused({"train"}, also_missing=tools)[0])
    assert {"streamlit", "pyspark", "prometheus_client", "playwright", "pytest", "mypy"} <= set(absent)
    small = {"BACKBONE": "mobilenet_v3_small", "IMAGE_SIZE": "64", "PROJ_DIM": "32", "EPOCHS": "1",
             "BATCH_SIZE": "16", "HOME": str(tmp_path / "home")}
    script = ("import sys\n"
              f"sys.modules.update(dict.fromkeys({absent!r}))\n"
              "from coinyear.cli import main\n"
              "sys.exit(main(['demo', '--limit', '150']))\n")
    env = {**os.environ, **{f"COINYEAR_{key}": value for key, value in small.items()}}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(alias production)" in done.stdout and "year MAE" in done.stdout
