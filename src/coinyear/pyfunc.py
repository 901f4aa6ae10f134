"""The MLflow model: a pair of base64 photos in, the year out.

The logged model is an MLflow pyfunc, so anything that serves MLflow models serves it unchanged:
our gateway, `mlflow models serve -m models:/coinyear@production`, or Databricks Model Serving. Input rows
have two string columns, `front_image_base64` and `back_image_base64`; the output is one year per row.

With the inference parameter `interval` (a coverage level such as 0.9, sent as `{"params": {"interval": 0.9}}`)
each row's answer is instead `{"year", "low", "high", "out_of_distribution"}`: the conformal range that holds
the true year for that share of coins like the training coins, and whether the photos look unlike any
training coin (then the range and year deserve little trust).

With `neighbours` (a whole number k, 1 to 20: `{"params": {"neighbours": 5}}`) each row's answer is an object
with `year` (and the interval fields when `interval` is asked too) and `neighbours`: the k training coins whose
features lie nearest to the request's, by the OOD flag's cosine distance, nearest first, each with `coin_id`,
`year_from`, `year_to`, `date_text`, `denomination`, `mint`, `portrait`, `distance` and its sides as JPEG data
URLs `thumbnail` (obverse) and `thumbnail_back` (see coinyear.neighbours). Models logged without the reference
table refuse the parameter with a 400.

With `portraits` (a whole number k, 1 to 5: `{"params": {"portraits": 3}}`) each row's answer is an object with
`year` and `portraits`: whose head the model recognises on the obverse, the k likeliest of its portrait classes,
likeliest first, each with `portrait` (the name as the catalogue writes it, or "other" for the rarer portraits
pooled in one class), `probability` (averaged over the rotation TTA) and `year` (the median catalogue year of the
training coins with that portrait: the served year leans towards it, `ModelConfig.ruler_blend`). It is the
first thing a numismatist checks. Models trained without a named portrait head refuse the parameter with a 400.

The logged model is self-contained: it carries the coinyear package as MLflow `code_paths` (put first on
`sys.path` when MLflow loads it) and lists as requirements exactly what the serving code imports, pinned to
the training environment's versions, so any environment MLflow builds from it (`mlflow models serve`,
`spark_udf`, Databricks Model Serving) scores without coinyear installed. Loading it imports only
`coinyear.pyfunc`, `.coin_input`, `.data`, `.model`, `.backbones`, `.neighbours`, `.params`, `.quality`, `.runtime`
and `.years`: none may import a package missing from `pip_requirements` at module level (settings, lake, Spark,
tqdm and scikit-learn stay lazy; pyarrow, which reads the reference table, comes with mlflow).

When the logged model carries an ONNX export of the network (`coinyear.runtime`: all TTA rotations and the OOD
features in one graph, attached only when it matched PyTorch at logging time) it scores with the first runtime
that matched at logging time and imports: OpenVINO, then ONNX Runtime; otherwise with PyTorch.
`CoinYearModel.engine` and the log say which.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array, Object, Property

from coinyear.coin_input import BACK, FRONT, InvalidCoinInput, decode_base64, decode_pair, encode_file
from coinyear.params import ScoringParams, parse_params, unsupported

CHECKPOINT = "checkpoint"
CONFORMAL, OOD, NEIGHBOURS = "conformal", "ood", "neighbours"
ONNX, RUNTIMES = "onnx", "runtimes"  # the graph; the runtimes that matched PyTorch on it at logging time (JSON)
ONNX_PACKAGES = ("onnxruntime",)  # the baseline runtime of every ONNX model; "openvino" joins when it matched

log = logging.getLogger(__name__)

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", FRONT), ColSpec("string", BACK)]),
    # MLflow has one output schema for both answers: `year` always; low, high and out_of_distribution only
    # with `params.interval` (then a row per coin). A plain call returns the bare years, which every scoring
    # server sends as `{"predictions": [year, ...]}`, the wire format clients read today. spark_udf would infer a
    # struct of all four from this schema: callers name result_type ("double" plain, the struct with interval).
    outputs=Schema([ColSpec("double", "year"), ColSpec("double", "low", required=False),
                    ColSpec("double", "high", required=False),
                    ColSpec("boolean", "out_of_distribution", required=False),
                    # only with `params.neighbours`: the nearest training coins (coinyear.neighbours)
                    ColSpec(Array(Object([
                        *(Property(name, "string", required=name == "coin_id")
                          for name in ("coin_id", "date_text", "denomination", "mint", "portrait")),
                        Property("year_from", "long"), Property("year_to", "long"), Property("distance", "double"),
                        Property("thumbnail", "string"), Property("thumbnail_back", "string")])),
                        "neighbours", required=False),
                    # only with `params.portraits`: the likeliest portraits on the obverse
                    ColSpec(Array(Object([Property("portrait", "string"), Property("probability", "double"),
                                          Property("year", "double")])), "portraits", required=False)]),
    params=ParamSchema([ParamSpec("batch_size", "long", 32),
                        # 0 = plain years; a level in (0, 1) = year, conformal range and OOD flag per row
                        ParamSpec("interval", "double", 0.0),
                        # 0 = none; k in 1..20 = the k nearest training coins per row
                        ParamSpec("neighbours", "long", 0),
                        # 0 = none; k in 1..5 = the k likeliest portraits per row
                        ParamSpec("portraits", "long", 0)]),
)


def pair_tensors(arrays: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded (front, back) uint8 arrays [C, H, W] of several coins as the network's two inputs: float
    [N, C, H, W] in [0, 1]. Every path that scores photos (the pyfunc, the gateway, the behaviour checks) stacks
    them here."""
    fronts = torch.from_numpy(np.stack([front for front, _ in arrays])).float() / 255
    backs = torch.from_numpy(np.stack([back for _, back in arrays])).float() / 255
    return fronts, backs


