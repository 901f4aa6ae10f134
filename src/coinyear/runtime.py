"""Runtime stage: the served network as one ONNX graph, run with OpenVINO or ONNX Runtime, else PyTorch.

The graph holds everything one request costs: every rotation of both photos (the fixed sampling grid of
`CoinEnsemble.rotated`), every member, and member 0's out-of-distribution features from the unrotated pass. Its
inputs are the photos as the PyTorch model takes them (float [B, C, H, W] in [0, 1], any B); its outputs are
`samples` [B, members, angles] (years), `features` [B, 2*D], `embedding` [B, E] (member 0's fused embedding)
and, for a model with a named portrait head, `portraits` [B, classes] and `disagreement` [B] (graphs exported
before have no `embedding`, older ones no `disagreement`), from which `OnnxScorer.infer` gives exactly what
`coinyear.model.infer` gives.

Two runtimes read that file: OpenVINO (`OpenVinoScorer`, preferred: on this project's 2-core Xeon it answers a
one-coin request in 20 ms against ONNX Runtime's 34 ms, the same years to 1e-4; benchmarks/README.md "Serving")
and ONNX Runtime (`OnnxScorer`). `open_scorer` takes the first that imports.

`export_checked` is what logging a model calls: export, then score the same coins with PyTorch and each runtime;
the ONNX file is only attached when ONNX Runtime agrees within `TOLERANCE_YEARS`, and OpenVINO is only named in
the model's requirements when it agrees too. Serving imports only `openvino` or `onnxruntime`, numpy and torch
from here (`onnx`/`onnxscript`, which the exporter needs, stay lazy).

Where no graph or runtime is there, PyTorch scores (`torch_infer`). It and training's scoring of image arrays
run one batched loop (`scored_batches`), channels-last on a CPU and under `reused_memory`: glibc keeps the freed
activations for the next batch instead of mapping them afresh.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from coinyear.model import CoinEnsemble, DualImageRegressor, as_ensemble, infer, rotation_spread, view_disagreement

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
# Years the ONNX answer may differ from PyTorch's on the check coins (float32 reorderings give ~1e-4).
TOLERANCE_YEARS = 0.05
# OOD features are compared relative to their size: the OOD score is a distance between such vectors.
TOLERANCE_FEATURES = 1e-3
# Portrait probabilities (a softmax of the same features) may differ by as little.
TOLERANCE_PORTRAITS = 1e-3


class ScoringGraph(nn.Module):
    """What is exported: photos in, (years per member and rotation, OOD features, fused embedding[, portrait
    probabilities, view disagreement]) out. Scorers read the outputs by name: a graph exported before the
    embedding was an output still scores (without the era-shift score)."""

    def __init__(self, model: DualImageRegressor | CoinEnsemble):
        super().__init__()
        self.ensemble = as_ensemble(model)

    @property
    def output_names(self) -> list[str]:
        return ["samples", "features", "embedding",
                *(["portraits", "disagreement"] if self.ensemble.has_portraits else [])]

    def forward(self, front: torch.Tensor, back: torch.Tensor) -> tuple[torch.Tensor, ...]:
        regression, logits, features, embedding = self.ensemble.heads(front, back, with_features=True)
        samples, features, portraits = self.ensemble.served(regression, logits, features, with_features=True)
        assert features is not None and embedding is not None, "heads() gives both when asked for features"
        if portraits is None or logits is None:
            return samples, features, embedding
        return samples, features, embedding, portraits, view_disagreement(logits, self.ensemble.config)


def export_onnx(model: DualImageRegressor | CoinEnsemble, path: str | Path) -> Path:
    """Write the model's scoring graph to `path` (dynamic batch size; image size fixed by the model).

    torch's TorchScript-based exporter (`dynamo=False`), not the default torch.export one: on this model it takes
    ~5 s against ~25 s, keeps the batch axis dynamic where torch.export specialised it to the example's size,
    and needs only the `onnx` package.
    """
    import warnings

    config = model.config
    channels = 1 if config.grayscale else 3
    example = tuple(torch.rand(2, channels, config.image_size, config.image_size) for _ in range(2))
    graph = ScoringGraph(model).eval()
    outputs = graph.output_names
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice and tracer warnings on shape asserts
        torch.onnx.export(graph, example, str(path), dynamo=False, opset_version=17,
                          input_names=["front", "back"], output_names=outputs,
                          dynamic_axes={name: {0: "batch"} for name in ("front", "back", *outputs)})
    return Path(path)


class OnnxScorer:
    """An ONNX Runtime session over an exported scoring graph; `infer` answers like `coinyear.model.infer`."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # torch's thread count is what the server configured for scoring; ORT's default ignores it
        options.intra_op_num_threads = threads or torch.get_num_threads()
        # spinning idle threads would take the cores from the server's other threads (decoding, logging)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.names = [output.name for output in self.session.get_outputs()]

    def infer(self, front: torch.Tensor, back: torch.Tensor, with_features: bool = False) -> dict[str, torch.Tensor]:
        outputs = self.session.run(None, {"front": _array(front), "back": _array(back)})
        return _answer(dict(zip(self.names, outputs)), with_features)


