"""One typed settings object for every stage: read from COINYEAR_* environment variables, local defaults.

The embedded default keeps all state under COINYEAR_HOME (MLflow SQLite store and artifacts, Delta tables,
caches). Setting MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI (e.g. `databricks`, `databricks-uc`) points the
same code at a Databricks workspace.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, AliasChoices, Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from coinyear.reference import SOURCE_URL, resolve_data_dir
from coinyear.years import MAX_YEAR, MIN_YEAR

Loss = Literal["interval", "mse"]  # interval: zero inside the catalogue's date range; mse: to its midpoint
LOSSES: tuple[str, ...] = get_args(Loss)
# Catalogue columns an auxiliary head can learn; "portrait" is derived from obverse_desc (coinyear.rulers).
AuxHead = Literal["mint", "denomination", "portrait"]
AUX_COLUMNS: tuple[str, ...] = get_args(AuxHead)


def _no_single_fold(folds: int) -> int:
    if folds == 1:
        raise ValueError("folds must be 0 (one grouped hold-out) or at least 2")
    return folds


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COINYEAR_", extra="ignore", populate_by_name=True)

    home: Path = Field(default=Path(".coinyear"), description="State folder: MLflow store, lake, caches.")
    # None resolves (see _resolve_data_dir): the field is always a Path once the settings are built
    data_dir: Path = Field(default=None, validate_default=True, description="Reference dataset (manifest.csv); "
                           "default ../shared/data/ocre when it exists, else HOME/data/ocre (`coinyear data fetch`).")
    data_source: str = Field(default=SOURCE_URL, description="Where `coinyear data fetch` gets the reference photos "
                             "when no copy is found: the pinned upstream archive, or a mirror's URL, a local "
                             ".tar.gz, a local folder holding images/.")
    model_name: str = "coinyear"
    experiment_name: str = "coinyear"
    tracking_uri: str | None = Field(
        default=None, validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "COINYEAR_TRACKING_URI")
    )
    registry_uri: str | None = Field(
        default=None, validation_alias=AliasChoices("MLFLOW_REGISTRY_URI", "COINYEAR_REGISTRY_URI")
    )
    lake_uri: str | None = Field(default=None, description="Root of the Delta tables; default HOME/lake.")
    lake_backend: Literal["delta", "spark", "warehouse"] = Field(
        default="delta", description="delta: delta-rs tables under the lake root; spark: tables written through "
                                     "Spark (Unity Catalog tables on Databricks); warehouse: those tables read "
                                     "through a SQL warehouse, read-only (the UI as a Databricks App).")
    lake_schema: str | None = Field(default=None, description="`catalog.schema` of the tables when the lake "
                                                              "backend is spark or warehouse.")
    sql_warehouse_id: str | None = Field(default=None, description="The SQL warehouse the warehouse lake reads "
                                                                   "through (the UI app's sql_warehouse resource).")

    # The training recipe: what `coinyear train`, `make demo` and the retraining job use when no flag says
    # otherwise. These are its only defaults (TrainConfig takes them from here) and its only rules: the recipe
    # builder checks a flag against the setting's constraints (coinyear.recipe).
    backbone: str = "efficientnet_lite0"
    mode: Literal["shared", "dual"] = "shared"
    image_size: int = Field(default=192, ge=32, description="Photos are scaled to this square size (the ~120 px "
                            "reference photos are upsampled): 192 dates the test coin types 1.5 years better than "
                            "128 (benchmarks/README.md, Model quality) at about 2x the training and scoring time.")
    early_scale: float = Field(default=1.0, gt=0, le=1, description="Progressive resizing: the epochs before the "
                               "last full_size_epochs see the photos at this share of image_size (cheaper steps); "
                               "1 = image_size throughout.")
    full_size_epochs: int = Field(default=2, ge=1, description="The last epochs, trained at image_size (the size "
                                  "served) when early_scale is below 1.")
    frozen_blocks: int = Field(default=3, ge=0, description="The backbone's stem and this many first stages stay "
                               "as pretrained (no gradient, BatchNorm statistics kept): a cheaper step, since the "
                               "early stages see the most pixels (3: epochs of 76-80 instead of 113-126 s at 192 "
                               "px, dating as well over two seeds; benchmarks/README.md); 0 = every weight is "
                               "trained.")
    ema_decay: float = Field(default=0.0, ge=0, lt=1, description="Validate and keep an exponential moving average "
                             "of the weights, updated every step with this decay (0 = the weights as trained).")
    grayscale: bool = False
    proj_dim: int = Field(default=256, ge=0, description="Projection after fusion (0 = none).")
    epochs: int = Field(default=6, ge=1)
    folds: Annotated[int, AfterValidator(_no_single_fold)] = Field(
        default=0, ge=0, description="K of grouped K-fold (0 = one grouped hold-out).")
    batch_size: int = Field(default=4, ge=1, description="Coins per training step (split over the ranks of a "
                            "distributed run). A smaller batch takes more steps for about the same time per epoch "
                            "on a CPU: over two seeds, validation MAE 8.91 at 4, 9.74 at 8, 10.02 at 16, 10.16 at "
                            "32 (benchmarks/README.md, The batch size).")
    lr: float = Field(default=1e-3, gt=0, allow_inf_nan=False)
    loss: Loss = "interval"
    seed: int = 42
    pretrained: bool = Field(default=True, description="Start from ImageNet weights (when on disk).")
    horizontal_flip: bool = Field(default=False, description="Flip augmentation (mirrors legends: off).")
    tta: bool = Field(default=True, description="Serve the mean over 5 rotations (off: one pass per coin).")
    ensemble: bool = Field(default=False, description="With folds >= 2: serve the K fold models averaged.")
    aux_weight: float = Field(default=1.0, ge=0, allow_inf_nan=False,
                              description="Weight of the auxiliary heads' loss (0 = none). 1 names the portrait "
                              "of unseen coin types right 8 points more often than 0.3 and dates them 0.9 years "
                              "better, over two seeds (benchmarks/README.md, The portrait head's weight).")
    ruler_statistic: Literal["mean", "median"] = Field(
        default="median", description="The ruler mixture's year the served year blends in: its weighted median "
        "(benchmarks/ruler_median.py: 12.97 vs 13.24 years on the demo model's test types) or its mean.")
    portrait_input: Literal["fused", "obverse"] = Field(
        default="obverse", description="What the portrait head reads: the obverse's pooled backbone features alone "
        "(the portrait is on the obverse, and an unseen coin type's reverse is new), or both sides' fused "
        "embedding. Obverse: portrait top-1 on the validation types 75.4% / 59.7% against 71.6% / 59.7% over two "
        "seeds, validation MAE 9.24 / 8.91 against 9.26 / 8.75 (benchmarks/README.md, What the portrait head "
        "reads).")
    ruler_blend: Annotated[float, Field(ge=0, le=1)] | Literal["fit"] = Field(
        default=0.5, description="The ruler mixture's weight in the served year (served year = (1 - w) x the "
        "regression head's + w x the ruler mixture's), or `fit`: the weight with the lowest MAE on the validation "
        "coins of the run. 0.5: the lowest validation MAE over three seeds' validation types pooled, where each "
        "run's own 65 or so validation types chose weights from 0 to 0.9 and cost up to 0.96 years on the test "
        "types (benchmarks/README.md, The ruler blend's weight). `make train-best` fits it on its 5 folds.")
    reshoot: float = Field(default=0.5, ge=0, le=1, description="Share of training photos re-shot as a collector "
                           "would take them: smaller, on another background, other light, softer focus (0 = none).")
    aux_heads: Annotated[list[AuxHead], NoDecode] = Field(
        default_factory=lambda: list[AuxHead](["portrait"]), description="Catalogue columns the auxiliary heads learn, "
        "comma-separated in COINYEAR_AUX_HEADS: portrait (read from obverse_desc), mint, denomination.")
    num_threads: int = 0
    model_torch_index: str | None = Field(default=None, description="PyTorch wheel index a logged model's "
                                          "requirements name (e.g. https://download.pytorch.org/whl/cpu for a "
                                          "CPU-only serving environment); none: torch from PyPI.")
    worker_secret_scope: str | None = Field(
        default=None, description="Secret scope holding the OAuth secret of the service principal that the ranks "
                                  "of `coinyear train --distributed N --cluster` log to MLflow as (keys "
                                  "`worker-client-id`, `worker-client-secret`; coinyear.distributed): the "
                                  "executors have none of the driver's credentials.")
    tensor_cache_dir: Path | None = Field(
        default=None, description="Local-disk folder of the memory-mapped training tensors (distributed "
                                  "training); default HOME/cache/tensors.")

    # Serving
    host: str = "127.0.0.1"
    port: int = 8080
    # tokens are SecretStr: a settings object in a log line, a traceback or a repr shows '**********'
    api_tokens: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Accepted bearer tokens, comma-separated in COINYEAR_API_TOKENS; an "
                                          "entry `name:token` records its callers as `name` (coinyear.serve.auth).")
    auth_disabled: bool = False
    apps_proxy: bool = Field(default=False, description="Behind the Databricks Apps proxy (a Databricks App): "
                             "who calls is the identity the proxy forwards (X-Forwarded-Email), the routes are "
                             "also under /api/ (the only ones the proxy passes a token to) and COINYEAR_API_TOKENS "
                             "is not used (coinyear.serve.auth). Only where nothing but the proxy reaches the app.")
    endpoint_name: str | None = Field(default=None, description="{name} in /serving-endpoints/{name}/...; "
                                                                "default: model_name.")
    max_body_bytes: int = 16 * 1024 * 1024
    max_rows: int = 64
    # Admission control (coinyear.serve.admission): a request holds its body 3-4 times over while it is handled
    max_inflight_requests: int = Field(default=64, ge=1, description="Scoring and feedback requests handled at "
                                       "once; more are answered 429 REQUEST_LIMIT_EXCEEDED with Retry-After.")
    max_inflight_bytes: int = Field(default=128 * 1024 * 1024, ge=1, description="Body bytes of the requests "
                                    "handled at once (declared Content-Length, else max_body_bytes); a request "
                                    "that does not fit is answered 429. At least max_body_bytes.")
    alias_poll_seconds: float = 5.0
    batch_max_size: int = 32
    batch_max_wait_ms: float = 5.0
    batch_workers: int = Field(default=2, ge=1, description="Scoring passes that may run at once (threads).")
    request_timeout_seconds: float = Field(default=30.0, gt=0, description="Deadline of one scoring request: "
                                           "past it the client gets a 504 DEADLINE_EXCEEDED.")
    inference_log: bool = Field(default=True, description="Append every request to the inference_log table.")
    log_flush_seconds: float = Field(default=1.0, description="How often the spool is committed to Delta.")
    spool_max_commit_bytes: int = Field(default=64 * 1024 * 1024, gt=0, description="Most spooled bytes in one "
                                        "Delta commit (rows carry photos: a row count bounds nothing).")

    serving_backend: Literal["local", "databricks"] = Field(
        default="local", description="local: the gateway scores with the pyfunc; databricks: it forwards scoring "
                                     "to the Model Serving endpoint and still logs and takes feedback.")
    payload_table: str | None = Field(default=None, description="The endpoint's AI Gateway inference table "
                                                                "(`catalog.schema.table`).")
    loop_volume: str | None = Field(default=None, description="Unity Catalog volume (`/Volumes/<catalog>/<schema>/"
                                    "<volume>`) where the gateway with the databricks backend stores feedback files "
                                    "and the photos of requests too large for the payload table; read by "
                                    "`coinyear ingest-payloads`.")

    rollback_job_id: int | None = Field(default=None, description="As a Databricks App, the UI's Models page "
                                        "starts this job (the bundle's rollback job) instead of moving the alias "
                                        "itself (coinyear.ui.jobs).")

    # Deployment: what `coinyear deploy` makes serve the production alias
    deploy_target: Literal["local", "databricks"] = "local"
    deploy_workload_size: str = Field(default="Small", description="Model Serving workload size of a served "
                                                                   "version (Small, Medium, Large).")
    deploy_scale_to_zero: bool = Field(default=False, description="Let the endpoint scale to zero (off: "
                                                                  "production must not cold-start).")
    deploy_canary_percent: int = Field(default=10, ge=1, le=99, description="Traffic share of a new version "
                                                                            "while it is watched.")
    deploy_watch_seconds: float = Field(default=60.0, ge=0, description="How long a canary is watched "
                                                                        "before it takes all traffic.")
    deploy_timeout_seconds: float = Field(
        default=3600.0, gt=0, description="Longest wait for one endpoint update to finish; past it the update is "
        "still running, not failed (Model Serving gives a CPU deployment up to 30 minutes after its container "
        "build, which has no limit and is retried up to 3 times).")
    deploy_lock_lease_seconds: float = Field(
        default=300.0, gt=0, description="Lease of the deploy lock: renewed every third of it while a deploy runs; "
                                         "a lock not renewed for this long (a killed run) is taken over.")
    deploy_query_group: str | None = Field(
        default=None, description="Workspace group given CAN_QUERY on the endpoint each time `coinyear deploy` "
                                  "creates it (and restored when missing); none: no group.")
    deploy_query_service_principals: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Application IDs of service principals (the apps) given CAN_QUERY on the "
                                          "endpoint the same way, comma-separated.")

    # Client side (UI): where the gateway lives
    api_url: str = "http://127.0.0.1:8080"
    api_token: SecretStr | None = Field(default=None, description="The bearer token the UI sends to the gateway.")
    api_timeout: float = Field(default=40.0, gt=0, description="Seconds the UI waits for an API answer (longer than "
                               "the gateway's request deadline, so the UI shows its 504).")
    ui_port: int = 8501
    ui_interval: float = Field(default=0.9, ge=0, lt=1, description="Interval the UI asks for; 0 = none.")

    min_year: int = MIN_YEAR
    max_year: int = MAX_YEAR

    # Retraining (`coinyear retrain`, `coinyear scheduler`): the candidate must beat production by these margins
    retrain_cron: str = Field(default="0 3 * * *", description="5-field crontab (UTC); 6 fields = seconds first.")
    retrain_min_mae_improvement: float = Field(default=0.02, gt=0, lt=1, description="Relative MAE gain needed.")
    retrain_max_decade_regression: float = Field(default=1.0, ge=0, description="Years a decade may get worse.")
    retrain_decade_min_coins: int = Field(default=20, ge=1,
                                          description="Decades with fewer eval coins are not checked.")
    retrain_latency_budget_ms: float = Field(default=1000.0, gt=0, description="Median ms of one-coin requests.")
    retrain_behaviour_gate: bool = Field(default=True, description="Reject a candidate that fails a behaviour check "
                                        "(coinyear.behaviour) that production passes.")
    retrain_behaviour_tolerance: float = Field(default=5.0, gt=0, description="Years a photo perturbation may move "
                                               "the answer in the behaviour checks (mean over the cases).")
    retrain_holdout_seed: int = 20250101
    retrain_feedback_eval_percent: int = Field(default=20, ge=0, le=100, description="Feedback kept for evaluation.")
    retrain_base_limit: int | None = Field(default=None, description="Use N base coins (quick runs and tests).")
    monitor_psi_bins: int = Field(default=10, ge=2)
    monitor_psi_alert: float = Field(default=0.25, gt=0, description="PSI above which `coinyear monitor` lists a "
                                     "drift alert and the UI warns (> 0.25: no longer looks like the reference).")

    @model_validator(mode="after")
    def _one_body_fits_in_flight(self) -> Settings:
        """A body the gateway accepts must fit within the in-flight bound, or it would be refused forever."""
        if self.max_inflight_bytes < self.max_body_bytes:
            raise ValueError(f"max_inflight_bytes ({self.max_inflight_bytes}) must be at least max_body_bytes "
                             f"({self.max_body_bytes}): a request of the largest body could never be admitted")
        return self

    @field_validator("api_tokens", "aux_heads", "deploy_query_service_principals", mode="before")
    @classmethod
    def _split_tokens(cls, value):
        if isinstance(value, str):
            return [token.strip() for token in value.split(",") if token.strip()]
        return value

    @field_validator("data_dir", mode="before")
    @classmethod
    def _resolve_data_dir(cls, value, info: ValidationInfo):
        """An unset COINYEAR_DATA_DIR: ../shared/data/ocre when it exists, else HOME/data/ocre."""
        return resolve_data_dir(value, info.data.get("home", Path(".coinyear")))

    def api_token_entries(self) -> list[str]:
        """The COINYEAR_API_TOKENS entries in clear (`token` or `name:token`), for comparing a caller's token."""
        return [entry.get_secret_value() for entry in self.api_tokens]

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def mlflow_tracking_uri(self) -> str:
        return self.tracking_uri or f"sqlite:///{self.home_dir / 'mlflow.db'}"

    @property
    def mlflow_registry_uri(self) -> str:
        return self.registry_uri or self.mlflow_tracking_uri

    @property
    def artifact_root(self) -> Path:
        return self.home_dir / "mlartifacts"

    @property
    def lake_root(self) -> str:
        return self.lake_uri or str(self.home_dir / "lake")

    @property
    def spool_dir(self) -> Path:
        """Local, fsync'ed write-ahead spool of the lake writers (always local, even with a remote lake)."""
        return self.home_dir / "spool"

    @property
    def cache_dir(self) -> Path:
        return self.home_dir / "cache"

    @property
    def tensor_dir(self) -> Path:
        """Where distributed training memory-maps decoded images: must be the node's local disk."""
        if self.tensor_cache_dir:
            return Path(self.tensor_cache_dir).expanduser().resolve()
        return self.cache_dir / "tensors"

    @property
    def serving_endpoint_name(self) -> str:
        """The Model Serving endpoint: COINYEAR_ENDPOINT_NAME, else the model name with the dots of a Unity
        Catalog name (`catalog.schema.model`) made dashes, as endpoint names cannot hold dots."""
        return self.endpoint_name or self.model_name.replace(".", "-")

    @property
    def state_dir(self) -> Path:
        """Locks and content-addressed feedback images of the retraining job."""
        return self.home_dir / "state"


