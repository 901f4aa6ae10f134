"""The registered model is portable: a fresh virtual environment that holds only the model's own requirements.txt
(no coinyear, no project venv) loads `models:/<name>@production`, imports coinyear from the model's code and
answers what our environment answers, for a real OCRE coin; and `mlflow models serve --env-manager uv` builds
such an environment itself and answers over HTTP.

The environments are installed with uv (MLflow's own recommended environment manager), not pip: pip took
9 min 55 s for these requirements (torch with its CUDA wheels, about 6 GB) on this machine under load, uv 52 s
with a cold cache and 5 s with a warm one (it hard-links from its cache).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import requests

from coinyear.config import configure_mlflow
from coinyear.pyfunc import BACK, FRONT, encode_file
from tests.conftest import coin_image

# All the package a served model may import: a module added here must import only what pyfunc.pip_requirements lists.
SERVING_MODULES = {"coinyear", "coinyear.pyfunc", "coinyear.coin_input", "coinyear.data", "coinyear.model",
                   "coinyear.backbones", "coinyear.neighbours", "coinyear.params", "coinyear.quality",
                   "coinyear.runtime", "coinyear.years"}

# Runs inside the fresh environment: nothing of ours is importable there until MLflow loads the model.
SCRIPT = r"""
import importlib.util, json, sys
assert importlib.util.find_spec("coinyear") is None, "coinyear is installed in the model's environment"
import mlflow, pandas as pd
uri, front, back = sys.argv[1:4]
model = mlflow.pyfunc.load_model(uri)
frame = pd.DataFrame({"front_image_base64": [open(front).read()], "back_image_base64": [open(back).read()]})
years = model.predict(frame)
interval = model.predict(frame, params={"interval": 0.9})
near = model.predict(frame, params={"neighbours": 2})
import coinyear
print(json.dumps({"years": [float(y) for y in years], "interval": interval.to_dict(orient="records"),
                  "neighbours": near.to_dict(orient="records"),
                  "engine": model.unwrap_python_model().engine,
                  "coinyear": coinyear.__file__, "modules": sorted(m for m in sys.modules if m.startswith("coinyear")),
                  "pydantic_settings": importlib.util.find_spec("pydantic_settings") is not None}))
"""


BIN = Path(sys.executable).parent  # our venv's tools (mlflow, uv), never its site-packages


def _clean_env(settings) -> dict[str, str]:
    """The environment of a stranger's process: none of our paths, the registry named explicitly."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("COINYEAR_", "MLFLOW_", "PYTHON", "VIRTUAL_ENV", "UV_"))}
    env.update(MLFLOW_TRACKING_URI=settings.mlflow_tracking_uri, MLFLOW_REGISTRY_URI=settings.mlflow_registry_uri,
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", **_uv_sources())
    return env


def _uv_sources() -> dict[str, str]:
    """pip's configured package sources (pip.conf files, PIP_* variables) as uv's variables: uv reads neither,
    and this machine serves torch from local indexes that only pip's configuration names. pip's resolution
    across indexes (best version from any) is kept."""
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                             check=True).stdout
    found: dict[str, list[str]] = {}
    for line in listing.splitlines():  # e.g. global.find-links='/opt/wheels' or :env:.find-links='...'
        key, _, value = line.partition("=")
        items = found.setdefault(key.rsplit(".", 1)[-1], [])
        items.extend(item for item in value.strip().strip("'\"").split() if item not in items)
    env = {"UV_INDEX_STRATEGY": "unsafe-best-match"}
    if "index-url" in found:
        env["UV_INDEX_URL"] = found["index-url"][0]
    if "extra-index-url" in found:
        env["UV_EXTRA_INDEX_URL"] = " ".join(found["extra-index-url"])
    if "find-links" in found:
        env["UV_FIND_LINKS"] = ",".join(found["find-links"])
    if "cert" in found:
        env["SSL_CERT_FILE"] = found["cert"][0]
    return env


