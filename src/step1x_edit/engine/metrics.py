"""Prometheus metrics of one server: requests by status, queue depth, batch sizes, latency by stage.

Each app gets its own registry (tests start several servers in one process; a global registry would clash).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("step1x_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=r)
        self.stage_seconds = Histogram("step1x_stage_seconds",
                                       "Latency by stage (queue, pipeline stages, input, output, request)",
                                       ["stage"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_images = Histogram("step1x_batch_images", "Images per pipeline call",
                                      buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r)
        self.batch_requests = Histogram("step1x_batch_requests", "Requests per pipeline call",
                                        buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=r)
        self.jobs = Counter("step1x_jobs", "Jobs by outcome (done, failed, oom, rejected_full, dropped_disconnect, "
                                           "dropped_timeout, aborted)", ["outcome"], registry=r)
        self.queue_depth = Gauge("step1x_queue_depth", "Jobs waiting for the worker", registry=r)
        self.queue_images = Gauge("step1x_queue_images", "Images waiting for the worker", registry=r)
        self.running_jobs = Gauge("step1x_running_jobs", "Jobs in the pipeline call now running", registry=r)
        self.ready = Gauge("step1x_ready", "1 when the weights are loaded and the worker is alive", registry=r)

    def bind_engine(self, stats: Callable[[], dict[str, int]], ready: Callable[[], bool]) -> None:
        """Gauges read the engine's live numbers at scrape time instead of being pushed."""
        self.queue_depth.set_function(lambda: stats()["queued_jobs"])
        self.queue_images.set_function(lambda: stats()["queued_images"])
        self.running_jobs.set_function(lambda: stats()["running_jobs"])
        self.ready.set_function(lambda: 1.0 if ready() else 0.0)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage=stage).observe(max(0.0, float(seconds)))