def setting_default(name: str) -> Any:
    """The default of one setting: the training recipe's dataclasses take their defaults from here."""
    return Settings.model_fields[name].get_default(call_default_factory=True)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def configure_mlflow(settings: Settings) -> None:
    """Point MLflow at the configured tracking store and registry, creating the local state folder."""
    import mlflow

    if settings.tracking_uri is None:
        settings.home_dir.mkdir(parents=True, exist_ok=True)
    # MLflow also writes both URIs into os.environ, where a Settings built later in this process would read them
    # as its own (MLFLOW_*_URI are aliases of its fields) and use another home's store: keep the environment as
    # it was. Each Settings configures MLflow itself, and child processes are handed their settings.
    saved = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    try:
        mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
        mlflow.set_registry_uri(settings.mlflow_registry_uri)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def ensure_experiment(settings: Settings) -> str:
    """The experiment id, creating it with its artifacts under COINYEAR_HOME (not the working directory) when the
    tracking store is a SQLite database (the embedded default, or one a tracking URI names), for which MLflow would
    otherwise put them in ./mlruns of whatever directory the command ran in. A tracking server (http, databricks)
    keeps its own artifact store."""
    import mlflow

    configure_mlflow(settings)
    experiment = mlflow.get_experiment_by_name(settings.experiment_name)
    if experiment is not None:
        return experiment.experiment_id
    # the resolved URI: the embedded default is a SQLite file too
    location = settings.artifact_root.as_uri() if settings.mlflow_tracking_uri.startswith("sqlite:") else None
    return mlflow.create_experiment(settings.experiment_name, artifact_location=location)


def set_torch_threads(settings: Settings) -> None:
    import torch

    if settings.num_threads > 0:
        torch.set_num_threads(settings.num_threads)
    elif cpus := os.cpu_count():
        torch.set_num_threads(cpus)