class OpenVinoScorer:
    """The same graph compiled by OpenVINO for this CPU (float32, latency hint); `infer` as `OnnxScorer.infer`.

    An infer request is not thread-safe, so each thread gets its own (the gateway's batch workers call in
    parallel); they share one compiled model."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import threading

        import openvino as ov

        self.compiled = ov.Core().compile_model(str(path), "CPU", {
            "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
            "INFERENCE_PRECISION_HINT": "f32"})  # bf16 on an avx512_bf16 CPU moved years by up to 0.22
        self.local = threading.local()
        self.names = set().union(*(output.get_names() for output in self.compiled.outputs))

    def infer(self, front: torch.Tensor, back: torch.Tensor, with_features: bool = False) -> dict[str, torch.Tensor]:
        request = getattr(self.local, "request", None)
        if request is None:
            request = self.local.request = self.compiled.create_infer_request()
        results = request.infer({"front": _array(front), "back": _array(back)})
        return _answer({name: np.array(results[name]) for name in self.names}, with_features)


Scorer = OpenVinoScorer | OnnxScorer
RUNTIMES: dict[str, type[Scorer]] = {"openvino": OpenVinoScorer, "onnxruntime": OnnxScorer}


def open_scorer(path: str | Path, threads: int | None = None,
                engines: tuple[str, ...] = tuple(RUNTIMES)) -> tuple[Scorer, str]:
    """(scorer, engine name) of the first of `engines` that imports and loads the graph; the last error when
    none does."""
    error: Exception | None = None
    for engine in engines:
        try:
            return RUNTIMES[engine](path, threads), engine
        except Exception as failure:  # noqa: BLE001 - a missing or broken runtime: try the next
            log.info("cannot run the ONNX graph with %s (%s: %s)", engine, type(failure).__name__, failure)
            error = failure
    raise error if error is not None else ValueError("no runtime named")


# the graph's outputs (by name) that `coinyear.model.infer` answers as they are, when asked for features
FEATURE_OUTPUTS = ("features", "embedding", "portraits", "disagreement")


def _answer(outputs: dict[str, np.ndarray], with_features: bool) -> dict[str, torch.Tensor]:
    """The graph's named outputs as `coinyear.model.infer` answers: mean year and rotation spread per coin (and
    the OOD features, fused embedding, portrait probabilities and view disagreement that the graph has, when
    asked)."""
    years = torch.from_numpy(outputs["samples"])
    out = {"year": years.mean(dim=(1, 2)), "spread": rotation_spread(years)}
    if with_features:
        out.update({name: torch.from_numpy(outputs[name]) for name in FEATURE_OUTPUTS if name in outputs})
    return out


def _array(images: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)


@dataclass
class Check:
    """How the ONNX graph compared with PyTorch on the check coins."""

    max_abs_diff_years: float
    max_rel_diff_features: float
    rows: int
    max_abs_diff_portraits: float = 0.0  # probabilities; 0 for a model without a named portrait head

    @property
    def passed(self) -> bool:
        return (self.max_abs_diff_years <= TOLERANCE_YEARS and self.max_rel_diff_features <= TOLERANCE_FEATURES
                and self.max_abs_diff_portraits <= TOLERANCE_PORTRAITS)


def compare(ours: dict[str, torch.Tensor], scorer: Scorer, front: torch.Tensor, back: torch.Tensor) -> Check:
    """`scorer` against PyTorch's answer `ours` (`infer(model, front, back, True)`) on the same photos: the
    largest year (and spread) difference, feature (and embedding) difference and portrait probability (and view
    disagreement) difference (infinite when the graph lacks an output PyTorch gives)."""
    theirs = scorer.infer(front, back, True)
    years = max(float((ours[key] - theirs[key]).abs().max()) for key in ("year", "spread"))
    features = 0.0
    for key in ("features", "embedding"):  # distances between such vectors are compared: relative to their size
        if key in ours:
            scale = float(ours[key].abs().max()) or 1.0
            features = max(features, float((ours[key] - theirs[key]).abs().max()) / scale if key in theirs
                           else float("inf"))
    portraits = 0.0
    for key in ("portraits", "disagreement"):  # both probabilities' scale (nats of a few classes' mixture)
        if key in ours:
            portraits = max(portraits, float((ours[key] - theirs[key]).abs().max()) if key in theirs
                            else float("inf"))
    return Check(years, features, len(front), portraits)


def check_batch(front: torch.Tensor, back: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Several different coins from one pair (as given, sides swapped, turned a quarter): the check also runs a
    batch larger than one through the graph's dynamic batch axis."""
    return (torch.cat([front, back, front.rot90(1, (-2, -1))]), torch.cat([back, front, back.rot90(1, (-2, -1))]))


