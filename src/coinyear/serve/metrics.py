"""The gateway's Prometheus series (`GET /metrics`): requests, latency, batches, the served version, model swaps
and load failures, in-flight load, and each lake spool's backlog and health read at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from coinyear.lake.spool import SpooledAppender


class Metrics:
    """Prometheus series of one app (own registry, so several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("coinyear_requests", "Scoring requests by HTTP status and error code",
                                ["status", "error_code"], registry=self.registry)
        self.rows = Counter("coinyear_rows", "Scored input rows", registry=self.registry)
        self.latency = Histogram("coinyear_request_latency_seconds", "Scoring request latency",
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10),
                                 registry=self.registry)
        self.batch_rows = Histogram("coinyear_batch_rows", "Rows per forward pass (micro-batch size)",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.model_version = Gauge("coinyear_model_version", "Registered version being served (0: none)",
                                   registry=self.registry)
        self.swaps = Counter("coinyear_model_swaps", "Model versions swapped in", registry=self.registry)
        self.load_failures = Counter("coinyear_model_load_failures", "Versions that failed to load or warm",
                                     registry=self.registry)
        self.inflight_requests = Gauge("coinyear_inflight_requests", "Scoring and feedback requests being handled",
                                       registry=self.registry)
        self.inflight_bytes = Gauge("coinyear_inflight_bytes", "Body bytes the requests being handled count for",
                                    registry=self.registry)
        self.log_backlog = Gauge("coinyear_inference_log_backlog", "Rows spooled but not yet in Delta",
                                 ["table"], registry=self.registry)
        self.spools: dict[str, SpooledAppender] = {}  # table -> its spool, whose health() is read at each scrape
        self.registry.register(self)

    SPOOL_GAUGES = (
        ("quarantined_segments", "Spool segments Delta refused for good, kept in quarantine/ for an operator"),
        ("pending_bytes", "Bytes spooled but not yet in Delta"),
        ("pending_rows", "Rows spooled but not yet in Delta"),
        ("accepting", "1 while the spool takes writes (0: closed, or its disk refuses them)"),
        ("ok", "1 while the spool takes writes, commits and has nothing quarantined"),
    )

    def watch_spool(self, table: str, spool: SpooledAppender) -> None:
        """Report `spool` under `table`: its backlog and its health() gauges (`coinyear_spool_*`)."""
        self.spools[table] = spool
        self.log_backlog.labels(table).set_function(lambda: spool.backlog)

    def collect(self):
        """The `coinyear_spool_*` gauges, from each spool's health() at scrape time (a prometheus collector)."""
        from prometheus_client.core import GaugeMetricFamily

        families = {key: GaugeMetricFamily(f"coinyear_spool_{key}", text, labels=["table"])
                    for key, text in self.SPOOL_GAUGES}
        for table, spool in self.spools.items():
            health = spool.health()
            for key, family in families.items():
                family.add_metric([table], float(health[key]))
        return list(families.values())
