"""Distributed training stage: the one-process training run of `coinyear.train`, spread over N processes with
PyTorch DistributedDataParallel, launched by Spark's TorchDistributor (`coinyear train --distributed N`).

The loop is not forked: every rank runs `coinyear.experiment.train_on_manifest` inside a torch.distributed group,
whose `fit` shards the training rows (DistributedSampler), averages gradients (DDP) and combines the epoch
loss and the validation predictions over ranks. Rank 0 runs it through `run_training`, so it logs the same
MLflow run (params, per-epoch and validation metrics, plots, dataset) and logs and registers the same pyfunc
as a one-process run; the other ranks only train.

Images are not loaded into every worker's memory: the decoded tensors are written once to two `.npy` files on
the node's local disk (`COINYEAR_TENSOR_CACHE_DIR`) and memory-mapped, so a rank reads the rows of its shard.

Where it runs: locally (`local_mode=True`) the N processes are started by torchrun on this machine (gloo on
CPU, or nccl with one GPU each with `gpu`); on a Databricks GPU cluster (`cluster=True, gpu=True`) they are
Spark barrier tasks on the executors, one per GPU (`spark.task.resource.gpu.amount` = 1).

Credentials on a cluster: rank 0 logs the MLflow run from an executor, and an executor has none of the driver's
credentials (the driver's come from the notebook context, not from variables a task could copy). So `--cluster`
hands the ranks the workspace's host (the driver's, as databricks-sdk resolves it) and the OAuth secret of a
service principal, read on the driver from the secret scope `COINYEAR_WORKER_SECRET_SCOPE`, keys
`worker-client-id` and `worker-client-secret` (`w.secrets.get_secret`); the ranks authenticate as that service
principal (OAuth machine-to-machine), which needs CAN_EDIT on the experiment and CREATE_MODEL_VERSION on the
model. Without the scope `--cluster` refuses to start rather than train for hours and fail at the first log.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from coinyear.recipe import TrainConfig
from coinyear.train import RunOutcome

log = logging.getLogger(__name__)

# How MLflow reaches a Databricks workspace; the ranks get exactly the ones `worker_environment` hands them.
WORKSPACE_VARIABLES = ("DATABRICKS_HOST", "DATABRICKS_TOKEN", "DATABRICKS_CLIENT_ID", "DATABRICKS_CLIENT_SECRET")
WORKER_CLIENT_ID_KEY, WORKER_CLIENT_SECRET_KEY = "worker-client-id", "worker-client-secret"


def worker_environment(settings, cluster: bool) -> dict[str, str]:
    """The workspace credentials the ranks get. Locally: the launching process's own DATABRICKS_* variables
    (the ranks are its children anyway). On a cluster: the driver's host and the service principal's OAuth
    secret from `settings.worker_secret_scope` (see the module docstring); raises ValueError without the scope and
    the SDK's error when a key is missing or unreadable."""
    if not cluster:
        return {name: os.environ[name] for name in WORKSPACE_VARIABLES if name in os.environ}
    if not settings.worker_secret_scope:
        raise ValueError("--cluster: the ranks run on executors without the driver's credentials; set "
                         "COINYEAR_WORKER_SECRET_SCOPE to a secret scope with the keys "
                         f"{WORKER_CLIENT_ID_KEY} and {WORKER_CLIENT_SECRET_KEY} (a service principal's OAuth "
                         "secret) for MLflow")
    import base64

    from databricks.sdk import WorkspaceClient

    workspace = WorkspaceClient()  # the driver's own credentials (the notebook context on a cluster)

    def secret(key: str) -> str:
        value = workspace.secrets.get_secret(settings.worker_secret_scope, key).value or ""
        return base64.b64decode(value).decode()

    return {"DATABRICKS_HOST": workspace.config.host, "DATABRICKS_CLIENT_ID": secret(WORKER_CLIENT_ID_KEY),
            "DATABRICKS_CLIENT_SECRET": secret(WORKER_CLIENT_SECRET_KEY)}


@dataclass
class DistributedOutcome(RunOutcome):
    """A `RunOutcome` plus what each rank measured: peak resident memory (VmHWM, which counts the mapped
    tensor pages it read), private memory at the end (RssAnon), and the training rows it read in epoch 1."""

    processes: int = 1
    peak_rss_mb: list[float] = field(default_factory=list)
    anon_rss_mb: list[float] = field(default_factory=list)
    shards: list[list[int]] = field(default_factory=list)


def memory_mb() -> dict[str, float]:
    """This process's peak and current resident memory from /proc/self/status (Linux), in MiB."""
    values = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                    values[key] = int(rest.split()[0]) / 1024
    except OSError:
        pass
    return values