class CoinYearModel(PythonModel):
    """Wraps a `DualImageRegressor` checkpoint."""

    def load_context(self, context) -> None:
        from coinyear.model import as_ensemble, load_checkpoint

        self.model = load_checkpoint(context.artifacts[CHECKPOINT])
        # (name, median year) per portrait class; [] for a model without a named portrait head
        self.portraits = as_ensemble(self.model).portrait_classes()
        self.span: dict = dict(self.model.config.span)  # {} for a model logged before spans were recorded
        self.size = self.model.config.image_size
        self.grayscale = self.model.config.grayscale
        self.quality = None
        if CONFORMAL in context.artifacts and OOD in context.artifacts:  # models logged before have neither
            from coinyear.quality import Quality

            self.quality = Quality.load(context.artifacts[CONFORMAL], context.artifacts[OOD])
        self.references = None
        if self.quality is not None and NEIGHBOURS in context.artifacts:  # models logged before have none
            from coinyear.neighbours import References

            self.references = References.load(context.artifacts[NEIGHBOURS])
            if len(self.references) != len(self.quality.ood.reference):
                raise ValueError(f"the reference table has {len(self.references)} coins, the OOD reference "
                                 f"{len(self.quality.ood.reference)}: they must be the same coins in the same order")
        self.onnx, self.engine = None, "pytorch"
        self.onnx_path: str | None = context.artifacts.get(ONNX)
        if ONNX in context.artifacts:  # models logged before, or whose export did not match, have none
            # models logged before the runtimes file were checked with ONNX Runtime alone
            engines = (tuple(json.loads(Path(context.artifacts[RUNTIMES]).read_text()))
                       if RUNTIMES in context.artifacts else ("onnxruntime",))
            try:
                from coinyear.runtime import open_scorer

                self.onnx, self.engine = open_scorer(context.artifacts[ONNX], engines=engines)
            except Exception as error:  # noqa: BLE001 - no runtime imports or loads: PyTorch answers the same
                log.warning("cannot run the ONNX graph (%s: %s): scoring with PyTorch", type(error).__name__, error)
        log.info("coinyear model scores with %s", self.engine)

    def tensors(self, model_input: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [column for column in (FRONT, BACK) if column not in model_input.columns]
        if missing:
            raise InvalidCoinInput(f"missing column(s): {', '.join(missing)}")
        return pair_tensors([decode_pair(decode_base64(front, row, FRONT), decode_base64(back, row, BACK),
                                         self.size, self.grayscale, row)
                             for row, (front, back) in enumerate(zip(model_input[FRONT], model_input[BACK]))])

    def score_tensors(self, fronts: torch.Tensor, backs: torch.Tensor, with_features: bool = False,
                      batch_size: int = 32) -> dict[str, np.ndarray]:
        """The one scoring path: per coin `year`, `spread` (how much the year moves over the TTA rotations; zero
        without TTA) and, with `with_features`, the out-of-distribution `features` [B, D] and, for a model with a
        named portrait head, the `portraits` probabilities [B, classes].

        Callers that batch across requests (the gateway's micro-batcher) call this once per batch and slice the
        arrays per request; `answers` then turns a slice into intervals at each request's own level.
        """
        from coinyear.runtime import torch_infer

        onnx = getattr(self, "onnx", None)
        if onnx is None:  # PyTorch batches the request itself, inside one kept-memory block
            scored = torch_infer(self.model, fronts, backs, with_features, batch_size)
            return {key: value.numpy().astype(float) for key, value in scored.items()}
        parts = [onnx.infer(fronts[start:start + batch_size], backs[start:start + batch_size], with_features)
                 for start in range(0, len(fronts), max(batch_size, 1))]
        return {key: torch.cat([part[key] for part in parts]).numpy().astype(float) for key in parts[0]}

    def check_params(self, level: float, neighbours: int = 0, portraits: int = 0) -> None:
        """InvalidCoinInput unless this version can answer `interval` (level > 0), `neighbours` and `portraits`
        (k > 0)."""
        why = unsupported(ScoringParams(level, neighbours, portraits), intervals=self.quality is not None,
                          references=getattr(self, "references", None) is not None,
                          portraits=bool(getattr(self, "portraits", None)))
        if why:
            raise InvalidCoinInput(f"this model version {why}")

    def answers(self, scored: dict[str, np.ndarray], level: float, neighbours: int = 0,
                portraits: int = 0) -> pd.DataFrame:
        """Per coin the year; with `level` > 0 the conformal range at that level and the out-of-distribution
        flag; with `neighbours` k > 0 the k nearest training coins and with `portraits` k > 0 the k likeliest
        portraits (lists of dicts). From `score_tensors` output computed `with_features`."""
        self.check_params(level, neighbours, portraits)
        frame = pd.DataFrame({"year": scored["year"]})
        if portraits:
            frame["portraits"] = likeliest_portraits(scored["portraits"], self.portraits, portraits)
        if not (level or neighbours):
            return frame
        quality, references = self.quality, getattr(self, "references", None)
        assert quality is not None, "check_params: both parameters need the quality files (references load after)"
        distance = quality.ood.distances(scored["features"])  # the costly part, once for the flag and neighbours
        if level:
            frame["low"], frame["high"] = quality.conformal.ranges(
                scored, level, np.array([year for _, year in getattr(self, "portraits", None) or []]))
            frame["out_of_distribution"] = quality.ood.flag(scored["features"], distance, scored.get("portraits"),
                                                            scored.get("disagreement"), scored.get("embedding"))
        if neighbours:
            assert references is not None, "check_params refused neighbours without the reference table"
            frame["neighbours"] = references.describe(*quality.ood.nearest(scored["features"], neighbours, distance))
        return frame

    def predict_tensors(self, fronts: torch.Tensor, backs: torch.Tensor, batch_size: int = 32) -> np.ndarray:
        """The year per coin."""
        return self.score_tensors(fronts, backs, False, batch_size)["year"]

    def predict_intervals(self, fronts: torch.Tensor, backs: torch.Tensor, level: float,
                          batch_size: int = 32) -> pd.DataFrame:
        """Year, conformal range at `level` and out-of-distribution flag per coin."""
        self.check_params(level)
        return self.answers(self.score_tensors(fronts, backs, True, batch_size), level)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        params = params or {}
        batch_size = max(int(params.get("batch_size") or 32), 1)
        try:  # MLflow's server has already made the params of the signature's types
            asked = parse_params(params)
        except ValueError as error:
            raise InvalidCoinInput(str(error)) from error
        level, neighbours, portraits = asked.interval, asked.neighbours, asked.portraits
        self.check_params(level, neighbours, portraits)
        if len(model_input) == 0:
            columns = ["year", *(["portraits"] if portraits else []),
                       *(["low", "high", "out_of_distribution"] if level else []),
                       *(["neighbours"] if neighbours else [])]
            return pd.DataFrame(columns=columns) if level or neighbours or portraits else np.zeros(0)
        fronts, backs = self.tensors(model_input)
        if level or neighbours or portraits:
            return self.answers(self.score_tensors(fronts, backs, True, batch_size), level, neighbours, portraits)
        return self.predict_tensors(fronts, backs, batch_size)


def likeliest_portraits(probabilities: np.ndarray, classes: list[tuple[str, float]], k: int) -> list[list[dict]]:
    """Per coin the `k` likeliest portrait classes, likeliest first: {portrait, probability, year}, from the
    head's probabilities [B, classes] and the classes' (name, median year)."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [[{"portrait": classes[c][0], "probability": round(float(row[c]), 4), "year": round(classes[c][1], 1)}
             for c in picks] for row, picks in zip(probabilities, order)]


def input_example(rows: pd.DataFrame) -> pd.DataFrame:
    """A real coin from the training data as the logged input example."""
    first = rows.iloc[0]
    return pd.DataFrame({FRONT: [encode_file(first["obverse_path"])], BACK: [encode_file(first["reverse_path"])]})


# What loading and scoring the model imports (cloudpickle restores the python model; the rest is the import
# closure of coinyear.pyfunc). timm only for the backbones built with it; the ImageNet weights package is not
# needed: the checkpoint holds every weight.
SERVING_PACKAGES = ("mlflow", "cloudpickle", "torch", "torchvision", "pillow", "numpy", "pandas")
TIMM_BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")  # = model.EFFICIENTNET_LITE
TORCH_PACKAGES = ("torch", "torchvision")


def pip_requirements(backbone: str, torch_index: str | None = None, onnx: bool = False,
                     runtimes: tuple[str, ...] = ONNX_PACKAGES) -> list[str]:
    """The model's pip requirements: the packages its serving code imports, pinned to the installed versions;
    with `onnx` (the model carries the ONNX graph) also the `runtimes` that run it (onnxruntime, openvino).

    `mlflow` is the full package, not mlflow-skinny: an environment built from the model often resolves
    `models:/` URIs itself, and the SQL registry (the default here) needs SQLAlchemy and Alembic, which only
    `mlflow` brings. Local version labels (`2.14.1+cu130`) are dropped, so torch comes from PyPI, whose Linux
    wheel is the CUDA build (several GB of nvidia-* wheels). `torch_index`, a PyTorch wheel index such as
    https://download.pytorch.org/whl/cpu, instead adds `--extra-index-url <index>` and pins torch and
    torchvision to the variant the index is named after (`torch==2.14.1+cpu`): a small CPU-only environment.
    MLflow keeps that pip option line in the logged requirements.txt; the environment that installs it must
    reach the index, which no test here can (this machine reaches PyPI only).
    """
    from importlib.metadata import version

    names = [*SERVING_PACKAGES, *(["timm"] if backbone in TIMM_BACKBONES else []), *(runtimes if onnx else ())]
    pins = {name: version(name).split("+")[0] for name in names}
    lines = []
    if torch_index:
        variant = torch_index.rstrip("/").rsplit("/", 1)[-1]
        lines.append(f"--extra-index-url {torch_index}")
        pins.update({name: f"{pins[name]}+{variant}" for name in TORCH_PACKAGES})
    return lines + [f"{name}=={pin}" for name, pin in pins.items()]


def package_dir() -> str:
    """The folder of the coinyear package that is running: logged whole as the model's code."""
    import coinyear

    return str(Path(coinyear.__file__).resolve().parent)


def log_model(checkpoint: Path, example: pd.DataFrame, registered_model_name: str | None = None,
              quality: dict[str, str] | None = None, torch_index: str | None = None, onnx: bool = True):
    """Log the pyfunc (signature + input example) in the active run; register it when a name is given.

    `quality` holds the interval calibration and OOD files (`Quality.save`), which enable `interval`, and may
    hold the reference coins' table (`neighbours`: `References.save`), which enables `neighbours`.
    The model carries its code and pinned requirements (see `pip_requirements`; training passes the setting
    `COINYEAR_MODEL_TORCH_INDEX` as `torch_index`). With `onnx`, the network is exported to ONNX and scored by
    PyTorch, ONNX Runtime and OpenVINO on the input example's coin (`coinyear.runtime.export_checked`); the graph
    and onnxruntime are added only when ONNX Runtime agrees, openvino only when it agrees too (the `runtimes`
    artifact lists which did). The run gets the metrics `onnx_max_abs_diff_years` and
    `openvino_max_abs_diff_years` and the tags `coinyear.runtime` (openvino, onnxruntime or pytorch: what serves)
    and `coinyear.onnx_check` (why); the MLmodel's metadata the same.
    """
    try:
        config = torch.load(checkpoint, map_location="cpu", weights_only=True)["config"]
    except Exception:  # noqa: BLE001 - torch.load raises anything on a bad file; such a model cannot serve
        # either, and listing timm is the safe side
        config = {"backbone": TIMM_BACKBONES[0]}
    backbone = config["backbone"]
    with tempfile.TemporaryDirectory(prefix="coinyear-onnx-") as folder:
        onnx_file, metadata, runtimes = _checked_onnx(checkpoint, example, folder) if onnx else (None, {}, ())
        if config.get("span"):  # what the model knows (years, portraits), readable without loading it
            metadata = {**metadata, "span": config["span"]}
        runtimes_file = Path(folder) / "runtimes.json"
        if onnx_file:
            runtimes_file.write_text(json.dumps(list(runtimes)))
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=CoinYearModel(),
            artifacts={CHECKPOINT: str(checkpoint), **(quality or {}),
                       **({ONNX: str(onnx_file), RUNTIMES: str(runtimes_file)} if onnx_file else {})},
            code_paths=[package_dir()],
            signature=SIGNATURE,
            input_example=example,
            registered_model_name=registered_model_name,
            pip_requirements=pip_requirements(backbone, torch_index, onnx=onnx_file is not None,
                                              runtimes=tuple(sorted(runtimes))),
            metadata=metadata or None,
        )


