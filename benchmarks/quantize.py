"""Reduced-precision variants of the served ONNX graph (issue 14): is any of them faster at the same years?

The model is the production model of a COINYEAR_HOME (what `make demo` registered: efficientnet_lite0, 128 px,
5-angle rotation TTA). Its scoring graph is exported exactly as logging a model does (`coinyear.runtime.export_onnx`)
and turned into:

  * `int8-static`: QDQ int8 (per-channel weights, activations calibrated with MinMax on training coins: coins of
    types the hold-out does not contain), `onnxruntime.quantization.quantize_static`, every op it can quantize;
  * `int8-static-conv`: the same, only the backbone's convolutions (heads stay float32);
  * `int8-static-dense-conv`: only the convolutions that are not depthwise;
  * `int8-dynamic`: `quantize_dynamic` (int8 weights, activations quantized per batch at run time);
  * `fp16`: every float32 tensor in float16 except the graph's inputs and outputs
    (`onnxruntime.transformers.float16`, keep_io_types), for the CPU's avx512_fp16;
  * `bf16`: tried the same way (ONNX Runtime's CPU provider may have no bfloat16 kernels: then it is reported as
    failing to load, with the error).

Each variant scores the grouped hold-out coins of the model's own training run (the split `coinyear train` and
`coinyear evaluate --holdout` use: same manifest, seed and fraction, read from the run's params). Reported per
variant: hold-out MAE (years from the label range midpoint), max and mean |year - fp32 graph's year|, max relative
difference of the OOD features, single-request latency (median) and batch-32 throughput, all with the same
ONNX Runtime thread count. The issue's rule: a variant is worth serving only if the years move by < 0.2 on
average and the hold-out MAE gets no worse than 0.2 years, and it is faster.

    .venv/bin/python benchmarks/quantize.py --home /tmp/q-home       # a copy of a `make demo` COINYEAR_HOME

Writes benchmarks/results/quantize.{json,md}. The machine may be shared: the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

# isort: split
# this folder's modules: a script's own folder is first on sys.path when it runs
from common import DATA_DIR, REPO, RESULTS, cpu_name, load_production, loadavg, median_ms, utc_minute, write_report


def production(home: Path):
    """The production pyfunc's python model, its version and the params of the run that trained it."""
    import mlflow

    model = load_production(home)
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("coinyear", "production")
    return model, version.version, client.get_run(version.run_id).data.params


def training_split(home: Path, data_dir: Path, params: dict):
    """(manifest rows, training row indices, hold-out row indices) as the training run split them: same manifest,
    seed, limit and validation fraction, read from the run's params; the hold-out is the test coin types."""
    from coinyear.config import Settings
    from coinyear.data import choice_splits, read_manifest

    settings = Settings(home=home)
    seed = int(params.get("seed", settings.seed))
    limit = None if params.get("limit") in (None, "None") else int(params["limit"])
    rows = read_manifest(data_dir, settings.min_year, settings.max_year, limit=limit, seed=seed).rows
    pairs, holdout = choice_splits(rows, 0, float(params.get("holdout_fraction", 0.15)), seed)
    return rows, pairs[0][0], holdout


def split_tensors(home: Path, data_dir: Path, params: dict, size: int, grayscale: bool, calibration: int,
                  split=None):
    """(hold-out fronts, backs, year_from, year_to), (calibration fronts, backs) as the training run split them;
    `split`: `training_split`'s answer when the caller already has it."""
    import torch

    from coinyear.config import Settings
    from coinyear.data import ImageCache, load_arrays

    rows, train, holdout = split or training_split(home, data_dir, params)
    seed = int(params.get("seed", Settings(home=home).seed))
    calib = np.random.default_rng(seed).choice(train, size=min(calibration, len(train)), replace=False)
    cache = ImageCache(home / "cache", size, grayscale)  # the training run's decoded photos, when still there

    def tensors(index):
        fronts, backs = load_arrays(rows.iloc[index], cache, progress=True)
        return torch.from_numpy(fronts).float() / 255, torch.from_numpy(backs).float() / 255

    held = rows.iloc[holdout]
    return (*tensors(holdout), held["year_from"].to_numpy(), held["year_to"].to_numpy()), tensors(np.sort(calib))


class Calibration:
    """`CalibrationDataReader` over calibration coins, in batches."""

    def __init__(self, fronts, backs, batch: int = 8):
        self.batches = iter([{"front": fronts[i:i + batch].numpy(), "back": backs[i:i + batch].numpy()}
                             for i in range(0, len(fronts), batch)])

    def get_next(self):
        return next(self.batches, None)