def _uv() -> str:
    uv = shutil.which("uv", path=str(BIN))
    assert uv, "uv is missing from the venv: it is a dev dependency (pip install -e '.[dev]')"
    return uv


@pytest.fixture(scope="module")
def model_files(trained, tmp_path_factory) -> Path:
    """The production model's files as any consumer downloads them."""
    import mlflow

    settings, _ = trained
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(settings.mlflow_registry_uri)
    return Path(mlflow.artifacts.download_artifacts(f"models:/{settings.model_name}@production",
                                                    dst_path=str(tmp_path_factory.mktemp("model"))))


@pytest.fixture(scope="module")
def model_env(trained, model_files, tmp_path_factory) -> Path:
    """A new virtual environment with exactly the model's requirements.txt installed; returns its python."""
    settings, _ = trained
    folder = tmp_path_factory.mktemp("model-env") / "venv"
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    result = subprocess.run([_uv(), "pip", "install", "--python", str(python), "-r",
                             str(model_files / "requirements.txt")], check=False, env=_clean_env(settings),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(f"fresh model environment built in {time.monotonic() - started:.0f} s")
    yield python
    shutil.rmtree(folder, ignore_errors=True)


def _real_coin(ocre_dir: Path, folder: Path, index: int) -> tuple[Path, Path]:
    """Front and back of one OCRE coin as base64 text files."""
    manifest = pd.read_csv(ocre_dir / "manifest.csv")
    coin = manifest.iloc[index % len(manifest)]
    front, back = folder / f"front-{index}.b64", folder / f"back-{index}.b64"
    front.write_text(encode_file(ocre_dir / coin["obverse"]))
    back.write_text(encode_file(ocre_dir / coin["reverse"]))
    return front, back


def _our_year(settings, front: Path, back: Path) -> float:
    """What our own environment predicts for the coin."""
    import mlflow

    configure_mlflow(settings)  # the torch-index test has reset the tracking URI: never the default ./mlflow.db
    model = mlflow.pyfunc.load_model(f"models:/{settings.model_name}@production")
    return float(model.predict(pd.DataFrame({FRONT: [front.read_text()], BACK: [back.read_text()]}))[0])


@pytest.mark.slow
def test_requirements_pin_what_serving_imports_and_not_coinyear(model_files):
    from importlib.metadata import version

    lines = [line.strip() for line in (model_files / "requirements.txt").read_text().splitlines() if line.strip()]
    names = {re.split(r"[=<>!~ ]", line, maxsplit=1)[0].lower() for line in lines}
    assert not any(name.startswith("coinyear") for name in names), lines
    assert f"torch=={version('torch').split('+')[0]}" in lines
    assert f"mlflow=={version('mlflow')}" in lines
    assert {"torchvision", "pillow", "numpy", "pandas", "cloudpickle"} <= names
    # the model carries its checked ONNX graph, so the runtimes that score it are requirements
    assert f"onnxruntime=={version('onnxruntime')}" in lines
    assert f"openvino=={version('openvino').split('+')[0]}" in lines
    assert (model_files / "artifacts" / "model.onnx").is_file()
    assert all("==" in line for line in lines), f"every requirement is pinned: {lines}"
    assert "timm" not in names, "the mobilenet_v3_small model needs no timm"
    assert (model_files / "code" / "coinyear" / "pyfunc.py").is_file()
    assert not list((model_files / "code").rglob("__pycache__"))


@pytest.mark.slow
def test_fresh_environment_scores_a_real_coin_like_ours(trained, model_env, ocre_dir, tmp_path):
    settings, _ = trained
    front, back = _real_coin(ocre_dir, tmp_path, 7)
    ours = [_our_year(settings, front, back)]
    uri = f"models:/{settings.model_name}@production"

    run = subprocess.run([str(model_env), "-c", SCRIPT, uri, str(front), str(back)], check=False, cwd=tmp_path,
                         env=_clean_env(settings), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    answer = json.loads(run.stdout.strip().splitlines()[-1])
    assert answer["years"] == pytest.approx(ours, abs=1e-3)
    assert answer["interval"][0]["year"] == pytest.approx(ours[0], abs=1e-3)
    assert answer["interval"][0]["low"] <= answer["interval"][0]["year"] <= answer["interval"][0]["high"]
    # the reference coins' table (parquet: pyarrow comes with mlflow) loads and answers there too
    assert answer["neighbours"][0]["year"] == pytest.approx(ours[0], abs=1e-3)
    assert [n["coin_id"] for n in answer["neighbours"][0]["neighbours"]] == _our_neighbours(settings, front, back, 2)
    # coinyear came from the model's own code, not from an installed package
    assert Path(answer["coinyear"]).parts[-3:] == ("code", "coinyear", "__init__.py"), answer["coinyear"]
    assert "site-packages" not in answer["coinyear"]
    # the serving closure: settings (pydantic-settings), lake, Spark and the rest of the package stay unloaded
    assert {"coinyear.pyfunc", "coinyear.data", "coinyear.model", "coinyear.neighbours", "coinyear.quality",
            "coinyear.runtime"} <= set(answer["modules"])
    # the fresh environment scores with the ONNX graph (OpenVINO came from the model's requirements)
    assert answer["engine"] == "openvino"
    assert set(answer["modules"]) <= SERVING_MODULES, answer["modules"]
    assert answer["pydantic_settings"] is False


def test_torch_index_pins_that_build_and_survives_mlflow(tmp_path):
    """COINYEAR_MODEL_TORCH_INDEX: the requirements name the index and the build it serves (CPU here), and MLflow
    keeps the pip option line in the logged requirements.txt. Installing from that index is not tested: this
    machine reaches PyPI only."""
    from importlib.metadata import version

    import mlflow

    from coinyear.model import ModelConfig, build_model, save_checkpoint
    from coinyear.pyfunc import log_model, pip_requirements

    index = "https://download.pytorch.org/whl/cpu"
    torch_version, vision_version = (version(name).split("+")[0] for name in ("torch", "torchvision"))
    lines = pip_requirements("mobilenet_v3_small", index)
    assert lines[0] == f"--extra-index-url {index}"
    assert f"torch=={torch_version}+cpu" in lines and f"torchvision=={vision_version}+cpu" in lines
    assert not any(line.startswith("timm") for line in lines)
    assert f"timm=={version('timm')}" in pip_requirements("efficientnet_lite0")
    assert f"torch=={torch_version}" in pip_requirements("efficientnet_lite0")

    checkpoint = tmp_path / "model.pt"
    config = ModelConfig(backbone="mobilenet_v3_small", image_size=64, proj_dim=32, pretrained=False)
    save_checkpoint(build_model(config, year_center=50.0), checkpoint)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        with mlflow.start_run():
            photo = base64.b64encode(coin_image(3)).decode("ascii")
            # without the ONNX graph: the requirements are exactly the torch-index lines asserted above
            info = log_model(checkpoint, pd.DataFrame({FRONT: [photo], BACK: [photo]}), torch_index=index,
                             onnx=False)
        files = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "model")))
    finally:
        mlflow.set_tracking_uri(None)
    written = (files / "requirements.txt").read_text().splitlines()
    assert written == lines, written
    # one output schema for every answer: the year always, the interval columns only with params.interval, the
    # nearest reference coins and the likeliest portraits (lists of objects) only with params.neighbours and
    # params.portraits
    outputs = info.signature.outputs
    assert outputs.input_names() == ["year", "low", "high", "out_of_distribution", "neighbours", "portraits"]
    assert outputs.required_input_names() == ["year"]