def export_checked(model: DualImageRegressor | CoinEnsemble, front: torch.Tensor, back: torch.Tensor,
                   folder: str | Path) -> tuple[Path | None, Check | None, str, Check | None]:
    """Export to `folder`/model.onnx and compare with PyTorch on `check_batch(front, back)`, run by ONNX Runtime
    and then by OpenVINO (when it imports).

    Returns (the ONNX file, or None when it must not be used; ONNX Runtime's comparison, or None when there was
    none; a one-line reason; OpenVINO's comparison, or None when it did not run). Never raises for a model that
    cannot be exported: serving then uses PyTorch.
    """
    path = Path(folder) / ONNX_FILE
    batch = check_batch(front, back)
    try:
        export_onnx(model, path)
        ours = infer(model, *batch, True)  # PyTorch's answer, once for both runtimes
        check = compare(ours, OnnxScorer(path), *batch)
    except Exception as error:  # noqa: BLE001 - the exporter and ORT raise many types; PyTorch still serves
        log.warning("ONNX export failed, the model will be served with PyTorch: %s", error)
        return None, None, f"export failed: {type(error).__name__}: {str(error)[:200]}", None
    if not check.passed:
        log.warning("ONNX differs from PyTorch by %.4g years / %.3g relative features / %.3g portrait "
                    "probability: not attached", check.max_abs_diff_years, check.max_rel_diff_features,
                    check.max_abs_diff_portraits)
        return None, check, (f"differs from PyTorch by {check.max_abs_diff_years:.4g} years, "
                             f"{check.max_rel_diff_features:.3g} relative on features, "
                             f"{check.max_abs_diff_portraits:.3g} in portrait probability"), None
    try:
        openvino: Check | None = compare(ours, OpenVinoScorer(path), *batch)
    except Exception as error:  # noqa: BLE001 - no OpenVINO here: ONNX Runtime serves the graph
        log.info("OpenVINO not checked (%s: %s)", type(error).__name__, error)
        openvino = None
    reason = f"matches PyTorch within {check.max_abs_diff_years:.2g} years on {check.rows} coins"
    if openvino is not None:
        reason += (f"; OpenVINO {'within' if openvino.passed else 'differs by'} "
                   f"{openvino.max_abs_diff_years:.2g} years")
    return path, check, reason, openvino