def train_worker(settings, config: TrainConfig, manifest, register: bool, run_name, tags, tensor_dir: str,
                 log_level: int = logging.WARNING, environment: dict | None = None) -> dict:
    """What each of the N processes runs (TorchDistributor pickles it and calls it in fresh interpreters).

    Imports inside: nothing of the launching process is there. Returns rank 0's outcome on every rank (the
    distributor keeps one rank's return value) with every rank's memory and epoch-1 shard added.
    """
    import logging
    import os

    import torch
    import torch.distributed as dist

    from coinyear.data import ImageCache, build_tensor_files
    from coinyear.distributed import memory_mb
    from coinyear.experiment import train_on_manifest
    from coinyear.train import run_training

    if environment:  # exactly the handed credentials: a stray token beside them would be a second auth method
        for name in WORKSPACE_VARIABLES:
            os.environ.pop(name, None)
        os.environ.update(environment)
    logging.basicConfig(level=log_level, format=f"%(asctime)s rank{os.environ.get('RANK', '?')} "
                                                "%(levelname)s %(name)s: %(message)s")
    gpu = config.device == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if gpu:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if gpu else "gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        # torchrun sets OMP_NUM_THREADS=1 per process; the node's cores are shared by the ranks on it instead.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
        # One process per node writes the node's tensor files (a no-op when the driver already did, locally).
        if local_rank == 0:
            build_tensor_files(manifest.rows, ImageCache(settings.cache_dir, config.model.image_size,
                                                         config.model.grayscale), tensor_dir)
        dist.barrier()
        trace: list = []
        outcome: dict | None = None
        if rank == 0:
            outcome = asdict(run_training(settings, config, manifest, register=register, run_name=run_name,
                                          tags=tags, tensor_dir=Path(tensor_dir), trace=trace))
        else:
            train_on_manifest(manifest, config, settings.cache_dir, tensor_dir=Path(tensor_dir), trace=trace)
        memory = memory_mb()
        reports: list = [None] * world  # (peak MiB, private MiB, rows read) of every rank once gathered
        dist.all_gather_object(reports, (memory.get("VmHWM", float("nan")), memory.get("RssAnon", float("nan")),
                                         trace[0] if trace else []))
        shared: list = [outcome]  # rank 0's outcome on every rank once broadcast
        dist.broadcast_object_list(shared, src=0)
        return {**shared[0], "processes": world, "peak_rss_mb": [r[0] for r in reports],
                "anon_rss_mb": [r[1] for r in reports], "shards": [r[2] for r in reports]}
    finally:
        dist.destroy_process_group()


def run_distributed_training(settings, config: TrainConfig, manifest, processes: int, gpu: bool = False,
                             cluster: bool = False, register: bool = True, run_name: str | None = None,
                             tags: dict | None = None) -> DistributedOutcome:
    """Train `config` on `manifest` with `processes` DDP ranks under TorchDistributor; rank 0 logs the MLflow
    run and registers the model exactly as `coinyear.train.run_training` does.

    `gpu`: one GPU per process and NCCL (else CPU and gloo). `cluster`: the processes are Spark tasks on the
    cluster's executors (`local_mode=False`) instead of processes on this machine. Needs a Spark session
    (`coinyear.spark.spark_session`: the cluster's on Databricks, local PySpark elsewhere).
    """
    from coinyear.config import ensure_experiment
    from coinyear.data import ImageCache, build_tensor_files
    from coinyear.spark import spark_session

    if processes < 1:
        raise ValueError(f"--distributed needs at least 1 process, not {processes}")
    if config.folds >= 2:
        raise ValueError("distributed training runs one grouped hold-out; K-fold (folds >= 2) runs in one "
                         "process: drop --folds or --distributed")
    if len(manifest.rows) < 4:
        raise ValueError(f"only {len(manifest.rows)} valid rows: too few to train")
    environment = worker_environment(settings, cluster)  # before anything starts: fails fast without credentials
    try:
        from pyspark.ml.torch.distributor import TorchDistributor
    except ImportError as error:
        raise RuntimeError("distributed training needs pyspark: pip install 'coinyear[spark]' (and Java 17)") from error
    # Created here with its artifact location under COINYEAR_HOME; the workers then find it by name.
    ensure_experiment(settings)
    # Workers are fresh processes (on a cluster, on other machines): give them absolute paths and the explicit
    # MLflow URIs rather than letting them re-read an environment that may differ.
    settings = settings.model_copy(update={
        "home": settings.home_dir, "data_dir": Path(settings.data_dir).resolve(),
        "tracking_uri": settings.mlflow_tracking_uri, "registry_uri": settings.mlflow_registry_uri})
    tensor_dir = settings.tensor_dir
    config = replace(config, device="cuda" if gpu else "cpu")
    if not cluster:  # build the tensor files once, before the workers start, with a progress bar
        build_tensor_files(manifest.rows, ImageCache(settings.cache_dir, config.model.image_size,
                                                     config.model.grayscale), tensor_dir, progress=True)
    spark_session()  # TorchDistributor works through the active session
    tags = {**(tags or {}), "distributed": f"{processes} processes, {'nccl' if gpu else 'gloo'}, "
                                           f"TorchDistributor local_mode={not cluster}"}
    distributor = TorchDistributor(num_processes=processes, local_mode=not cluster, use_gpu=gpu)
    output = distributor.run(train_worker, settings, config, manifest, register, run_name, tags, str(tensor_dir),
                             logging.getLogger().getEffectiveLevel(), environment)
    if not output:
        raise RuntimeError("TorchDistributor returned no result from rank 0")
    return DistributedOutcome(**output)