def _our_neighbours(settings, front: Path, back: Path, k: int) -> list[str]:
    """The coin ids of the coin's k nearest reference coins in our own environment."""
    import mlflow

    configure_mlflow(settings)
    model = mlflow.pyfunc.load_model(f"models:/{settings.model_name}@production")
    frame = pd.DataFrame({FRONT: [front.read_text()], BACK: [back.read_text()]})
    return [n["coin_id"] for n in model.predict(frame, params={"neighbours": k})["neighbours"][0]]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_builds_the_environment_and_answers(trained, ocre_dir, tmp_path):
    """`mlflow models serve --env-manager uv`: MLflow builds the environment from the model alone (new env root,
    so nothing is reused), and its scoring server answers a real coin in the wire format clients read."""
    settings, _ = trained
    front, back = _real_coin(ocre_dir, tmp_path, 11)
    ours = _our_year(settings, front, back)
    port, log = _free_port(), tmp_path / "serve.log"
    env = {**_clean_env(settings), "MLFLOW_ENV_ROOT": str(tmp_path / "envs")}
    started = time.monotonic()
    with open(log, "wb") as out:
        server = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m",
                                   f"models:/{settings.model_name}@production", "--env-manager", "uv",
                                   "-h", "127.0.0.1", "-p", str(port)],
                                  env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, f"mlflow models serve exited: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not ready in 300 s: {log.read_text()[-3000:]}"
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        print(f"mlflow models serve: environment built and serving in {time.monotonic() - started:.0f} s")
        row = {FRONT: front.read_text(), BACK: back.read_text()}
        plain = requests.post(f"{url}/invocations", json={"inputs": [row]}, timeout=120)
        assert plain.status_code == 200, plain.text[-2000:]
        assert plain.json() == {"predictions": [pytest.approx(ours, abs=1e-3)]}
        ranged = requests.post(f"{url}/invocations", json={"dataframe_records": [row], "params": {"interval": 0.9}},
                               timeout=120)
        assert ranged.status_code == 200, ranged.text[-2000:]
        answer = ranged.json()["predictions"][0]
        assert set(answer) == {"year", "low", "high", "out_of_distribution"}
        assert answer["year"] == pytest.approx(ours, abs=1e-3) and answer["low"] <= ours <= answer["high"]
        # neighbours through MLflow's own scoring server: a list of objects per row, with and without interval
        near = requests.post(f"{url}/invocations", json={"inputs": [row], "params": {"neighbours": 3}}, timeout=120)
        assert near.status_code == 200, near.text[-2000:]
        answer = near.json()["predictions"][0]
        assert set(answer) == {"year", "neighbours"} and answer["year"] == pytest.approx(ours, abs=1e-3)
        assert [n["coin_id"] for n in answer["neighbours"]] == _our_neighbours(settings, front, back, 3)
        assert answer["neighbours"][0]["thumbnail"].startswith("data:image/jpeg;base64,")
        both = requests.post(f"{url}/invocations", timeout=120,
                             json={"inputs": [row], "params": {"neighbours": 1, "interval": 0.9}}).json()
        assert set(both["predictions"][0]) == {"year", "low", "high", "out_of_distribution", "neighbours"}
        assert len(both["predictions"][0]["neighbours"]) == 1
        # the recognised portraits through MLflow's own scoring server, likeliest first
        named = requests.post(f"{url}/invocations", json={"inputs": [row], "params": {"portraits": 2}}, timeout=120)
        assert named.status_code == 200, named.text[-2000:]
        answer = named.json()["predictions"][0]
        assert set(answer) == {"year", "portraits"} and answer["year"] == pytest.approx(ours, abs=1e-3)
        assert [set(p) for p in answer["portraits"]] == [{"portrait", "probability", "year"}] * 2
        assert answer["portraits"][0]["probability"] >= answer["portraits"][1]["probability"]
        for value in (21, -1, "x"):
            refused = requests.post(f"{url}/invocations", json={"inputs": [row], "params": {"neighbours": value}},
                                    timeout=60)
            assert refused.status_code == 400, (value, refused.text[-500:])
            assert refused.json()["error_code"] == "INVALID_PARAMETER_VALUE", refused.text[-500:]
        bad = requests.post(f"{url}/invocations", json={"inputs": [{FRONT: "not base64!", BACK: row[BACK]}]},
                            timeout=60)
        assert bad.status_code == 400 and "front_image_base64" in bad.json()["message"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        shutil.rmtree(tmp_path / "envs", ignore_errors=True)