VARIANTS = ("fp32", "int8-static", "int8-static-conv", "int8-static-dense-conv", "int8-dynamic", "fp16", "bf16")


def make_variants(model, folder: Path, calib: tuple, wanted: list[str]) -> dict[str, Path | str]:
    """name -> ONNX file, or the error that stopped making it (fp32 always: the others are compared with it)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from coinyear.runtime import export_onnx

    fp32 = export_onnx(model, folder / "fp32.onnx")
    variants: dict[str, Path | str] = {"fp32": fp32}
    pre = folder / "fp32-pre.onnx"
    try:  # shape inference + folding, what ORT recommends before quantizing; its symbolic shape inference
        # asserts on this graph (the "same" padding computed from shapes), ONNX's own shape inference does not
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    except Exception as error:  # noqa: BLE001 - fall back to the plain export
        print(f"quant_pre_process failed ({error}); quantizing the plain export", flush=True)
        pre = fp32

    def attempt(name, make):
        if name not in wanted:
            return
        started = time.perf_counter()
        try:
            make(folder / f"{name}.onnx")
            variants[name] = folder / f"{name}.onnx"
        except Exception as error:  # noqa: BLE001 - report any failure as that variant's result
            variants[name] = f"{type(error).__name__}: {str(error)[:300]}"
        print(f"{name}: made in {time.perf_counter() - started:.1f} s: {variants[name]}", flush=True)

    attempt("int8-static", lambda out: quantize_static(
        str(pre), str(out), Calibration(*calib), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8))
    # the first try above quantizes every op, heads included: their outputs are years, and 256 levels over the
    # year range are several years apart. These quantize only the backbone's convolutions (fp32 heads), and then
    # only the dense ones (depthwise convolutions are the classic int8 casualty of EfficientNet-style networks).
    convs = [node for node in onnx.load(str(pre)).graph.node if node.op_type == "Conv"]
    dense = [node.name for node in convs if next((a.i for a in node.attribute if a.name == "group"), 1) == 1]
    for name, nodes in (("int8-static-conv", [node.name for node in convs]), ("int8-static-dense-conv", dense)):
        attempt(name, lambda out, nodes=nodes: quantize_static(
            str(pre), str(out), Calibration(*calib), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_quantize=nodes))
    attempt("int8-dynamic", lambda out: quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8))

    attempt("fp16", lambda out: onnx.save(convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True),
                                          str(out)))
    attempt("bf16", _bf16_probe)
    return variants


def _bf16_probe(out: Path) -> None:
    """A bfloat16 graph is only worth building if ORT's CPU provider can run a bfloat16 convolution at all: this
    one-Conv graph raises (no kernel) when it cannot, which is the bf16 variant's reported result."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.BFLOAT16, [4, 3, 3, 3], [16256] * 108)  # 1.0 in bfloat16 bits
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "bf16-conv",
                              [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, None)], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(out))
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    raise RuntimeError("ORT runs a bfloat16 Conv on this CPU: a full bf16 graph is not built by this script yet")