# glibc mallopt parameters (malloc.h); a trim threshold of -1 turns trimming off
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_NO_TRIM = -1
_reuse_lock = threading.Lock()
_reuse_depth = 0  # reused_memory blocks open now (the outermost one changes glibc and restores it)
_reuse_libc: ctypes.CDLL | None = None  # the libc whose settings the outermost block changed


@contextlib.contextmanager
def reused_memory():
    """Keep freed memory in the process while training or scoring arrays on a CPU, then hand it back.

    glibc serves every allocation above a few MB (the activations of a batch) with a fresh mmap and returns
    it on free, so each batch page-faults its whole working set in again: measured on 2 cores, 770k minor
    faults and 14% of the CPU time in the kernel per efficientnet_lite0 step. With mmap off and no trimming,
    the heap keeps those pages and the next batch reuses them (no faults). Trimming is off altogether, not
    above a threshold: at 192 px a scoring batch frees more than 1 GB at once, and a 1 GB threshold gave it
    back and faulted it in again every batch (benchmarks/score_memory.py). Blocks may nest (the epoch loop
    scores its validation coins with `infer_arrays`): the outermost one restores glibc. Elsewhere than glibc:
    nothing."""
    global _reuse_depth, _reuse_libc
    with _reuse_lock:
        _reuse_depth += 1
        if _reuse_depth == 1:
            try:
                libc = ctypes.CDLL("libc.so.6")
                if libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _NO_TRIM) == 1:
                    _reuse_libc = libc
            except (OSError, AttributeError):
                pass
    try:
        yield
    finally:
        with _reuse_lock:
            _reuse_depth -= 1
            if _reuse_depth == 0 and _reuse_libc is not None:  # glibc's defaults, and the kept memory back
                _reuse_libc.mallopt(_M_MMAP_MAX, 65536)
                _reuse_libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
                _reuse_libc.malloc_trim(0)
                _reuse_libc = None


# The PyTorch fallback's batch, in coins: 16 (160 photos with the 5-angle TTA) reuse the kept heap; 64 fault
# again and peak at 11 GB at 192 px (benchmarks/score_memory.py)
TORCH_BATCH = 16


def scored_batches(model: DualImageRegressor | CoinEnsemble, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                   with_features: bool = False, with_heads: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """`coinyear.model.infer` on each (front, back) batch, as scoring on a CPU should be: channels-last (the
    trainer's layout, about 1.7x faster convolutions on a CPU), every batch inside one `reused_memory` block
    (without it glibc maps and unmaps every batch's activations: 16 coins at 192 px took 7.7 s; benchmarks/README.md
    "Serving speed"). On another device, `infer` as it is. The one batched scoring loop: the served fallback
    (`torch_infer`) and training's scoring of image arrays (`fit.infer_arrays`) both run it. The model is left
    channels-last on a CPU."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    layout = torch.channels_last if on_cpu else torch.preserve_format
    model.eval().to(memory_format=layout)
    with reused_memory() if on_cpu else contextlib.nullcontext():
        for front, back in batches:
            yield infer(model, front.contiguous(memory_format=layout), back.contiguous(memory_format=layout),
                        with_features, with_heads)


def torch_infer(model: DualImageRegressor | CoinEnsemble, front: torch.Tensor, back: torch.Tensor,
                with_features: bool = False, batch_size: int = TORCH_BATCH) -> dict[str, torch.Tensor]:
    """What a model served without an ONNX graph scores with: `scored_batches` over batches of at most
    `batch_size` and `TORCH_BATCH` coins, concatenated."""
    size = max(min(batch_size, TORCH_BATCH), 1)
    parts = list(scored_batches(model, ((front[start:start + size], back[start:start + size])
                                        for start in range(0, len(front), size)), with_features))
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