def _checked_onnx(checkpoint: Path, example: pd.DataFrame, folder: str) -> tuple[Path | None, dict, tuple[str, ...]]:
    """The ONNX graph if it matches PyTorch on the example's coin, what to record about the check, and the
    runtimes that matched (preferred first: openvino, onnxruntime)."""
    from coinyear.model import load_checkpoint
    from coinyear.runtime import export_checked

    openvino = None
    try:
        model = load_checkpoint(checkpoint)
        size, grayscale = model.config.image_size, model.config.grayscale
        front, back = decode_pair(decode_base64(example[FRONT].iloc[0], 0, FRONT),
                                  decode_base64(example[BACK].iloc[0], 0, BACK), size, grayscale, 0)
        path, check, reason, openvino = export_checked(model, *pair_tensors([(front, back)]), folder)
    except Exception as error:  # noqa: BLE001 - the model still logs and serves with PyTorch
        path, check, reason = None, None, f"not checked: {type(error).__name__}: {error}"
    runtimes = (*(("openvino",) if path and openvino is not None and openvino.passed else ()),
                *(("onnxruntime",) if path else ()))
    engine = runtimes[0] if runtimes else "pytorch"
    log.info("logged model scores with %s (ONNX %s)", engine, reason)
    metadata: dict[str, str | float] = {"runtime": engine, "onnx_check": reason}
    if mlflow.active_run():
        mlflow.set_tags({"coinyear.runtime": engine, "coinyear.onnx_check": reason[:5000]})
        if check is not None:
            mlflow.log_metric("onnx_max_abs_diff_years", check.max_abs_diff_years)
            metadata["onnx_max_abs_diff_years"] = check.max_abs_diff_years
        if openvino is not None:
            mlflow.log_metric("openvino_max_abs_diff_years", openvino.max_abs_diff_years)
            metadata["openvino_max_abs_diff_years"] = openvino.max_abs_diff_years
    return path, metadata, runtimes