def score(scorer, fronts, backs, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Years and OOD features of every coin."""
    parts = [scorer.infer(fronts[i:i + batch], backs[i:i + batch], True) for i in range(0, len(fronts), batch)]
    return (np.concatenate([p["year"].numpy() for p in parts]), np.concatenate([p["features"].numpy() for p in parts]))


def timing(scorer, fronts, backs, repeats: int) -> dict[str, float]:
    """Median single-coin latency and batch-32 coins/s (median of repeats)."""
    out = {}
    for batch in (1, 32):
        out[f"ms_batch{batch}"] = median_ms(partial(scorer.infer, fronts[:batch], backs[:batch], True),
                                            repeats if batch == 1 else max(3, repeats // 8))
    out["coins_per_s_batch32"] = 32 / (out["ms_batch32"] / 1000)
    return out


def markdown(report: dict) -> str:
    lines = [f"{report['date']}, {report['machine']}, onnxruntime {report['onnxruntime']}, ORT threads "
             f"{report['threads']}. Model: coinyear version {report['version']} of {report['home']} "
             f"({report['backbone']}, {report['image_size']} px, TTA angles {report['tta']}); grouped hold-out "
             f"{report['holdout_coins']} coins, int8 calibration on {report['calibration_coins']} training coins. "
             f"Load average (1/5/15 min) {report['loadavg_start']} at the start, {report['loadavg_end']} at the end.",
             "", "| variant | hold-out MAE | max abs year diff vs fp32 | mean abs year diff vs fp32 | max rel feature "
             "diff | ms, 1 coin | coins/s, batch 32 | speed-up b=1 | speed-up b=32 | passes the 0.2-year rule |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, row in report["variants"].items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error'][:160]} |||||||||")
            continue
        lines.append(f"| {name} | {row['holdout_mae']:.3f} | {row['max_abs_diff_years']:.3g} | "
                     f"{row['mean_abs_diff_years']:.3g} | {row['max_rel_diff_features']:.3g} | "
                     f"{row['ms_batch1']:.1f} | {row['coins_per_s_batch32']:.1f} | {row['speedup_batch1']:.2f}x | "
                     f"{row['speedup_batch32']:.2f}x | "
                     f"{'yes' if row['passes'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("COINYEAR_HOME", REPO / ".coinyear")))
    parser.add_argument("--data", type=Path, default=DATA_DIR)
    parser.add_argument("--calibration", type=int, default=64, help="training coins that calibrate int8")
    parser.add_argument("--holdout", type=int, default=0, help="score only the first N hold-out coins (0: all)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=24, help="timed single-coin runs per variant")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="quantize")
    args = parser.parse_args()

    import logging
    import platform
    from importlib.metadata import version as package_version

    import onnxruntime
    import torch

    from coinyear.config import Settings, set_torch_threads
    from coinyear.evaluate import regression_metrics
    from coinyear.runtime import OnnxScorer

    onnxruntime.set_default_logger_severity(3)  # ORT's per-initializer clean-up notices drown the results
    logging.getLogger().setLevel(logging.ERROR)  # and so do the quantizer's shape-inference warnings
    set_torch_threads(Settings(home=args.home))
    started_load = loadavg()
    model, version, params = production(args.home)
    config = model.model.config
    (fronts, backs, year_from, year_to), calib = split_tensors(args.home, args.data, params, config.image_size,
                                                               config.grayscale, args.calibration)
    if args.holdout:
        fronts, backs, year_from, year_to = (x[:args.holdout] for x in (fronts, backs, year_from, year_to))
    print(f"hold-out {len(fronts)} coins, calibration {len(calib[0])} coins; load {loadavg()}", flush=True)
    report = {"date": utc_minute(), "home": str(args.home), "version": version,
              "machine": f"{cpu_name()}, {os.cpu_count()} cores", "python": platform.python_version(),
              "onnxruntime": package_version("onnxruntime"), "threads": torch.get_num_threads(),
              "backbone": config.backbone, "image_size": config.image_size, "tta": params.get("tta_angles", "-"),
              "holdout_coins": len(fronts), "calibration_coins": len(calib[0]), "loadavg_start": started_load,
              "variants": {}}
    with tempfile.TemporaryDirectory(prefix="coinyear-quantize-") as folder:
        variants = make_variants(model.model, Path(folder), calib, args.variants)
        base_years = base_features = base = None
        for name, path in variants.items():
            if isinstance(path, str):
                report["variants"][name] = {"error": path}
                continue
            try:
                scorer = OnnxScorer(path)
                years, features = score(scorer, fronts, backs)
            except Exception as error:  # noqa: BLE001 - a graph ORT cannot load or run is that variant's result
                report["variants"][name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
                print(f"{name}: {report['variants'][name]['error']}", flush=True)
                continue
            if base_years is None:
                base_years, base_features = years, features
            scale = float(np.abs(base_features).max()) or 1.0
            row = {"holdout_mae": regression_metrics(years, year_from, year_to)["mae"],
                   "max_abs_diff_years": float(np.abs(years - base_years).max()),
                   "mean_abs_diff_years": float(np.abs(years - base_years).mean()),
                   "max_rel_diff_features": float(np.abs(features - base_features).max()) / scale,
                   "file_mb": Path(path).stat().st_size / 2**20, **timing(scorer, fronts, backs, args.repeats),
                   "loadavg": loadavg()}
            base = base or row
            row["speedup_batch1"] = base["ms_batch1"] / row["ms_batch1"]
            row["speedup_batch32"] = row["coins_per_s_batch32"] / base["coins_per_s_batch32"]
            row["passes"] = bool(row["mean_abs_diff_years"] < 0.2 and row["holdout_mae"] <= base["holdout_mae"] + 0.2)
            report["variants"][name] = row
            print(f"{name}: {json.dumps(row)}", flush=True)
    report["loadavg_end"] = loadavg()
    write_report(args.out, args.name, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
